"""Same-run ratio gate: the device-resident CIFAR pipeline against a torchvision DataLoader.

Both sides deliver the same thing, an epoch of augmented, normalised CIFAR-10 training
batches of 128 on the training device, from the same files (a CIFAR-10 release written
in the real python-pickle format into a temporary folder and read by torchvision's
``CIFAR10`` class):

- subject, divebench: the split held as one uint8 NCHW tensor on the device
  (``dataset=cifar10``'s builder); per batch, index 128 samples of a seeded permutation
  and run ``train_transform`` (random crop 32 with 4-px zero padding, horizontal flip,
  normalisation) as batched tensor ops.
- reference, the textbook loader: ``DataLoader(CIFAR10(transform=Compose([RandomCrop(32,
  padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(...)])), batch_size=128,
  shuffle=True, num_workers=2, persistent_workers=True)``, batches moved to the device
  (pinned memory on CUDA). Persistent workers and an untimed warm-up epoch leave out the
  worker start-up a fresh loader pays each epoch: the reference is timed at its best.

Timer: wall time. The reference's work happens in its worker processes, which the CPU
time of this process would not see. The two sides alternate (ABBA) after one warm-up
each, and the gate's ratio is the median of the paired throughput ratios, so a drift of
the machine's load hits both alike. The subject runs torch on one thread (the reference
has two worker processes plus this one): on a CPU the gate holds with head-room to
spare. On a GPU the gap is far wider (the subject's per-batch work is a few kernels).

Gate ``pipeline_vs_dataloader``: subject images/s over reference images/s must be at
least the threshold in bench/thresholds.py.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gates import median_ratio  # bench/ is on sys.path under pytest (rootdir-less tests)
from thresholds import THRESHOLDS
from torch.utils.data import DataLoader
from torchvision import transforms

from divebench.data import cifar
from divebench.data.augment import CIFAR10_MEAN, CIFAR10_STD
from divebench.data.fake import fake_images

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_IMAGES = 10_240  # 80 batches of 128 per epoch
BATCH = 128
REPS = 4  # ABBA pairs after the warm-up: about 30-40 s in all on the 2-core machine


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 release of N_IMAGES training images in the real format."""
    root = tmp_path_factory.mktemp("cifar")
    x, y = fake_images(N_IMAGES + 512, 10, (3, 32, 32), 0, 0, torch.device("cpu"))
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    cifar.write_cifar_files(
        cifar.CIFAR10_SPEC, root, x_nhwc[:N_IMAGES], y[:N_IMAGES].numpy(),
        x_nhwc[N_IMAGES:], y[N_IMAGES:].numpy(),
    )  # fmt: skip
    return root


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_subject(root: Path) -> tuple[Any, int]:
    """divebench's pipeline: an epoch function returning its wall seconds, and the n."""
    # verify_md5=False: files written here cannot carry the published md5 sums
    bundle = cifar.build_cifar10({"data_dir": str(root), "verify_md5": False}, DEVICE, 0)
    gen = torch.Generator().manual_seed(0)
    n = bundle.train_size

    def epoch() -> float:
        _sync()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(DEVICE)
        for start in range(0, n, BATCH):
            idx = perm[start : start + BATCH]
            x = bundle.train_transform(bundle.x_train[idx], gen)
            y = bundle.y_train[idx]
        _sync()
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.device == x.device
        return time.perf_counter() - t0

    return epoch, n


def make_reference(root: Path) -> tuple[Any, DataLoader]:
    """The torchvision DataLoader pipeline: an epoch function and its loader."""
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    dataset = cifar._unverified(cifar.CIFAR10_SPEC.dataset_cls)(
        str(root), train=True, transform=transform
    )
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True,
        pin_memory=DEVICE.type == "cuda", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip

    def epoch() -> float:
        _sync()
        t0 = time.perf_counter()
        for x_cpu, y_cpu in loader:
            x = x_cpu.to(DEVICE, non_blocking=True)
            y = y_cpu.to(DEVICE, non_blocking=True)
        _sync()
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and y.device == x.device
        return time.perf_counter() - t0

    return epoch, loader


def pipeline_gate(root: Path) -> dict[str, Any]:
    """Run the ABBA comparison; return images/s of both sides and the median ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        subject, n = make_subject(root)
        reference, loader = make_reference(root)
        subject(), reference()  # warm-up: allocator, worker start-up
        subj_s: list[float] = []
        ref_s: list[float] = []
        for r in range(REPS):
            pair = (subject, reference) if r % 2 == 0 else (reference, subject)
            times = {f: f() for f in pair}
            subj_s.append(times[subject])
            ref_s.append(times[reference])
    finally:
        torch.set_num_threads(threads)
        del loader  # persistent workers end with the loader
    return {
        "gate": "pipeline_vs_dataloader",
        "device": str(DEVICE),
        "images_per_epoch": n,
        "subject_images_per_s": n / statistics.median(subj_s),
        "reference_images_per_s": n / statistics.median(ref_s),
        "subject_s": subj_s,
        "reference_s": ref_s,
        # images/s ratio (n/s) / (n/r) = r/s, as a median over ABBA blocks (bench/gates.py)
        "ratio": median_ratio(ref_s, subj_s),
    }


def test_pipeline_vs_dataloader(benchmark: Any, cifar_files: Path) -> None:
    result = benchmark.pedantic(pipeline_gate, args=(cifar_files,), rounds=1, iterations=1)
    threshold = THRESHOLDS["pipeline_vs_dataloader"][0]
    benchmark.extra_info.update(result, threshold=threshold)
    message = (
        f"gate pipeline_vs_dataloader on {result['device']}: device-resident "
        f"{result['subject_images_per_s']:.0f} images/s, DataLoader "
        f"{result['reference_images_per_s']:.0f} images/s, ratio {result['ratio']:.1f}x "
        f"(threshold {threshold:.1f}x, {REPS} interleaved epochs each, median over ABBA blocks)"
    )
    print(message)
    assert result["ratio"] >= threshold, message


def test_both_pipelines_see_the_same_images(cifar_files: Path) -> None:
    """Without augmentation the two sides produce identical normalised batches."""
    bundle = cifar.build_cifar10(
        {"data_dir": str(cifar_files), "verify_md5": False, "augment": False},
        torch.device("cpu"),
        0,
    )
    plain = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )
    dataset = cifar._unverified(cifar.CIFAR10_SPEC.dataset_cls)(str(cifar_files), transform=plain)
    idx = np.array([0, 1, 777, N_IMAGES - 1])
    ours = bundle.train_transform(bundle.x_train[torch.from_numpy(idx)], torch.Generator())
    theirs = torch.stack([dataset[int(i)][0] for i in idx])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
