"""CIFAR-10 and CIFAR-100, loaded through torchvision's dataset classes, held on the device.

Files: the python-pickle releases (``cifar-10-batches-py/``, ``cifar-100-python/``)
under ``data_dir`` (see :mod:`divebench.data.paths`); ``download=true`` fetches them
with torchvision's downloader. The training split is the 50,000 training images
(``subset=N`` keeps the first N); validation is the 10,000-image test split, as in the
paper. Both are stored as uint8 NCHW on the training device; augmentation runs there
(:mod:`divebench.data.augment`).

Integrity: by default every file's md5 must match the published release (torchvision's
own table). Files written locally in the same format -- the test fixtures, or a
re-packed copy -- cannot match those sums; ``options["verify_md5"] = False`` (a
programmatic option, not a config key) checks only that the files exist and parse. The
data are then read by torchvision's unmodified loading code either way.

``data=fake`` returns generated images of the same shapes and class counts instead.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from divebench.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarTrain,
    NoAugment,
    Normalize,
)
from divebench.data.base import DataBundle, DataError
from divebench.data.fake import fake_splits
from divebench.data.paths import resolve_data_dir

TRAIN_SIZE = 50_000
TEST_SIZE = 10_000
SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSpec:
    """What differs between the two CIFAR datasets (and their paper recipes)."""

    title: str
    dataset_cls: type[CIFAR10]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rotation_deg: float  # CIFAR-100 recipe adds RandomRotation(15)

    @property
    def folder(self) -> str:
        return str(self.dataset_cls.base_folder)

    def files(self) -> list[tuple[str, str]]:
        """(file name, published md5) of every file the dataset class reads."""
        cls = self.dataset_cls
        meta = (cls.meta["filename"], cls.meta["md5"])
        return [(f, m) for f, m in cls.train_list + cls.test_list] + [meta]


CIFAR10_SPEC = CifarSpec("CIFAR-10", CIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD, 0.0)
CIFAR100_SPEC = CifarSpec("CIFAR-100", CIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD, 15.0)


def _unverified(cls: type[CIFAR10]) -> type[CIFAR10]:
    """``cls`` with its md5 checks reduced to "the file exists" (everything else as is).

    torchvision checks the published md5 sums in two places, ``_check_integrity`` (data
    batches) and ``_load_meta`` (label names); only those two are replaced.
    """

    class Unverified(cls):  # type: ignore[misc,valid-type]
        def _check_integrity(self) -> bool:
            root = Path(self.root) / self.base_folder
            return all((root / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as infile:
                data = pickle.load(infile, encoding="latin1")
                self.classes = data[self.meta["key"]]
            self.class_to_idx = {_class: i for i, _class in enumerate(self.classes)}

    Unverified.__name__ = f"Unverified{cls.__name__}"
    return Unverified


def _first_unreadable(folder: Path, names: list[str]) -> tuple[Path, str] | None:
    """The first of ``names`` that does not unpickle to a CIFAR batch dict, with why."""
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if not isinstance(entry, dict):
                return path, f"holds a {type(entry).__name__}, not a dict"
        except Exception as e:  # noqa: BLE001 -- any failure here means the file is bad
            return path, f"{type(e).__name__}: {e}"
    return None


def load_cifar(
    spec: CifarSpec, root: Path, download: bool = False, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) on the CPU: uint8 NCHW images, int64 labels.

    Raises :class:`DataError` with one line when files are missing (and ``download`` is
    off), fail their md5 check (``verify``), cannot be unpickled, or hold labels outside
    ``[0, num_classes)``.
    """
    folder = root / spec.folder
    missing = [name for name, _ in spec.files() if not (folder / name).is_file()]
    if download and (missing or verify):
        # torchvision's download() checks the md5 sums first and does nothing when they
        # hold; without verification, files that are all present are left alone.
        try:
            spec.dataset_cls.download(_downloader(spec, root))
        except (URLError, OSError, RuntimeError) as e:
            url = spec.dataset_cls.url
            raise DataError(f"could not download {spec.title} from {url}: {e}") from e
        missing = [name for name, _ in spec.files() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{spec.title} files not found under {root} (looked for {spec.folder}/"
            f"{missing[0]}); run with download=true on a machine with a network, "
            f"or set data_dir=PATH / DIVEBENCH_DATA"
        )
    if verify:
        for name, md5 in spec.files():
            if not check_integrity(str(folder / name), md5):
                raise DataError(
                    f"{spec.title} file {folder / name} is corrupt (md5 differs from the "
                    f"published release); delete it and run with download=true"
                )
    cls = spec.dataset_cls if verify else _unverified(spec.dataset_cls)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except Exception as e:  # noqa: BLE001 -- name the bad file, whatever the failure
        names = [name for name, _ in spec.files()]
        bad = _first_unreadable(folder, names)
        if bad is not None:
            raise DataError(f"{spec.title} file {bad[0]} is unreadable ({bad[1]})") from e
        raise DataError(
            f"{spec.title} files under {folder} are malformed ({type(e).__name__}: {e})"
        ) from e
    out = []
    for split, ds in (("train", train), ("test", test)):
        # ds.data is an NHWC view of the files' NCHW array: permuting back costs no copy
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        if x.dtype != torch.uint8 or x.shape[1:] != SHAPE or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{spec.title} {split} files under {folder} hold {tuple(x.shape)} {x.dtype} "
                f"images and {y.shape[0]} labels; expected uint8 N x 3 x 32 x 32 and N labels"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise DataError(
                f"{spec.title} {split} files under {folder} hold labels outside "
                f"[0, {spec.num_classes})"
            )
        out += [x, y]
    return out[0], out[1], out[2], out[3]


def _downloader(spec: CifarSpec, root: Path) -> CIFAR10:
    """A dataset instance that only carries ``root``, for calling torchvision's download()."""
    ds = object.__new__(spec.dataset_cls)
    ds.root = str(root)
    return ds


def build_cifar(
    spec: CifarSpec, options: dict[str, Any], device: torch.device, seed: int
) -> DataBundle:
    """The :data:`~divebench.data.base.DataBuilder` behind ``dataset=cifar10|cifar100``."""
    preset = str(options.get("preset") or "")
    if preset not in ("", "paper"):
        raise DataError(
            f"{spec.title} has one preset (the paper's): preset={preset!r} is not valid"
        )
    subset = int(options.get("subset") or 0)
    if subset < 0:
        raise DataError(f"subset={subset} must be >= 0")
    info: dict[str, Any] = {"dataset": spec.title}
    if options.get("data", "real") == "fake":
        x_train, y_train, x_val, y_val = fake_splits(
            TRAIN_SIZE, TEST_SIZE, spec.num_classes, SHAPE, subset, seed, device
        )
        info.update(source="fake")
    else:
        root = resolve_data_dir(options)
        verify = bool(options.get("verify_md5", True))
        x_tr, y_tr, x_te, y_te = load_cifar(spec, root, bool(options.get("download")), verify)
        if subset:
            x_tr, y_tr = x_tr[:subset], y_tr[:subset]
        x_train, y_train = x_tr.to(device), y_tr.to(device)
        x_val, y_val = x_te.to(device), y_te.to(device)
        info.update(
            source=f"torchvision.datasets.{spec.dataset_cls.__name__}",
            root=str(root),
            md5_verified=verify,
        )
    normalize = Normalize(spec.mean, spec.std)
    augment = bool(options.get("augment", True))
    train_transform: Any = (
        CifarTrain(spec.mean, spec.std, padding=4, rotation_deg=spec.rotation_deg)
        if augment
        else NoAugment(normalize)
    )
    info.update(train_size=int(y_train.shape[0]), val_size=int(y_val.shape[0]))
    info.update(train_transform=repr(train_transform), eval_transform=repr(normalize))
    return DataBundle(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        num_classes=spec.num_classes,
        input_shape=SHAPE,
        train_transform=train_transform,
        eval_transform=normalize,
        info=info,
    )


def build_cifar10(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """CIFAR-10: 50,000 / 10,000 images, 10 classes; crop + flip + normalise."""
    return build_cifar(CIFAR10_SPEC, options, device, seed)


def build_cifar100(options: dict[str, Any], device: torch.device, seed: int) -> DataBundle:
    """CIFAR-100 (fine labels): 50,000 / 10,000 images, 100 classes; crop + flip +
    rotation ±15° + normalise."""
    return build_cifar(CIFAR100_SPEC, options, device, seed)


def write_cifar_files(
    spec: CifarSpec,
    root: Path,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> Path:
    """Write uint8 NHWC arrays as a CIFAR python-pickle release under ``root``.

    The same layout and keys as the published files (``data`` N x 3072 uint8 in
    channel-major order, ``labels`` / ``fine_labels``, ``batches.meta`` / ``meta``);
    CIFAR-10's training set is split over ``data_batch_1..5``. Used by the tests and
    benchmarks to build fixtures that the real loader reads (with ``verify_md5=False``:
    the md5 sums are those of the published files).
    """
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if spec.dataset_cls is CIFAR10 else "fine_labels"

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1).astype(np.uint8)
        entry: dict[str, Any] = {"batch_label": name, "data": flat, label_key: [int(v) for v in y]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [int(v) // 5 for v in y]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    train_names = [name for name, _ in spec.dataset_cls.train_list]
    for name, idx in zip(
        train_names, np.array_split(np.arange(len(x_train)), len(train_names)), strict=True
    ):
        dump(name, x_train[idx], y_train[idx])
    dump(spec.dataset_cls.test_list[0][0], x_test, y_test)
    meta_key = spec.dataset_cls.meta["key"]
    meta: dict[str, Any] = {meta_key: [f"class_{i}" for i in range(spec.num_classes)]}
    with open(folder / spec.dataset_cls.meta["filename"], "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder
