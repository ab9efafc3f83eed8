"""The exact provider's invariant: every trainable parameter that gets a gradient gets
its per-sample norms from the layer calls that use it, all of its uses covered; a
parameter shared between calls is summed per sample before its norm; anything else is
refused with one line naming the parameter. Every number is checked against
``loop_sq_norms`` (float64, one sample at a time, ``torch.autograd.grad``), which
shares no code with the provider."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebench.stats import ExactProvider
from divebench.stats.exact import StatisticsRefused
from divebench.stats.reference import drive_epoch, loop_sq_norms

RTOL = 1e-5


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, **kw):
    provider = ExactProvider()
    module = provider.wrap(model)
    (stats,) = drive_epoch(provider, module, torch.optim.SGD(model.parameters(), lr=0.0), x, y, batch_size, **kw)
    return stats


def check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> None:
    ref = loop_sq_norms(model, x, y, kw.get("loss_fn", F.cross_entropy)).sum().item()
    stats = measure(model, x, y, **kw)
    assert stats.sum_sq_norms == pytest.approx(ref, rel=RTOL)


def feats(n: int = 16, d: int = 12, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def tokens(n: int = 16, t: int = 6, vocab: int = 11, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, classes, (n,), generator=g)


class SharedLinear(nn.Module):
    """One weight used by two nn.Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.b(self.a(x).tanh()).tanh())


class TiedEmbedding(nn.Module):
    """A language-model head tied to the embedding (as GPT-2 does)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(self.mix(self.emb(t)).tanh().mean(dim=1))


class TwiceApplied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)

    def forward(self, x):
        return self.lin(self.lin(x).relu())[:, :5]


def test_a_weight_shared_by_two_linears_is_summed_before_its_norm() -> None:
    torch.manual_seed(0)
    check(SharedLinear(), *feats())


def test_a_tied_embedding_and_output_weight() -> None:
    torch.manual_seed(0)
    x, _ = tokens()
    y = torch.randint(0, 11, (16,), generator=torch.Generator().manual_seed(1))
    check(TiedEmbedding(), x, y)


def test_a_layer_applied_twice_per_forward() -> None:
    torch.manual_seed(0)
    check(TwiceApplied(), *feats())


def test_shared_parameters_over_micro_batches_and_ragged_batches() -> None:
    torch.manual_seed(0)
    x, y = feats(n=21)
    check(SharedLinear(), x, y, batch_size=8, max_micro_batch=3)


class FunctionalChildOnly(nn.Module):
    """The child's weight used through F.linear in the parent; the child never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(F.linear(x, self.proj.weight, self.proj.bias).tanh())


class FunctionalAndModule(FunctionalChildOnly):
    """The child runs, and its weight is also used through F.linear in the parent."""

    def forward(self, x):
        h = self.proj(x).tanh()
        return self.head(F.linear(h, self.proj.weight).tanh())


@pytest.mark.parametrize("model_cls", [FunctionalChildOnly, FunctionalAndModule])
def test_a_parameter_used_outside_its_layer_is_refused_with_its_name(model_cls) -> None:
    torch.manual_seed(0)
    with pytest.raises(StatisticsRefused, match=r"parameter proj\.weight .*(outside)") as err:
        measure(model_cls(), *feats())
    assert "\n" not in str(err.value)


def test_a_parameter_used_only_in_the_loss_is_refused() -> None:
    """The model's output does not depend on it, so no layer call sees it; autograd
    still gives it a gradient: the post-accumulate check names it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 5))
    model.temperature = nn.Parameter(torch.ones(()))

    def loss_fn(out, y):
        return F.cross_entropy(out * model.temperature, y)

    with pytest.raises(StatisticsRefused, match=r"parameter temperature received a gradient but no per-sample"):
        measure(model, *feats(), loss_fn=loss_fn)


def test_embedding_padding_rows_get_no_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8, padding_idx=0), nn.Flatten(), nn.Linear(48, 5))
    x, y = tokens()
    x[:, :2] = 0  # plenty of padding
    check(model, x, y)


def test_layernorm_without_bias_and_without_affine() -> None:
    torch.manual_seed(0)
    for ln in (nn.LayerNorm(12, bias=False), nn.LayerNorm(12, elementwise_affine=False), nn.LayerNorm(12)):
        check(nn.Sequential(nn.Linear(12, 12), ln, nn.Linear(12, 5)), *feats())


def test_linear_on_four_dimensional_inputs() -> None:
    """Found while building the invariant: Opacus' Linear ghost-norm sampler returns
    nothing for inputs of 4 or more dimensions (it handles 2 and 3), so the weight got a
    gradient and no norm. The provider falls back to the per-sample gradient."""
    from opacus.grad_sample.linear import compute_linear_norm_sample

    layer = nn.Linear(4, 3)
    assert compute_linear_norm_sample(layer, [torch.randn(2, 5, 6, 4)], torch.randn(2, 5, 6, 3)) == {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (2, 3, 2)), nn.Linear(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(24, 5))
    check(model, *feats())


class TwoInputs(nn.Module):
    """A layer without a per-sample sampler (torch.func fallback) called with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(12))

    def forward(self, x, mask=None):
        return x * self.scale if mask is None else x * self.scale * mask


class UsesTwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = TwoInputs()
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.gate(x, mask=(x > 0).float()))


def test_a_fallback_layer_called_with_more_than_its_input_is_refused() -> None:
    """torch.func replays a layer with its first input only: with a mask that would be
    silently wrong, so it is refused, naming the layer."""
    torch.manual_seed(0)
    with pytest.raises(StatisticsRefused, match=r"layer gate \(TwoInputs\) is called with 1 positional and 1 keyword"):
        measure(UsesTwoInputs(), *feats())
    model = nn.Sequential(TwoInputs(), nn.Linear(12, 5))  # one input: measured, and right
    check(model, *feats())


class Recurrent(nn.Module):
    """Embedding, a 2-layer recurrent layer, a head on the last output and (LSTM) on the
    final cell state too, with a learned initial state: every output carries gradient."""

    def __init__(self, kind: str, use_state: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = getattr(nn, kind)(6, 7, num_layers=2, batch_first=True)
        self.h0 = nn.Linear(1, 14)  # the initial state, from a learned layer
        self.head = nn.Linear(7, 5)
        self.use_state = use_state

    def forward(self, t):
        n = t.shape[0]
        h0 = self.h0(torch.ones(n, 1, dtype=self.h0.weight.dtype)).reshape(n, 2, 7).transpose(0, 1).contiguous()
        hx = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        out, state = self.rnn(self.emb(t), hx if self.use_state else None)
        last = state[0] if isinstance(state, tuple) else state
        return self.head(out[:, -1] + last[-1]) if self.use_state else self.head(out[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("use_state", [False, True], ids=["output", "output+state"])
def test_recurrent_layers_are_measured_exactly(kind, use_state) -> None:
    torch.manual_seed(0)
    x, y = tokens(n=12)
    check(Recurrent(kind, use_state), x, y, batch_size=6)


def test_recurrent_layers_that_cannot_be_replayed_are_refused() -> None:
    x, y = tokens(n=8)
    model = Recurrent("GRU", False)
    model.rnn.dropout = 0.2
    with pytest.raises(StatisticsRefused, match=r"layer rnn \(GRU\) has dropout 0\.2 between its layers"):
        measure(model, x, y)
    model = Recurrent("LSTM", False)
    model.rnn.batch_first = False
    with pytest.raises(StatisticsRefused, match=r"layer rnn \(LSTM\) needs batch_first=True"):
        measure(model, x, y)


class Encoder(nn.Module):
    """Token embedding, position embedding, a TransformerEncoderLayer (its
    MultiheadAttention, feed-forward Linears and LayerNorms), a head on the last token."""

    def __init__(self, vocab: int = 11, dim: int = 16, layer: str = "encoder") -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(6, dim)
        if layer == "encoder":
            self.block = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        else:
            self.block = nn.TransformerDecoderLayer(dim, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 5)
        self.kind = layer

    def forward(self, t):
        h = self.emb(t) + self.pos(torch.arange(t.shape[1]).expand_as(t))
        if self.kind == "encoder":
            mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
            h = self.block(h, src_mask=mask, src_key_padding_mask=(t == 0))
        else:
            h = self.block(h, h.flip(1))
        return self.head(h[:, -1])


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_transformer_layers_are_measured_exactly(layer) -> None:
    """nn.MultiheadAttention (causal mask, key padding mask; cross-attention in the
    decoder) through its replay sampler, the feed-forward Linears on 3-D inputs through
    ghost norms, LayerNorms through their sampler."""
    torch.manual_seed(0)
    x, y = tokens()
    x[:3, :2] = 0  # padded positions
    model = Encoder(layer=layer)
    module = ExactProvider().wrap(Encoder(layer=layer))
    hooked = {name for name, _m, *_ in module._hooked}
    assert {"block.self_attn", "block.linear1", "block.norm1", "emb", "pos", "head"} <= hooked
    check(model, x, y)


def test_attention_that_cannot_be_replayed_exactly_is_refused() -> None:
    x, y = tokens()
    model = Encoder()
    model.block.self_attn.dropout = 0.1
    with pytest.raises(StatisticsRefused, match=r"layer block\.self_attn \(MultiheadAttention\) has attention dropout 0\.1"):
        measure(model, x, y)


class RandomInFallback(nn.Module):
    """A top-level parameter makes the whole model one torch.func-sampled layer; its
    dropout cannot be replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(12))
        self.lin = nn.Linear(12, 5)

    def forward(self, x):
        return self.lin(F.dropout(x * self.scale, 0.1, self.training))


def test_random_operations_in_a_replayed_layer_are_refused_naming_it() -> None:
    with pytest.raises(StatisticsRefused, match=r"layer <model> \(RandomInFallback\) uses random operations"):
        measure(RandomInFallback(), *feats())
