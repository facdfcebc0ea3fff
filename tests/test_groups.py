"""The group spec alone (no adapter) expresses gated MLPs, grouped-query attention, fused projections and Conv1D.

Each check compares a compacted module with the dense one in which the dropped groups are zeroed at the input of
``down`` (exact for these modules: a group's rows feed only its own columns of ``H``), and weight scores with a
hand computation. A spec that does not describe its modules is refused before anything is sliced.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_ispasp.adapters.groups import (
    Attr,
    Cut,
    GroupSpec,
    SpecAdapter,
    attention_heads,
    check_group_spec,
    compact_groups,
    fused_attention_heads,
    group_scores,
    neurons,
)
from hf_ispasp.surgery import group_rows

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 32


def _masked(module: nn.Module, down: nn.Module, keep: list[int], width: int, group_size: int) -> nn.Module:
    """A copy of ``module`` whose ``down`` sees zeros in the columns of the groups not in ``keep``."""
    masked = copy.deepcopy(module)
    mask = torch.zeros(width)
    for group in keep:
        mask[group * group_size : (group + 1) * group_size] = 1.0
    target = dict(module.named_modules())
    name = next(n for n, m in target.items() if m is down)
    masked.get_submodule(name).register_forward_pre_hook(lambda _, args: (args[0] * mask, *args[1:]))
    return masked


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2)


def test_group_rows_layouts():
    groups = torch.tensor([0, 2])
    assert group_rows(groups, 3, (2,)).tolist() == [0, 1, 4, 5]
    # fused [q | k | v], 3 heads of 2: head j in each third
    assert group_rows(groups, 3, (2, 2, 2)).tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]
    # fused GQA: 3 KV groups, 2 query heads of 1 per group, then k, v of size 1
    assert group_rows(groups, 3, (2, 1, 1)).tolist() == [0, 1, 4, 5, 6, 8, 9, 11]


# Gated MLP -----------------------------------------------------------------------------------------------------
def _llama_config(**kwargs):
    from transformers import LlamaConfig

    base = dict(hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                num_hidden_layers=1, vocab_size=50)
    config = LlamaConfig(**{**base, **kwargs})
    config._attn_implementation = "eager"
    return config


def test_gated_mlp_two_up_projections():
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(_llama_config(mlp_bias=True)).eval()
    spec = neurons("mlp", "down_proj", "gate_proj", "up_proj")
    assert check_group_spec(mlp, spec) == 37
    expected_scores = (
        _sq(mlp.gate_proj.weight).sum(1) + _sq(mlp.gate_proj.bias) + _sq(mlp.up_proj.weight).sum(1)
        + _sq(mlp.up_proj.bias) + _sq(mlp.down_proj.weight).sum(0)
    )
    torch.testing.assert_close(group_scores(mlp, spec), expected_scores)

    keep = [0, 3, 4, 20, 36]
    masked = _masked(mlp, mlp.down_proj, keep, 37, 1)
    compact_groups(mlp, spec, torch.tensor(keep))
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (5, 5, 5)
    x = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), masked(x))


def test_fused_gate_up_projection():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    mlp = Phi3MLP(Phi3Config(hidden_size=HIDDEN, intermediate_size=37, num_attention_heads=4)).eval()
    spec = neurons("mlp", "down_proj", Cut.fused("gate_up_proj", 1, 2))
    rows = _sq(mlp.gate_up_proj.weight).sum(1)
    torch.testing.assert_close(group_scores(mlp, spec), rows[:37] + rows[37:] + _sq(mlp.down_proj.weight).sum(0))
    keep = [1, 2, 30]
    masked = _masked(mlp, mlp.down_proj, keep, 37, 1)
    compact_groups(mlp, spec, torch.tensor(keep))
    assert mlp.gate_up_proj.out_features == 6
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), masked(x))


def test_conv1d_mlp():
    """GPT-2 style ``Conv1D`` (weights stored in x out) is sliced and scored on the right axis."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = GPT2MLP(37, GPT2Config(n_embd=HIDDEN)).eval()
    with torch.no_grad():
        mlp.c_fc.bias.normal_()
    spec = neurons("mlp", "c_proj", "c_fc")
    expected = _sq(mlp.c_fc.weight).sum(0) + _sq(mlp.c_fc.bias) + _sq(mlp.c_proj.weight).sum(1)
    torch.testing.assert_close(group_scores(mlp, spec), expected)
    keep = [0, 5, 6, 36]
    masked = _masked(mlp, mlp.c_proj, keep, 37, 1)
    compact_groups(mlp, spec, torch.tensor(keep))
    assert tuple(mlp.c_fc.weight.shape) == (HIDDEN, 4) and tuple(mlp.c_proj.weight.shape) == (4, HIDDEN)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), masked(x))


# Grouped-query attention ---------------------------------------------------------------------------------------
def _llama_attention():
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = _llama_config(attention_bias=True)
    attn = LlamaAttention(config, layer_idx=0).eval()
    x = torch.randn(2, 6, HIDDEN)
    rope = LlamaRotaryEmbedding(config)(x, torch.arange(6)[None].expand(2, -1))
    return attn, x, rope


# 8 query heads of 4 share 2 KV heads: KV group j is query heads 4j..4j+3 plus key/value head j.
GQA = attention_heads("attn", "o_proj", "q_proj", "k_proj", "v_proj", head_dim=4, q_per_kv=4)


@pytest.mark.parametrize("keep", [[0], [1], [0, 1]])
def test_gqa_llama_attention(keep):
    attn, x, rope = _llama_attention()
    assert check_group_spec(attn, GQA) == 2
    masked = _masked(attn, attn.o_proj, keep, 32, 16)
    with torch.no_grad():
        dense = attn(x, rope)[0]
    compact_groups(attn, GQA, torch.tensor(keep))
    kept = len(keep)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (16 * kept, 4 * kept,
                                                                                             4 * kept)
    assert attn.o_proj.in_features == 16 * kept and attn.num_key_value_groups == 4
    with torch.no_grad():
        out = attn(x, rope)[0]
        torch.testing.assert_close(out, masked(x, rope)[0])
        if kept == 2:
            torch.testing.assert_close(out, dense, rtol=0, atol=0)


def test_gqa_weight_scores():
    attn, _, _ = _llama_attention()
    q = (_sq(attn.q_proj.weight).sum(1) + _sq(attn.q_proj.bias)).reshape(2, 16).sum(1)
    k = (_sq(attn.k_proj.weight).sum(1) + _sq(attn.k_proj.bias)).reshape(2, 4).sum(1)
    v = (_sq(attn.v_proj.weight).sum(1) + _sq(attn.v_proj.bias)).reshape(2, 4).sum(1)
    o = _sq(attn.o_proj.weight).sum(0).reshape(2, 16).sum(1)
    torch.testing.assert_close(group_scores(attn, GQA), q + k + v + o)


class FusedGQA(nn.Module):
    """Phi-3 style attention: one ``[q | k | v]`` projection, head counts read from attributes in ``forward``."""

    def __init__(self, heads: int = 6, kv_heads: int = 3, head_dim: int = 5) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv_proj = nn.Linear(HIDDEN, (heads + 2 * kv_heads) * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = *x.shape[:2], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q = q.view(b, t, self.num_heads, d).transpose(1, 2)
        k, v = (s.view(b, t, self.num_kv_heads, d).transpose(1, 2) for s in (k, v))
        r = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        out = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_fused_gqa_projection_and_head_count_attributes():
    torch.manual_seed(0)
    attn = FusedGQA().eval()
    spec = fused_attention_heads("attn", "o_proj", "qkv_proj", head_dim=5, q_per_kv=2,
                                 attrs=(Attr("", "num_heads", per_group=2), Attr("", "num_kv_heads")))
    assert spec.outputs[0].sizes == (10, 5, 5)
    keep = [0, 2]
    masked = _masked(attn, attn.o_proj, keep, 30, 10)
    compact_groups(attn, spec, torch.tensor(keep))
    assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.out_features) == (4, 2, 40)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), masked(x))


# Refusals ------------------------------------------------------------------------------------------------------
def test_spec_that_does_not_fit_is_refused_before_slicing():
    attn, _, _ = _llama_attention()
    before = {k: v.shape for k, v in attn.state_dict().items()}
    wrong = attention_heads("attn", "o_proj", "q_proj", "k_proj", "v_proj", head_dim=4)  # MHA spec on GQA
    with pytest.raises(ValueError, match="k_proj has 8 output units but 8 groups of \\(4,\\) make 32"):
        compact_groups(attn, wrong, torch.tensor([0]))
    assert {k: v.shape for k, v in attn.state_dict().items()} == before
    with pytest.raises(ValueError, match="non-empty subset of 0..1"):
        compact_groups(attn, GQA, torch.tensor([2]))
    with pytest.raises(ValueError, match="kind must be one of"):
        GroupSpec("x", "neurons", Cut("o_proj"))
    with pytest.raises(ValueError, match="positive"):
        Cut("q_proj", (4, 0))


# The generic adapter -------------------------------------------------------------------------------------------
class _Toy(nn.Module):
    def __init__(self) -> None:
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        super().__init__()
        self.layers = nn.ModuleList(GPT2MLP(37, GPT2Config(n_embd=HIDDEN)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class _ToyAdapter(SpecAdapter):
    """Not registered: a decoder-like stack of Conv1D MLPs described by one spec per layer."""

    WIDTHS_FORMAT = "test.toy/1"

    def layers(self):
        return self.model.layers

    def group_specs(self, layer: int) -> list[GroupSpec]:
        return [neurons(f"layers.{layer}.mlp", "c_proj", "c_fc")]


def test_spec_adapter_projection_record_and_reload():
    torch.manual_seed(0)
    model = _Toy().eval()
    adapter = _ToyAdapter(model)
    block = adapter.blocks(0)[0]
    assert (block.kind, block.group_size, block.num_groups) == ("ffn", 1, 37)
    hidden = torch.randn(3, 37)
    down = adapter.current_down(block)
    torch.testing.assert_close(hidden @ adapter.output_weight(block).T + adapter.output_bias(block), down(hidden))
    new_weight = torch.randn(HIDDEN, 37)
    adapter.set_output_projection(block, new_weight, torch.zeros(HIDDEN))
    torch.testing.assert_close(adapter.output_weight(block), new_weight)

    adapter.compact(block, torch.tensor([1, 2, 3]))
    assert adapter.widths() == {"format": "test.toy/1", "layers": [[3], [37]]}
    fresh = _Toy().eval()
    _ToyAdapter(fresh).apply_widths(adapter.widths())
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 4, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="covers 1 layers but the model has 2"):
        _ToyAdapter(_Toy()).apply_widths({"format": "test.toy/1", "layers": [[3]]})
    with pytest.raises(ValueError, match="outside 1..37"):
        _ToyAdapter(_Toy()).apply_widths({"format": "test.toy/1", "layers": [[3], [40]]})
