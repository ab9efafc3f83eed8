"""``divebench check-stats``: the exact provider against a float64 per-sample reference
on a suite's model and data; passes on the built-in suites, fails naming the parameter
on a model it refuses or a provider that is wrong."""

from __future__ import annotations

import re

import pytest
import torch.nn.functional as F
from conftest import run_cli
from torch import nn

from divebench.hookspecs import hookimpl
from divebench.stats import exact as exact_mod


def _rows(output: str) -> dict[str, float]:
    """parameter -> relative error, from the printed table."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^(\S+)\s+\S+\s+\S+\s+(\S+)\s+(ok|DISAGREES)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.mark.parametrize("args", [("suite=mnist1d",), ("suite=synthetic", "batches=3"),
                                  ("suite=modarith", "batch_size=8")])
def test_builtin_suites_agree(args) -> None:
    res = run_cli("check-stats", *args)
    assert res.exit_code == 0, res.output
    assert "all parameters agree" in res.output and "(float64)" in res.output
    rows = _rows(res.output)
    assert rows and max(rows.values()) < 1e-9  # float64 on both sides: rounding only


def test_float32_is_checked_with_its_own_tolerance() -> None:
    res = run_cli("check-stats", "suite=mnist1d", "dtype=float32")
    assert res.exit_code == 0, res.output
    assert "(float32)" in res.output and "tolerance 0.001" in res.output
    assert 0 < max(_rows(res.output).values()) < 1e-5


@pytest.mark.slow
def test_the_cifar_resnet_agrees_on_fake_data() -> None:
    res = run_cli("check-stats", "suite=cifar10", "data=fake", "subset=32", "batch_size=2", "batches=1")
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert "layer4.1.bn2.weight" in rows and "linear.weight" in rows and max(rows.values()) < 1e-9


class ChildUsedFunctionally(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(F.linear(x.flatten(1), self.proj.weight, self.proj.bias).tanh())


class BrokenModelPlugin:
    @staticmethod
    @hookimpl
    def divebench_models():
        return {"functional_child": lambda classes, shape, options: ChildUsedFunctionally(classes, shape[-1])}


def test_a_model_the_provider_refuses_fails_naming_the_parameter(register_plugin) -> None:
    register_plugin("broken", BrokenModelPlugin)
    res = run_cli("check-stats", "suite=synthetic", "model=functional_child")
    assert res.exit_code == 1, res.output
    assert "REFUSED: parameter proj.weight gets a gradient outside the forward" in res.output


def test_a_wrong_provider_fails_naming_the_parameters(monkeypatch) -> None:
    """A conv norm sampler off by 1% (a stand-in for a wrong sampler)."""
    original = exact_mod.conv_norm_sample

    def off_by_one_percent(layer, activations, backprops):
        return {p: n * 1.005 for p, n in original(layer, activations, backprops).items()}

    monkeypatch.setattr(exact_mod, "conv_norm_sample", off_by_one_percent)
    res = run_cli("check-stats", "suite=mnist1d", "batches=1")
    assert res.exit_code == 1, res.output
    rows = _rows(res.output)
    assert rows["conv1.weight"] == pytest.approx(0.010025, rel=0.01)  # 1.005² - 1
    assert rows["linear.weight"] < 1e-9
    assert "DISAGREE: conv1.weight, conv1.bias, conv2.weight" in res.output


def test_bad_input_is_one_line_exit_2() -> None:
    for args, msg in ((("batches=x",), "batches='x' is not valid"),
                      (("tolerance=-1",), "tolerance='-1' is not valid"),
                      (("bn=odd",), "bn='odd' is not valid"),
                      (("policy=sgd",), "policy= has no meaning for check-stats")):
        res = run_cli("check-stats", "suite=mnist1d", *args)
        assert res.exit_code == 2, res.output
        assert msg in res.output and len(res.output.strip().splitlines()) == 1


class TokenModelPlugin:
    @staticmethod
    @hookimpl
    def divebench_models():
        return {"tokens_only": lambda classes, shape, options: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(),
                                                                            nn.Linear(4 * shape[0], classes))}


def test_a_model_that_fails_on_the_data_is_bad_input_not_a_refusal(register_plugin) -> None:
    register_plugin("tokens", TokenModelPlugin)
    res = run_cli("check-stats", "suite=synthetic", "model=tokens_only")
    assert res.exit_code == 2, res.output
    assert "model=tokens_only failed on suite synthetic's data" in res.output
    assert len(res.output.strip().splitlines()) == 1
