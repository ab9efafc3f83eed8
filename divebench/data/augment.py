"""Batched, device-side augmentation for image datasets held as uint8 NCHW tensors.

The whole training split lives on the training device as uint8; a batch is taken by
indexing and turned into the model's float input here, with tensor operations on the
batch's device (no PIL, no DataLoader workers, no per-sample Python loop). Each
transform reproduces a torchvision recipe the paper's authors used:

- CIFAR-10: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize`` (kuangliu/pytorch-cifar).
- CIFAR-100: the same plus ``RandomRotation(15)`` after the flip
  (weiaicunzai/pytorch-cifar100).
- Tiny-ImageNet: ``RandomResizedCrop(224)``, ``RandomHorizontalFlip()``, ``Normalize``
  (ImageNet statistics); evaluation ``Resize(256)``, ``CenterCrop(224)``.

Randomness comes only from the ``torch.Generator`` the loop passes in. The per-sample
parameters (offsets, flips, angles, boxes) are drawn on the generator's device (the
loop keeps it on the CPU) and then moved to the batch's device, so the same seed gives
the same augmentation on any device. The pixel work itself runs where the batch is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Normalisation constants exactly as in the authors' training scripts. kuangliu's CIFAR-10
# "std" (0.2023, 0.1994, 0.2010) is the mean per-image std, not the dataset std (0.247,
# 0.243, 0.261); it is kept for faithfulness (BatchNorm makes the difference immaterial).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- helpers


def _uniform(gen: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """``n`` uniform [0, 1) float32 draws from ``gen``, returned on ``device``."""
    return torch.rand(n, generator=gen, device=gen.device).to(device)


def _randint(gen: torch.Generator, high: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=gen, device=gen.device).to(device)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (or float in [0, 255]) NCHW -> float32 ``(x / 255 - mean) / std`` per channel.

    Written as one conversion and an in-place multiply-add on the fresh float copy: a
    broadcast ``(x - m) / s`` took ten times as long on a CPU.
    """
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    # scale and shift computed in float64, rounded once to float32
    scale = (1.0 / (255.0 * s)).to(device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    shift = (-m / s).to(device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    out = x.to(torch.float32, copy=True)
    return out.mul_(scale).add_(shift)


def crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    padding: int,
) -> torch.Tensor:
    """Crop each sample of ``x`` (NCHW) from its zero-padded copy, then mirror some.

    ``offsets`` is an int tensor [N, 2] of (top, left) in the padded image, each in
    ``[0, 2 * padding]``; ``flips`` a bool tensor [N]. Equals torchvision's
    ``RandomCrop(size, padding, fill=0)`` followed by ``RandomHorizontalFlip`` with those
    parameters. Rows are picked from a strided view of every vertical window (one copy of
    whole rows), then one ``gather`` picks the columns, flipped ones reversed.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    # unfold: [N, C, 2p + 1, W + 2p, H] view of all vertical windows; index each sample's
    windows = padded.unfold(2, h, 1)
    rows = windows[torch.arange(n, device=x.device), :, offsets[:, 0]]  # [N, C, W + 2p, H]
    rows = rows.transpose(2, 3)  # [N, C, H, W + 2p]
    ar = torch.arange(w, device=x.device)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], w - 1 - ar, ar)  # [N, W]
    return torch.gather(rows, 3, cols[:, None, None, :].expand(n, c, h, w))


def rotate(x: torch.Tensor, angles_deg: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Rotate each float NCHW sample counter-clockwise by its angle about the image centre.

    Pixels that come from outside the image are 0, as in torchvision's
    ``RandomRotation(fill=0)``; ``mode="nearest"`` is torchvision's default interpolation.
    One batched ``affine_grid`` + ``grid_sample``.
    """
    n, _, h, w = x.shape
    a = angles_deg.to(device=x.device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps each output position to the input position it reads, in
    # normalised coordinates ([-1, 1] on each axis). With y pointing down, turning the
    # picture counter-clockwise on screen means reading the input at [[cos, -sin],
    # [sin, cos]] times the output position (in pixels); the aspect factors convert that
    # to normalised coordinates on non-square images. Pixel-identical to torchvision's
    # rotate (nearest) on even-sized images (tests/test_augment.py).
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def resized_crop(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_size: int,
    flips: torch.Tensor | None = None,
    clamp_to_box: bool = True,
) -> torch.Tensor:
    """Bilinear resample of one box per sample to ``out_size`` x ``out_size`` (float out).

    ``boxes`` is [N, 4] of (top, left, height, width) in pixels. Output pixel ``k``
    samples source coordinate ``top + (k + 0.5) * height / out_size - 0.5`` (the
    half-pixel convention of ``interpolate(..., align_corners=False)``).
    ``clamp_to_box=True`` clamps coordinates to the box, i.e. crop first and then resize
    (torchvision ``resized_crop``); ``False`` clamps to the image, i.e. resize the whole
    image and then crop (``Resize`` + ``CenterCrop``). Both upsample here, where
    antialiasing changes nothing. ``flips`` mirrors the output of flagged samples.
    """
    n, _, h, w = x.shape
    b = boxes.to(device=x.device, dtype=torch.float32)
    k = (torch.arange(out_size, device=x.device, dtype=torch.float32) + 0.5) / out_size
    ys = b[:, 0, None] + k[None, :] * b[:, 2, None] - 0.5  # [N, out] source rows
    xs = b[:, 1, None] + k[None, :] * b[:, 3, None] - 0.5  # [N, out] source columns
    if clamp_to_box:
        ys = torch.minimum(torch.maximum(ys, b[:, 0, None]), b[:, 0, None] + b[:, 2, None] - 1)
        xs = torch.minimum(torch.maximum(xs, b[:, 1, None]), b[:, 1, None] + b[:, 3, None] - 1)
    else:
        ys, xs = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
    if flips is not None:
        xs = torch.where(flips.to(x.device)[:, None], xs.flip(1), xs)
    # With align_corners=True, -1 and +1 are the centres of the first and last pixels, so
    # the pixel coordinates above map linearly and grid_sample interpolates exactly there.
    gx = xs * (2.0 / max(w - 1, 1)) - 1.0
    gy = ys * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack(
        (
            gx[:, None, :].expand(n, out_size, out_size),
            gy[:, :, None].expand(n, out_size, out_size),
        ),
        dim=-1,
    )
    return F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
    )


def random_resized_crop_boxes(
    gen: torch.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> torch.Tensor:
    """Per-sample boxes [N, 4] (top, left, h, w) with torchvision ``RandomResizedCrop``'s rule.

    Vectorised version of ``RandomResizedCrop.get_params``: up to ``attempts`` draws of
    (area fraction, log aspect ratio) per sample, the first that fits wins; samples where
    none fits fall back to the central crop with the ratio clamped, as torchvision does.
    Returned on the generator's device.
    """
    area = float(height * width)
    dev = gen.device
    frac = torch.empty(n, attempts, device=dev).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, attempts, device=dev).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=gen
    )
    aspect = torch.exp(log_r)
    ws = torch.round(torch.sqrt(area * frac * aspect))
    hs = torch.round(torch.sqrt(area * frac / aspect))
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting attempt
    any_fit = fits.any(dim=1)
    w_pick = ws.gather(1, first[:, None])[:, 0]
    h_pick = hs.gather(1, first[:, None])[:, 0]
    # fallback: the whole image, its ratio clamped into [ratio[0], ratio[1]]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fb_w, fb_h = int(round(height * ratio[1])), height
    else:
        fb_w, fb_h = width, height
    w_pick = torch.where(any_fit, w_pick, torch.full_like(w_pick, fb_w))
    h_pick = torch.where(any_fit, h_pick, torch.full_like(h_pick, fb_h))
    u = torch.rand(n, 2, device=dev, generator=gen)
    top = torch.floor(u[:, 0] * (height - h_pick + 1))
    left = torch.floor(u[:, 1] * (width - w_pick + 1))
    top = torch.where(any_fit, top, torch.full_like(top, (height - fb_h) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fb_w) // 2))
    return torch.stack((top, left, h_pick, w_pick), dim=1).long()


# ----------------------------------------------------------------------------- transforms
# Dataclasses rather than closures: they print their settings (provenance in env.json)
# and pickle (checkpoints, DDP spawn).


@dataclass(frozen=True)
class Normalize:
    """Evaluation transform: uint8 NCHW -> normalised float32 (no randomness)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


@dataclass(frozen=True)
class NoAugment:
    """Training transform of ``augment=false``: the evaluation transform, generator unused."""

    eval_transform: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.eval_transform(x)


@dataclass(frozen=True)
class CifarTrain:
    """CIFAR training transform: random crop with zero padding, h-flip, optional rotation.

    ``rotation_deg > 0`` adds torchvision's ``RandomRotation(rotation_deg)`` (angle
    uniform in [-rotation_deg, rotation_deg], nearest, fill 0) after the flip, as in the
    CIFAR-100 recipe.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 4
    rotation_deg: float = 0.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        offsets = torch.randint(
            0, 2 * self.padding + 1, (n, 2), generator=gen, device=gen.device
        ).to(x.device)
        flips = _uniform(gen, n, x.device) < 0.5
        out = crop_flip(x, offsets, flips, self.padding)
        if self.rotation_deg > 0:
            angles = (_uniform(gen, n, x.device) * 2.0 - 1.0) * self.rotation_deg
            # rotate in [0, 255] float so the zero fill is a black pixel, as in torchvision
            out = rotate(out.float(), angles)
        return normalize(out, self.mean, self.std)


@dataclass(frozen=True)
class ResizedCropTrain:
    """ImageNet-style training transform: ``RandomResizedCrop(out_size)``, h-flip, normalise."""

    out_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: tuple[float, float] = (0.08, 1.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        boxes = random_resized_crop_boxes(gen, n, h, w, scale=self.scale).to(x.device)
        flips = _uniform(gen, n, x.device) < 0.5
        return normalize(resized_crop(x, boxes, self.out_size, flips), self.mean, self.std)


@dataclass(frozen=True)
class ResizeCenterCropEval:
    """Evaluation transform ``Resize(resize)`` + ``CenterCrop(crop)`` + normalise, in one resample.

    Resizing the whole image to ``resize`` and cutting the central ``crop`` samples the
    same points as resampling the central ``crop / resize`` fraction of the original
    straight to ``crop`` pixels (for 64 px Tiny-ImageNet, 256/224: the central 56 x 56
    upsampled to 224), so only the output-size image is ever materialised.
    """

    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # Resize(int) scales the shorter side to ``resize``; one scale factor for both axes.
        s = min(h, w) / self.resize
        box_h, box_w = self.crop * s, self.crop * s
        # CenterCrop's offset in the resized image is round((size - crop) / 2) pixels.
        top = round((h / s - self.crop) / 2.0) * s
        left = round((w / s - self.crop) / 2.0) * s
        boxes = torch.tensor([[top, left, box_h, box_w]], device=x.device).expand(n, 4)
        out = resized_crop(x, boxes, self.crop, clamp_to_box=False)
        return normalize(out, self.mean, self.std)
