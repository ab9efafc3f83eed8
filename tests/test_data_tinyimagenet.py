"""Tiny-ImageNet loader: a small tree in the standard layout, decoded, cached, reloaded."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from divebench.data import tinyimagenet as T
from divebench.data.augment import Normalize, ResizeCenterCropEval, ResizedCropTrain
from divebench.data.base import DataError
from divebench.models.resnet import build_resnet18

CPU = torch.device("cpu")
WNIDS = ["n09999999", "n01443537", "n04067472"]  # deliberately not in sorted order


def _smooth_image(seed: int) -> torch.Tensor:
    """A 64 x 64 image of slow gradients (JPEG keeps it within a few grey levels)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3, 1, 1, generator=g) * 200
    ys = torch.linspace(0, 1, 64).view(1, 64, 1)
    xs = torch.linspace(0, 1, 64).view(1, 1, 64)
    slope = torch.rand(3, 1, 1, generator=g) * 50
    return (a + slope * ys + slope * xs).round().clamp(0, 255).to(torch.uint8)


def _jpeg(img: torch.Tensor, path: Path) -> None:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="JPEG", quality=95)


def _write_tree(root: Path, per_class: int = 3, n_val: int = 6) -> dict[str, Any]:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    truth: dict[str, Any] = {"train": {}, "val": []}
    seed = 0
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(per_class):
            img = _smooth_image(seed)
            seed += 1
            _jpeg(img, images / f"{wnid}_{k}.JPEG")
            truth["train"][(wnid, k)] = img
        # the real tree also holds a boxes file per class; the loader must ignore it
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(n_val):
        img = _smooth_image(1000 + k)
        wnid = WNIDS[k % len(WNIDS)]
        _jpeg(img, folder / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        truth["val"].append((img, wnid))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return truth


def _opts(root: Path, **kw: Any) -> dict[str, Any]:
    return {"data": "real", "data_dir": str(root), **kw}


def test_tree_decodes_to_uint8_with_sorted_wnid_labels(tmp_path: Path) -> None:
    truth = _write_tree(tmp_path)
    b = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    assert b.x_train.shape == (9, 3, 64, 64) and b.x_train.dtype == torch.uint8
    assert b.x_val.shape == (6, 3, 64, 64)
    order = sorted(WNIDS)
    assert b.num_classes == 3
    assert b.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert b.y_val.tolist() == [order.index(w) for _, w in truth["val"]]
    # pixels: the JPEG round trip of each image (lossy, but close on smooth images)
    i = 0
    for wnid in order:
        for k in range(3):
            diff = (b.x_train[i].float() - truth["train"][(wnid, k)].float()).abs()
            assert diff.mean() < 1.5, (wnid, k)
            i += 1
    for j, (img, _) in enumerate(truth["val"]):
        assert (b.x_val[j].float() - img.float()).abs().mean() < 1.5


def test_grey_jpegs_become_rgb(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    grey = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG"
    Image.new("L", (64, 64), color=77).save(grey, format="JPEG")
    b = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    k = sorted(WNIDS).index(WNIDS[0]) * 3 + 1
    assert (b.x_train[k].int() - 77).abs().max() <= 1


def test_cache_is_written_atomically_and_reloaded_without_the_jpegs(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    first = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    folder = tmp_path / "tiny-imagenet-200"
    assert (folder / T.CACHE_NAME).is_file()
    assert not list(folder.glob("*.tmp"))  # no temporary file left behind
    shutil.rmtree(folder / "train")
    shutil.rmtree(folder / "val")
    second = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_val, second.y_val)


def test_unreadable_cache_is_rebuilt_from_the_jpegs(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    first = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    cache = tmp_path / "tiny-imagenet-200" / T.CACHE_NAME
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="rebuilding"):
        again = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    assert torch.equal(first.x_train, again.x_train)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").unlink()  # the JPEG tree is gone
    cache.write_bytes(b"junk")
    with pytest.raises(DataError, match="cache .* is unreadable"):
        T.build_tinyimagenet(_opts(tmp_path), CPU, 0)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_jpeg_is_named(damage: str, tmp_path: Path) -> None:
    _write_tree(tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_4.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg" * 20)
    with pytest.raises(DataError) as err:
        T.build_tinyimagenet(_opts(tmp_path), CPU, 0)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tiny-imagenet-200" / T.CACHE_NAME).exists()


def test_wrong_image_size_is_named(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    bad = tmp_path / "tiny-imagenet-200" / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_0.JPEG"
    _jpeg(torch.zeros(3, 32, 48, dtype=torch.uint8), bad)
    with pytest.raises(DataError, match=rf"{bad}.* is 48 x 32 px"):
        T.build_tinyimagenet(_opts(tmp_path), CPU, 0)


def test_missing_tree_gives_one_line_with_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        T.build_tinyimagenet(_opts(tmp_path / "none"), CPU, 0)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"Tiny-ImageNet files not found under {tmp_path / 'none'}" in msg
    assert "tiny-imagenet-200/wnids.txt" in msg and "download=true" in msg


def test_download_fetches_checks_and_extracts_the_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_server: tuple[str, Path]
) -> None:
    # the official archive's layout, served over loopback HTTP: torchvision's real
    # download, md5 check and extraction run, without a network
    base_url, served = local_server
    _write_tree(tmp_path / "src")
    archive = served / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "src").rglob("*")):
            zf.write(f, f.relative_to(tmp_path / "src").as_posix())
    monkeypatch.setattr(T, "URL", f"{base_url}/tiny-imagenet-200.zip")
    monkeypatch.setattr(T, "ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    b = T.build_tinyimagenet(_opts(tmp_path / "data", download=True, preset="native"), CPU, 0)
    assert b.train_size == 9 and (tmp_path / "data" / "tiny-imagenet-200" / T.CACHE_NAME).is_file()
    # a wrong checksum is refused in one line
    monkeypatch.setattr(T, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DataError, match="could not download Tiny-ImageNet") as err:
        T.build_tinyimagenet(_opts(tmp_path / "other", download=True), CPU, 0)
    assert "\n" not in str(err.value)


def test_annotation_problems_are_named(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 7 names no known class"):
        T.build_tinyimagenet(_opts(tmp_path), CPU, 0)
    ann.write_text("val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_99.JPEG .* is missing"):
        T.build_tinyimagenet(_opts(tmp_path), CPU, 0)


def test_presets_set_sizes_transforms_and_the_model_head(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    paper = T.build_tinyimagenet(_opts(tmp_path, preset=""), CPU, 0)  # default = paper
    assert paper.info["preset"] == "paper" and paper.input_shape == (3, 224, 224)
    assert (
        isinstance(paper.train_transform, ResizedCropTrain)
        and paper.train_transform.out_size == 224
    )
    assert isinstance(paper.eval_transform, ResizeCenterCropEval)
    gen = torch.Generator().manual_seed(0)
    assert paper.train_transform(paper.x_train, gen).shape == (9, 3, 224, 224)
    assert paper.eval_transform(paper.x_val).shape == (6, 3, 224, 224)
    native = T.build_tinyimagenet(_opts(tmp_path, preset="native"), CPU, 0)
    assert native.input_shape == (3, 64, 64) and isinstance(native.eval_transform, Normalize)
    assert native.train_transform(native.x_train, gen).shape == (9, 3, 64, 64)
    with pytest.raises(DataError, match="expected paper | native"):
        T.build_tinyimagenet(_opts(tmp_path, preset="big"), CPU, 0)
    # the model builder follows the same preset rule: the paper kept the 1000-way head
    opts = {"dataset": "tinyimagenet", "preset": ""}
    assert build_resnet18(200, (3, 224, 224), opts).fc.out_features == 1000
    assert build_resnet18(200, (3, 64, 64), {**opts, "preset": "native"}).fc.out_features == 200


def test_subset_is_a_fixed_sample_across_classes(tmp_path: Path) -> None:
    _write_tree(tmp_path, per_class=8)
    a = T.build_tinyimagenet(_opts(tmp_path, subset=12, preset="native"), CPU, 0)
    b = T.build_tinyimagenet(_opts(tmp_path, subset=12, preset="native"), CPU, 5)
    assert a.train_size == 12 and torch.equal(a.x_train, b.x_train)  # seed-independent
    assert len(a.y_train.unique()) == 3  # not just the first class
    assert a.y_val.shape[0] == 6


def test_fake_data_has_the_real_shapes() -> None:
    b = T.build_tinyimagenet({"data": "fake", "subset": 1000}, CPU, 1)
    assert b.x_train.shape == (1000, 3, 64, 64) and b.x_train.dtype == torch.uint8
    assert b.x_val.shape == (200, 3, 64, 64)  # max(1000 // 5, 64)
    assert b.num_classes == 200 and b.input_shape == (3, 224, 224)
    assert int(b.y_train.max()) == 199
    native = T.build_tinyimagenet({"data": "fake", "subset": 1000, "preset": "native"}, CPU, 1)
    assert native.input_shape == (3, 64, 64) and torch.equal(native.x_train, b.x_train)


def test_registered_as_builtin() -> None:
    from divebench import plugins

    reg = plugins.load_plugins(strict=True)
    builder = reg.datasets["tinyimagenet"][0]  # imported on first use (builtins._lazy)
    assert (builder.__module__, builder.__name__) == ("divebench.data.tinyimagenet", "build_tinyimagenet")
