"""Fake image data of a real dataset's shapes: every suite runs end to end without files.

Images are uint8 NCHW like the real loaders produce, so the same device-side transforms
run on them. Each class has its own mean colour and every pixel gets independent noise
around it: a model that learns colours reaches high accuracy, so a smoke run shows the
accuracy rising, while the noise keeps single pixels uninformative.
"""

from __future__ import annotations

import torch


def fake_images(
    n: int,
    num_classes: int,
    shape: tuple[int, int, int],
    colour_seed: int,
    sample_seed: int,
    device: torch.device,
    noise: int = 48,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images of ``shape`` (C, H, W) and balanced int64 labels, on ``device``.

    The class colours depend only on ``colour_seed`` (so a dataset's training and
    validation splits share them); the samples are drawn with a generator seeded with
    ``sample_seed`` on ``device`` itself, so nothing of full size crosses the host-device
    link. Same seeds and device, same data. Pixels are ``colour[class] + U{-noise..noise}``.
    """
    c, h, w = shape
    if not 0 <= noise <= 127:
        raise ValueError(f"noise={noise} must be in [0, 127]")
    # colours in [noise, 255 - noise]: colour + U{-noise..noise} stays in uint8 range, so
    # the pixels are generated as uint8 directly (no int16 copy, no clamp)
    colour_gen = torch.Generator().manual_seed(colour_seed)
    colours = torch.randint(noise, 256 - noise, (num_classes, c), generator=colour_gen)
    gen = torch.Generator(device=device).manual_seed(sample_seed)
    labels = torch.arange(n, device=device) % num_classes
    labels = labels[torch.randperm(n, generator=gen, device=device)]
    pixels = torch.randint(
        0, 2 * noise + 1, (n, c, h, w), generator=gen, device=device, dtype=torch.uint8
    )
    pixels += (colours - noise).to(device=device, dtype=torch.uint8)[labels][:, :, None, None]
    return pixels, labels


def fake_split_sizes(full_train: int, full_val: int, subset: int) -> tuple[int, int]:
    """Sizes (train, val) of a fake dataset: the real split sizes, or with ``subset > 0``
    ``min(subset, full_train)`` training samples and ``min(full_val, max(subset // 5,
    64))`` validation samples, so small smoke runs also evaluate cheaply."""
    if subset <= 0:
        return full_train, full_val
    return min(subset, full_train), min(full_val, max(subset // 5, 64))


def fake_splits(
    full_train: int,
    full_val: int,
    num_classes: int,
    shape: tuple[int, int, int],
    subset: int,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val) of fake data sized by :func:`fake_split_sizes`.

    Both splits share the class colours of ``seed``; their samples come from two
    different streams.
    """
    n_train, n_val = fake_split_sizes(full_train, full_val, subset)
    x_train, y_train = fake_images(n_train, num_classes, shape, seed, 2 * seed, device)
    x_val, y_val = fake_images(n_val, num_classes, shape, seed, 2 * seed + 1, device)
    return x_train, y_train, x_val, y_val
