"""CIFAR-10/100 loaders: fixtures in the real python-pickle format, read by torchvision."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from divebench.data import cifar
from divebench.data.augment import CifarTrain, NoAugment, Normalize
from divebench.data.base import DataError
from divebench.data.paths import resolve_data_dir

CPU = torch.device("cpu")


def _write(
    spec: cifar.CifarSpec, root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, spec.num_classes, n_train),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, spec.num_classes, n_test),
    }
    cifar.write_cifar_files(spec, root, **arrays)
    return arrays


def _opts(root: Path, **kw: Any) -> dict[str, Any]:
    # verify_md5=False: the fixture files cannot have the published md5 sums
    return {"data": "real", "data_dir": str(root), "verify_md5": False, **kw}


@pytest.mark.parametrize(
    "spec", [cifar.CIFAR10_SPEC, cifar.CIFAR100_SPEC], ids=["cifar10", "cifar100"]
)
def test_real_files_load_through_torchvision_into_uint8_nchw(
    spec: cifar.CifarSpec, tmp_path: Path
) -> None:
    arrays = _write(spec, tmp_path)
    b = cifar.build_cifar(spec, _opts(tmp_path), CPU, seed=0)
    assert b.x_train.dtype == torch.uint8 and b.x_train.shape == (60, 3, 32, 32)
    assert b.y_train.dtype == torch.int64
    assert np.array_equal(b.x_train.permute(0, 2, 3, 1).numpy(), arrays["x_train"])
    assert np.array_equal(b.y_train.numpy(), arrays["y_train"])
    # validation is the whole test split
    assert np.array_equal(b.x_val.permute(0, 2, 3, 1).numpy(), arrays["x_test"])
    assert np.array_equal(b.y_val.numpy(), arrays["y_test"])
    assert b.num_classes == spec.num_classes and b.input_shape == (3, 32, 32)
    assert b.info["source"] == f"torchvision.datasets.{spec.dataset_cls.__name__}"
    assert b.info["md5_verified"] is False
    json.dumps(b.info)  # provenance must serialise into env.json
    # the same files, read by torchvision's class directly (its md5 check aside)
    ds = cifar._unverified(spec.dataset_cls)(str(tmp_path), train=True)
    assert np.array_equal(ds.data, arrays["x_train"])
    # transforms: the paper's recipe per dataset
    assert isinstance(b.train_transform, CifarTrain)
    assert b.train_transform.rotation_deg == (15.0 if spec is cifar.CIFAR100_SPEC else 0.0)
    assert isinstance(b.eval_transform, Normalize)
    out = b.train_transform(b.x_train[:8], torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32


def test_subset_keeps_the_first_n_training_samples_and_all_of_validation(tmp_path: Path) -> None:
    arrays = _write(cifar.CIFAR10_SPEC, tmp_path)
    b = cifar.build_cifar10(_opts(tmp_path, subset=25), CPU, 0)
    assert b.train_size == 25
    assert np.array_equal(b.y_train.numpy(), arrays["y_train"][:25])
    assert b.y_val.shape[0] == 20


def test_augment_false_trains_on_the_evaluation_transform(tmp_path: Path) -> None:
    _write(cifar.CIFAR10_SPEC, tmp_path)
    b = cifar.build_cifar10(_opts(tmp_path, augment=False), CPU, 0)
    assert isinstance(b.train_transform, NoAugment)
    x = b.x_train[:4]
    assert torch.equal(b.train_transform(x, torch.Generator()), b.eval_transform(x))


def test_published_md5_sums_are_checked_by_default(tmp_path: Path) -> None:
    _write(cifar.CIFAR10_SPEC, tmp_path)
    with pytest.raises(DataError) as err:
        cifar.build_cifar10({"data_dir": str(tmp_path)}, CPU, 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "md5" in msg


@pytest.mark.parametrize(
    "spec", [cifar.CIFAR10_SPEC, cifar.CIFAR100_SPEC], ids=["cifar10", "cifar100"]
)
def test_missing_files_give_one_line_with_the_way_out(
    spec: cifar.CifarSpec, tmp_path: Path
) -> None:
    with pytest.raises(DataError) as err:
        cifar.build_cifar(spec, {"data_dir": str(tmp_path / "empty")}, CPU, 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{spec.title} files not found under {tmp_path / 'empty'}" in msg
    assert f"{spec.folder}/" in msg and "download=true" in msg and "DIVEBENCH_DATA" in msg


def test_one_missing_batch_is_named(tmp_path: Path) -> None:
    _write(cifar.CIFAR10_SPEC, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        cifar.build_cifar10(_opts(tmp_path), CPU, 0)


@pytest.mark.parametrize("victim", ["data_batch_3", "test_batch", "batches.meta"])
def test_truncated_pickle_is_named(victim: str, tmp_path: Path) -> None:
    _write(cifar.CIFAR10_SPEC, tmp_path)
    path = tmp_path / "cifar-10-batches-py" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        cifar.build_cifar10(_opts(tmp_path), CPU, 0)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    # CIFAR-100 labels in CIFAR-10 files
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    cifar.write_cifar_files(cifar.CIFAR10_SPEC, tmp_path, x, np.full(10, 42), x, np.zeros(10))
    with pytest.raises(DataError, match=r"labels outside \[0, 10\)"):
        cifar.build_cifar10(_opts(tmp_path), CPU, 0)


def test_download_fetches_and_extracts_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_server: tuple[str, Path]
) -> None:
    # A local archive served over loopback HTTP exercises torchvision's real download,
    # md5 and extraction code without a network.
    base_url, served = local_server
    src = tmp_path / "src"
    arrays = _write(cifar.CIFAR10_SPEC, src)
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "url", f"{base_url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    dest = tmp_path / "data"
    b = cifar.build_cifar10(_opts(dest, download=True), CPU, 0)
    assert (dest / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert np.array_equal(b.y_train.numpy(), arrays["y_train"])


def test_failed_download_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_server: tuple[str, Path]
) -> None:
    monkeypatch.setattr(CIFAR100, "url", f"{local_server[0]}/nowhere.tar.gz")
    with pytest.raises(DataError) as err:
        cifar.build_cifar100(_opts(tmp_path / "data", download=True), CPU, 0)
    assert str(err.value).startswith(f"could not download CIFAR-100 from {local_server[0]}/")
    assert "404" in str(err.value) and "\n" not in str(err.value)


def test_data_dir_defaults_to_env_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIVEBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_dir({"data_dir": ""}) == tmp_path / "env"
    assert resolve_data_dir({"data_dir": str(tmp_path / "x")}) == tmp_path / "x"
    monkeypatch.delenv("DIVEBENCH_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir({}) == tmp_path / "home" / ".cache" / "divebench"


# ----------------------------------------------------------------------------- data=fake


@pytest.mark.parametrize(
    ("builder", "classes"),
    [(cifar.build_cifar10, 10), (cifar.build_cifar100, 100)],
    ids=["cifar10", "cifar100"],
)
def test_fake_data_has_the_real_shapes(builder: Any, classes: int, tmp_path: Path) -> None:
    b = builder({"data": "fake", "subset": 512, "data_dir": str(tmp_path)}, CPU, 3)
    assert b.x_train.shape == (512, 3, 32, 32) and b.x_train.dtype == torch.uint8
    assert b.x_val.shape == (102, 3, 32, 32)  # max(512 // 5, 64)
    assert b.num_classes == classes and b.input_shape == (3, 32, 32)
    assert set(b.y_train.unique().tolist()) == set(range(min(classes, 512)))
    assert b.info["source"] == "fake"
    assert not any(tmp_path.iterdir())  # no files read or written
    # subset=0 gives the full split sizes; larger subsets cap validation at 10,000
    assert builder({"data": "fake", "subset": 20_000}, CPU, 0).y_val.shape[0] == 4000
    again = builder({"data": "fake", "subset": 512}, CPU, 3)
    assert torch.equal(again.x_train, b.x_train) and torch.equal(again.y_val, b.y_val)
    assert not torch.equal(builder({"data": "fake", "subset": 512}, CPU, 4).x_train, b.x_train)


def test_fake_cifar10_full_size_and_learnable() -> None:
    b = cifar.build_cifar10({"data": "fake"}, CPU, 0)
    assert b.train_size == 50_000 and b.y_val.shape[0] == 10_000
    # nearest class-mean colour, fitted on train, scored on validation: learnable
    means = torch.stack([b.x_train[b.y_train == k].float().mean((0, 2, 3)) for k in range(10)])
    val_colour = b.x_val.float().mean((2, 3))
    pred = torch.cdist(val_colour, means).argmin(1)
    assert (pred == b.y_val).float().mean() > 0.95
    # while one pixel alone says little
    pixel = b.x_val[:, :, 0, 0].float()
    assert (torch.cdist(pixel, means).argmin(1) == b.y_val).float().mean() < 0.9


def test_bad_preset_and_subset_are_refused() -> None:
    with pytest.raises(DataError, match="preset='native'"):
        cifar.build_cifar10({"data": "fake", "preset": "native"}, CPU, 0)
    with pytest.raises(DataError, match="subset=-1"):
        cifar.build_cifar10({"data": "fake", "subset": -1}, CPU, 0)


@pytest.mark.slow
def test_registered_and_runs_end_to_end_with_fake_data(tmp_path: Path) -> None:
    from conftest import run_cli

    from divebench import plugins

    reg = plugins.load_plugins(strict=True)
    builder = reg.datasets["cifar10"][0]  # imported on first use (builtins._lazy)
    assert (builder.__module__, builder.__name__) == ("divebench.data.cifar", "build_cifar10")
    builder = reg.datasets["cifar100"][0]  # imported on first use (builtins._lazy)
    assert (builder.__module__, builder.__name__) == ("divebench.data.cifar", "build_cifar100")
    res = run_cli(
        "run",
        "suite=synthetic",
        "dataset=cifar10",
        "data=fake",
        "subset=256",
        "model=small_cnn",
        "policy=sgd-small",
        "seeds=0",
        "epochs=1",
        "batch_size=64",
        f"results_dir={tmp_path}",
        "wandb=off",
        "-q",
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()]
    assert rows[-1]["samples_seen"] == 256 and 0.0 <= rows[-1]["val_acc"] <= 1.0
