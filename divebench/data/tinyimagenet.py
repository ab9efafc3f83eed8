"""Tiny-ImageNet (200 classes, 64 x 64 px), decoded once, cached, held on the device.

Files: the standard ``tiny-imagenet-200/`` layout under ``data_dir``::

    wnids.txt                              the 200 class ids (WordNet ids)
    train/<wnid>/images/*.JPEG             500 per class
    val/images/*.JPEG                      10,000 images
    val/val_annotations.txt                "<file>\\t<wnid>\\t<box>" per line

``download=true`` fetches the official archive (cs231n, about 240 MB). The test split
has no labels and is not used; the labelled validation split is the evaluation set, as
in the paper. Class indices follow the sorted wnids (what torchvision's ``ImageFolder``
gives, which the authors' scripts used).

The JPEGs are decoded once into uint8 tensors (about 1.35 GB for both splits) and cached
as ``tiny-imagenet-200/divebench-uint8-v1.pt`` (written atomically), so later runs load
in seconds.

Presets (``preset=``):

- ``paper`` (the default, ``preset=""``): the authors' recipe. Training
  ``RandomResizedCrop(224)`` + h-flip; evaluation ``Resize(256)`` + ``CenterCrop(224)``;
  the model builder ``resnet18`` gives a 1000-way head (the authors kept torchvision's
  ImageNet head; labels use the first 200 outputs). Costs what ImageNet-size inputs
  cost: about 5.5e14 floating-point operations per epoch (ResNet-18 at 224 px, forward
  and backward, 100,000 images; an estimate, not a measurement), so sane on a GPU and
  far too slow on a CPU outside smoke runs with a small ``subset``.
- ``native``: 64 px throughout. Training ``RandomResizedCrop(64)`` + h-flip; evaluation
  normalises only; a 200-way head. About 12x cheaper per image.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.utils import download_and_extract_archive

from divebench.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NoAugment,
    Normalize,
    ResizeCenterCropEval,
    ResizedCropTrain,
)
from divebench.data.base import DataBundle, DataError
from divebench.data.fake import fake_splits
from divebench.data.paths import resolve_data_dir

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
ARCHIVE_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CACHE_NAME = "divebench-uint8-v1.pt"
NUM_CLASSES = 200
TRAIN_SIZE = 100_000
VAL_SIZE = 10_000
IMAGE_SIZE = 64
PRESETS = ("paper", "native")


def _decode(path: Path) -> torch.Tensor:
    """One JPEG -> uint8 [3, 64, 64] (grey images become RGB); DataError names a bad file.

    Pillow, as torchvision's ``ImageFolder`` (the authors' loader) uses: the same decoder
    gives the same pixels. Pillow raises on truncated files (``LOAD_TRUNCATED_IMAGES`` is
    off by default).
    """
    try:
        with Image.open(path) as im:
            if im.format != "JPEG":
                raise ValueError(f"a {im.format} file, not a JPEG")
            rgb = np.array(im.convert("RGB"))  # a writable copy for torch
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"Tiny-ImageNet image {path} is unreadable or corrupt ({reason})") from e
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(
            f"Tiny-ImageNet image {path} is {rgb.shape[1]} x {rgb.shape[0]} px; expected 64 x 64"
        )
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _decode_all(paths: list[Path], workers: int) -> torch.Tensor:
    """Decode ``paths`` into one uint8 [N, 3, 64, 64] tensor, ``workers`` threads at once.

    Pillow decodes outside the GIL, so threads work in parallel without the start-up
    and copying costs of processes.
    """
    out = torch.empty(len(paths), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def work(i: int) -> None:
        out[i] = _decode(paths[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first DataError of any worker
        list(pool.map(work, range(len(paths)), chunksize=256))
    return out


def _index(folder: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """(wnids, train paths, train labels, val paths, val labels) from the file tree."""
    wnids_file = folder / "wnids.txt"
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise DataError(f"Tiny-ImageNet file {wnids_file} lists no classes")
    label_of = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        files = sorted(images.glob("*.JPEG"))
        if not files:
            raise DataError(f"Tiny-ImageNet folder {images} holds no .JPEG images")
        train_paths += files
        train_labels += [label_of[wnid]] * len(files)
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"Tiny-ImageNet file {ann} is missing")
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label_of:
            raise DataError(
                f"Tiny-ImageNet file {ann} line {lineno} names no known class: {line!r}"
            )
        path = folder / "val" / "images" / parts[0]
        if not path.is_file():
            raise DataError(f"Tiny-ImageNet image {path} (listed in {ann}) is missing")
        val_paths.append(path)
        val_labels.append(label_of[parts[1]])
    return wnids, train_paths, train_labels, val_paths, val_labels


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tinyimagenet(
    root: Path, download: bool = False, workers: int | None = None
) -> dict[str, Any]:
    """The decoded splits as a dict of CPU tensors: x_train, y_train, x_val, y_val, wnids.

    Reads the cache when there is one; otherwise decodes the JPEGs and writes the cache
    (a read-only ``data_dir`` only costs the cache, with a warning). One-line
    :class:`DataError` for missing files (without ``download``) and corrupt images.
    """
    folder = root / FOLDER
    cache = folder / CACHE_NAME
    if cache.is_file():
        try:
            data: dict[str, Any] = torch.load(
                cache, map_location="cpu", weights_only=True, mmap=True
            )
            if {"x_train", "y_train", "x_val", "y_val", "wnids"} <= set(data):
                return data
            reason = "missing keys"
        except Exception as e:  # noqa: BLE001 -- any unreadable cache is rebuilt
            reason = f"{type(e).__name__}: {e}"
        if not (folder / "wnids.txt").is_file():
            raise DataError(
                f"Tiny-ImageNet cache {cache} is unreadable ({reason}) and the JPEGs are missing"
            )
        warnings.warn(
            f"Tiny-ImageNet cache {cache} is unreadable ({reason}); rebuilding it", stacklevel=2
        )
    if not (folder / "wnids.txt").is_file():
        if not download:
            raise DataError(
                f"Tiny-ImageNet files not found under {root} (looked for {FOLDER}/wnids.txt); "
                f"run with download=true on a machine with a network, "
                f"or set data_dir=PATH / DIVEBENCH_DATA"
            )
        try:
            # the archive (about 240 MB) goes once extracted: the tree and the cache suffice
            download_and_extract_archive(URL, str(root), md5=ARCHIVE_MD5, remove_finished=True)
        except (URLError, OSError, RuntimeError) as e:
            raise DataError(f"could not download Tiny-ImageNet from {URL}: {e}") from e
    wnids, train_paths, train_labels, val_paths, val_labels = _index(folder)
    workers = workers or min(16, os.cpu_count() or 1)
    data = {
        "x_train": _decode_all(train_paths, workers),
        "y_train": torch.tensor(train_labels, dtype=torch.int64),
        "x_val": _decode_all(val_paths, workers),
        "y_val": torch.tensor(val_labels, dtype=torch.int64),
        "wnids": wnids,
    }
    try:
        _save_atomic(data, cache)
    except OSError as e:
        warnings.warn(
            f"could not write the Tiny-ImageNet cache {cache} ({e}); decoding again next run",
            stacklevel=2,
        )
    return data


def resolve_preset(options: dict[str, Any]) -> str:
    """``preset`` for Tiny-ImageNet: ``paper`` (also for ``""``) or ``native``."""
    preset = str(options.get("preset") or "paper")
    if preset not in PRESETS:
        raise DataError(f"tinyimagenet preset={preset!r} is not valid: expected paper | native")
    return preset


def build_tinyimagenet(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """The :data:`~divebench.data.base.DataBuilder` behind ``dataset=tinyimagenet``."""
    preset = resolve_preset(options)
    subset = int(options.get("subset") or 0)
    if subset < 0:
        raise DataError(f"subset={subset} must be >= 0")
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    info: dict[str, Any] = {"dataset": "Tiny-ImageNet", "preset": preset}
    if options.get("data", "real") == "fake":
        x_train, y_train, x_val, y_val = fake_splits(
            TRAIN_SIZE, VAL_SIZE, NUM_CLASSES, shape, subset, seed, device
        )
        num_classes = NUM_CLASSES
        info.update(source="fake")
    else:
        root = resolve_data_dir(options)
        data = load_tinyimagenet(root, bool(options.get("download")))
        x_tr, y_tr = data["x_train"], data["y_train"]
        if subset:
            # The training split is stored class by class, so "the first N" would hold
            # only the first classes: take a fixed random N instead, the same for every
            # seed and policy (as CIFAR's first N are).
            keep = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(0))[:subset]
            keep = keep.sort().values
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        x_train, y_train = x_tr.to(device), y_tr.to(device)
        x_val, y_val = data["x_val"].to(device), data["y_val"].to(device)
        num_classes = len(data["wnids"])
        info.update(source=f"{FOLDER} (decoded JPEGs)", root=str(root))
    if preset == "paper":
        out_size = 224
        eval_transform: Any = ResizeCenterCropEval(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    else:
        out_size = IMAGE_SIZE
        eval_transform = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    augment = bool(options.get("augment", True))
    train_transform: Any = (
        ResizedCropTrain(out_size, IMAGENET_MEAN, IMAGENET_STD)
        if augment
        else NoAugment(eval_transform)
    )
    info.update(
        train_size=int(y_train.shape[0]),
        val_size=int(y_val.shape[0]),
        train_transform=repr(train_transform),
        eval_transform=repr(eval_transform),
    )
    return DataBundle(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        num_classes=num_classes,
        input_shape=(3, out_size, out_size),
        train_transform=train_transform,
        eval_transform=eval_transform,
        info=info,
    )
