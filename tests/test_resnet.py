"""ResNet-18 builders: shapes, parameter counts, channels_last, per-sample hooks."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from divebench.models.resnet import ResNetCifar, build_resnet18, build_resnet18_cifar


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar_resnet18_parameter_count_and_stem() -> None:
    model = build_resnet18_cifar(10, (3, 32, 32), {})
    # kuangliu/pytorch-cifar ResNet18(): 11,173,962 parameters
    assert _n_params(model) == 11_173_962
    assert _n_params(build_resnet18_cifar(100, (3, 32, 32), {})) == 11_173_962 + 90 * 513
    assert isinstance(model, ResNetCifar)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [2, 2, 2, 2]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


def test_cifar_resnet18_output_shape_and_resolution() -> None:
    model = build_resnet18_cifar(100, (3, 32, 32), {}).eval()
    with torch.no_grad():
        stem = model.conv1(torch.randn(1, 3, 32, 32))
        feats = model.layer4(model.layer3(model.layer2(model.layer1(stem))))
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # the stem keeps 32 px until layer2, so the last stage sees 4 x 4
    assert stem.shape == (1, 64, 32, 32) and feats.shape == (1, 512, 4, 4)


def test_torchvision_resnet18_has_torchvisions_parameters() -> None:
    ours = build_resnet18(200, (3, 64, 64), {"dataset": "tinyimagenet", "preset": "native"})
    ref = torchvision.models.resnet18(num_classes=200)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    # and computes the same function (same weights, eval mode)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ours.eval()(x)
        torch.testing.assert_close(out, ref.eval()(x))
    assert out.shape == (2, 200)


def test_resnet18_head_follows_the_paper_preset() -> None:
    assert build_resnet18(200, (3, 224, 224), {"preset": "paper"}).fc.out_features == 1000
    assert (
        build_resnet18(
            200, (3, 224, 224), {"dataset": "tinyimagenet", "preset": ""}
        ).fc.out_features
        == 1000
    )
    assert (
        build_resnet18(10, (3, 32, 32), {"dataset": "cifar10", "preset": ""}).fc.out_features == 10
    )
    with pytest.raises(ValueError, match="image inputs"):
        build_resnet18(10, (40,), {})


@pytest.mark.parametrize(
    "builder", [build_resnet18_cifar, build_resnet18], ids=["cifar", "torchvision"]
)
def test_channels_last_gives_the_same_outputs_and_gradients(builder: object) -> None:
    # float64, so that the two layouts' different summation orders stay far below the
    # tolerance even through train-mode BatchNorm over few positions
    torch.manual_seed(0)
    model = builder(10, (3, 32, 32), {"preset": "native"}).double()  # type: ignore[operator]
    model_cl = builder(10, (3, 32, 32), {"preset": "native"}).double()  # type: ignore[operator]
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.arange(4)
    out = model(x)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-9, atol=1e-9)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(out_cl, y).backward()
    g = dict(model.named_parameters())
    for name, p in model_cl.named_parameters():
        torch.testing.assert_close(p.grad, g[name].grad, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize(
    "builder", [build_resnet18_cifar, build_resnet18], ids=["cifar", "torchvision"]
)
def test_opacus_per_sample_hooks_accept_the_models(builder: object) -> None:
    # torchvision's stock BasicBlock (out += identity, ReLU(inplace=True)) makes autograd
    # refuse Opacus' backward hooks; these builders must not.
    from opacus.grad_sample import GradSampleModule

    import divebench.stats.bn  # noqa: F401 -- registers the BatchNorm grad sampler

    model = builder(10, (3, 32, 32), {"preset": "native"})  # type: ignore[operator]
    wrapped = GradSampleModule(model, strict=False)
    try:
        x = torch.randn(3, 3, 16, 16)
        nn.functional.cross_entropy(wrapped(x), torch.tensor([1, 2, 3])).backward()
        head = model.linear if isinstance(model, ResNetCifar) else model.fc
        assert head.weight.grad_sample.shape == (3, 10, 512)
        # the per-sample terms add up to the batch gradient (mean loss: x batch size)
        torch.testing.assert_close(
            head.weight.grad_sample.sum(0), head.weight.grad * 3, rtol=1e-4, atol=1e-6
        )
    finally:
        wrapped._close()
