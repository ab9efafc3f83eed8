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


def _lazy(module: str, name: str) -> Any:
    """``module.name``, imported when first called: the image datasets and models pull in
    torchvision (over a second at start-up), which a run of the small suites never uses."""

    def builder(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = module
    builder.__doc__ = f"{module}.{name} (imported on first use)"
    return builder


@hookimpl
def divebench_datasets() -> dict[str, Any]:
    return {
        "synthetic": _lazy("divebench.data.synthetic", "build_synthetic"),
        "mnist1d": _lazy("divebench.data.synthetic", "build_mnist1d"),
        "cifar10": _lazy("divebench.data.cifar", "build_cifar10"),
        "cifar100": _lazy("divebench.data.cifar", "build_cifar100"),
        "tinyimagenet": _lazy("divebench.data.tinyimagenet", "build_tinyimagenet"),
        "modarith": _lazy("divebench.data.modarith", "build_modarith"),
    }


@hookimpl
def divebench_models() -> dict[str, Any]:
    return {
        "logreg": _lazy("divebench.models.small", "build_logreg"),
        "mlp": _lazy("divebench.models.small", "build_mlp"),
        "mnist1d_cnn": _lazy("divebench.models.small", "build_mnist1d_cnn"),
        "small_cnn": _lazy("divebench.models.small", "build_small_cnn"),
        "resnet18_cifar": _lazy("divebench.models.resnet", "build_resnet18_cifar"),
        "resnet18": _lazy("divebench.models.resnet", "build_resnet18"),
        "transformer": _lazy("divebench.models.transformer", "build_transformer"),
    }
