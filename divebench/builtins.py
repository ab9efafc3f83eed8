"""divebench's own contributions, registered through the same hooks as any plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from divebench.hookspecs import hookimpl


@hookimpl
def divebench_policies() -> list[type[Any]]:
    from divebench.policies.adabatch import AdaBatch
    from divebench.policies.divebatch import DiveBatch
    from divebench.policies.sgd import FixedSGD
    from divebench.policies.smith import Smith
    from divebench.policies.steprules import GNS, NormTest

    return [FixedSGD, AdaBatch, DiveBatch, GNS, NormTest, Smith]


@hookimpl
def divebench_suites() -> list[Path]:
    from divebench.config import builtin_suite_paths

    return builtin_suite_paths()


@hookimpl
def divebench_datasets() -> dict[str, Any]:
    from divebench.data import cifar, modarith, synthetic, tinyimagenet

    return {
        "synthetic": synthetic.build_synthetic,
        "mnist1d": synthetic.build_mnist1d,
        "cifar10": cifar.build_cifar10,
        "cifar100": cifar.build_cifar100,
        "tinyimagenet": tinyimagenet.build_tinyimagenet,
        "modarith": modarith.build_modarith,
    }


@hookimpl
def divebench_models() -> dict[str, Any]:
    from divebench.models import resnet, small, transformer

    return {
        "logreg": small.build_logreg,
        "mlp": small.build_mlp,
        "mnist1d_cnn": small.build_mnist1d_cnn,
        "small_cnn": small.build_small_cnn,
        "resnet18_cifar": resnet.build_resnet18_cifar,
        "resnet18": resnet.build_resnet18,
        "transformer": transformer.build_transformer,
    }
