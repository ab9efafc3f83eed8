"""Device-side augmentation: each transform against torchvision's own per-image code."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from divebench.data import augment as A

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _unnormalize(y: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (y.cpu() * s + m) * 255.0


# ----------------------------------------------------------------------------- normalise


def test_normalize_matches_totensor_normalize() -> None:
    x = _images(16)
    ref = TF.normalize(x.float() / 255.0, list(A.CIFAR10_MEAN), list(A.CIFAR10_STD))
    out = A.normalize(x, A.CIFAR10_MEAN, A.CIFAR10_STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_normalize_gives_zero_mean_unit_std_on_data_with_those_statistics() -> None:
    # each pixel is mean - std or mean + std (x 255), half each: per channel the data have
    # exactly the normalisation constants as mean and (population) std, up to rounding
    g = torch.Generator().manual_seed(1)
    mean = torch.tensor(A.CIFAR100_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(A.CIFAR100_STD).view(1, 3, 1, 1) * 255
    sign = torch.randint(0, 2, (64, 3, 32, 32), generator=g) * 2 - 1
    sign[32:] = -sign[:32]  # exactly balanced signs in every position
    x = (mean + sign * std).round().to(torch.uint8)
    out = A.Normalize(A.CIFAR100_MEAN, A.CIFAR100_STD)(x).double()
    # rounding to whole grey levels moves the statistics by at most 0.5 / (0.256 * 255)
    assert out.mean((0, 2, 3)).abs().max() < 0.01
    assert (out.std((0, 2, 3), correction=0) - 1).abs().max() < 0.01
    # and the raw formula, against float64
    ref = (x.double() / 255 - mean.double() / 255) / (std.double() / 255)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- crop + flip


def test_crop_flip_matches_torchvision_pad_crop_hflip() -> None:
    x = _images(12)
    g = torch.Generator().manual_seed(3)
    offsets = torch.randint(0, 9, (12, 2), generator=g)
    offsets[0] = torch.tensor([0, 0])
    offsets[1] = torch.tensor([8, 8])
    flips = torch.arange(12) % 2 == 0
    out = A.crop_flip(x, offsets, flips, padding=4)
    for i in range(12):
        ref = TF.crop(TF.pad(x[i], [4]), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        if flips[i]:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i], ref), i


@pytest.mark.parametrize("device", DEVICES)
def test_cifar_train_outputs_real_crops_of_the_padded_image(device: str) -> None:
    x = _images(64).to(device)
    transform = A.CifarTrain(A.CIFAR10_MEAN, A.CIFAR10_STD)
    out = transform(x, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert out.device.type == device
    pixels = _unnormalize(out, A.CIFAR10_MEAN, A.CIFAR10_STD).round().to(torch.uint8)
    padded = TF.pad(x.cpu(), [4])
    seen_offsets, n_flipped = set(), 0
    for i in range(64):
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                pixels[i],
                (lambda c: c.flip(-1) if flip else c)(
                    padded[i, :, top : top + 32, left : left + 32]
                ),
            )
        ]
        assert matches, f"sample {i} is not a (flipped) crop of its padded image"
        seen_offsets.add(matches[0][:2])
        n_flipped += matches[0][2]
    assert len(seen_offsets) > 20  # per-sample offsets, not one per batch
    assert 16 <= n_flipped <= 48  # per-sample flips at about one in two


def test_cifar_train_is_deterministic_in_the_generator_and_leaves_input_alone() -> None:
    x = _images(32)
    before = x.clone()
    transform = A.CifarTrain(A.CIFAR100_MEAN, A.CIFAR100_STD, rotation_deg=15.0)
    a = transform(x, torch.Generator().manual_seed(5))
    b = transform(x, torch.Generator().manual_seed(5))
    c = transform(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, before)


def test_cifar_train_offsets_span_the_padding_and_flip_half() -> None:
    # the same draws as CifarTrain makes, read back from the generator
    g = torch.Generator().manual_seed(11)
    offsets = torch.randint(0, 9, (4096, 2), generator=g)
    flips = torch.rand(4096, generator=g) < 0.5
    assert set(offsets.unique().tolist()) == set(range(9))
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    x = _images(4096, 8, 8)
    out = A.CifarTrain((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), padding=4)(
        x, torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(out, A.crop_flip(x, offsets, flips, 4).float())


# ----------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("angle", [90.0, 15.0, -15.0, 7.3, -0.4])
def test_rotate_matches_torchvision_rotate_nearest(angle: float) -> None:
    x = _images(4, 32, 40).float()
    out = A.rotate(x, torch.full((4,), angle))
    ref = TF.rotate(x, angle, interpolation=TF.InterpolationMode.NEAREST, fill=0)
    assert torch.equal(out, ref)


def test_rotate_zero_is_identity_and_angles_are_per_sample() -> None:
    x = _images(3).float()
    out = A.rotate(x, torch.tensor([0.0, 15.0, -15.0]))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], TF.rotate(x[1], 15.0, fill=0))
    assert torch.equal(out[2], TF.rotate(x[2], -15.0, fill=0))


def test_cifar100_transform_is_crop_flip_then_rotation_within_15_degrees() -> None:
    x = _images(256)
    out = A.CifarTrain((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), rotation_deg=15.0)(
        x, torch.Generator().manual_seed(2)
    )
    g = torch.Generator().manual_seed(2)
    offsets = torch.randint(0, 9, (256, 2), generator=g)
    flips = torch.rand(256, generator=g) < 0.5
    angles = (torch.rand(256, generator=g) * 2 - 1) * 15.0
    assert angles.abs().max() <= 15.0 and angles.min() < -10 and angles.max() > 10
    ref = A.rotate(A.crop_flip(x, offsets, flips, 4).float(), angles)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- resized crops


@pytest.mark.parametrize("box", [(3, 5, 20, 30), (0, 0, 64, 64), (10, 2, 50, 17), (40, 50, 24, 14)])
@pytest.mark.parametrize("out_size", [224, 64])
def test_resized_crop_matches_torchvision_resized_crop(
    box: tuple[int, int, int, int], out_size: int
) -> None:
    x = _images(2, 64, 64)
    flips = torch.tensor([False, True])
    out = A.resized_crop(x, torch.tensor([box, box]), out_size, flips)
    ref = TF.resized_crop(x.float(), *box, [out_size, out_size], antialias=True)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=3e-3)
    torch.testing.assert_close(out[1], TF.horizontal_flip(ref[1]), rtol=0, atol=3e-3)


def test_resize_center_crop_eval_matches_torchvision_resize_256_center_crop_224() -> None:
    x = _images(3, 64, 64)
    out = A.ResizeCenterCropEval(256, 224)(x)
    ref = TF.center_crop(TF.resize(x.float(), [256], antialias=True), [224])
    ref = TF.normalize(ref / 255.0, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    assert out.shape == (3, 3, 224, 224)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-5)


def test_random_resized_crop_boxes_follow_torchvision_rule() -> None:
    n = 4000
    boxes = A.random_resized_crop_boxes(torch.Generator().manual_seed(0), n, 64, 64).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 64).all() and (left + w <= 64).all() and (h >= 1).all() and (w >= 1).all()
    frac = h * w / 64**2
    # rounding w and h to whole pixels moves the area and ratio a little off the ranges
    assert frac.min() > 0.08 * 0.8 and frac.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < 4 / 3 / 0.85
    # same distribution as torchvision's get_params (different random streams)
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(3, 64, 64), [0.08, 1.0], [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=torch.float64,
    )
    for ours, theirs in zip((top, left, h, w), ref.unbind(1), strict=True):
        assert abs(ours.mean() - theirs.mean()) < 4 * math.hypot(
            ours.std(), theirs.std()
        ) / math.sqrt(n)


def test_random_resized_crop_boxes_fall_back_to_the_centre() -> None:
    # an impossible scale range never fits: torchvision's fallback is the whole square image
    boxes = A.random_resized_crop_boxes(
        torch.Generator().manual_seed(0), 5, 64, 64, scale=(1.5, 2.0)
    )
    assert boxes.tolist() == [[0, 0, 64, 64]] * 5
    boxes = A.random_resized_crop_boxes(
        torch.Generator().manual_seed(0), 2, 40, 100, scale=(1.5, 2.0)
    )
    # ratio 2.5 > 4/3: width clamped to round(40 * 4/3) = 53, centred
    assert boxes.tolist() == [[0, 23, 40, 53]] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_resized_crop_train_shapes_determinism_and_range(device: str) -> None:
    x = _images(8, 64, 64).to(device)
    t = A.ResizedCropTrain(224)
    a = t(x, torch.Generator().manual_seed(1))
    b = t(x, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 224, 224) and a.dtype == torch.float32 and a.device.type == device
    assert torch.equal(a, b)
    # bilinear resampling stays inside the input's value range
    pixels = _unnormalize(a, A.IMAGENET_MEAN, A.IMAGENET_STD)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert A.ResizedCropTrain(64)(x, torch.Generator().manual_seed(1)).shape == (8, 3, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_generator_same_augmentation_on_cpu_and_cuda() -> None:
    x = _images(32)
    t = A.CifarTrain(A.CIFAR10_MEAN, A.CIFAR10_STD)
    cpu = t(x, torch.Generator().manual_seed(4))
    cuda = t(x.cuda(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-5)
