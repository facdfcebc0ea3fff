"""Decoder LLMs next to Torch-Pruning 1.6's LLM pruning, at the widths of decoder_perplexity where it can
produce them.

The models, budgets, calibration chunks and test split are those of ``benchmarks/decoder_perplexity.py``. For
each model and budget, a copy is pruned with Torch-Pruning's ``MetaPruner`` (whole heads, FFN neurons; hidden
size untouched, as in hf_ispasp) with its magnitude importance (``GroupMagnitudeImportance(p=2)``, the one its
``examples/LLMs/prune_llm.py`` uses) and its Taylor importance (gradients of the LM loss on the 128 calibration
chunks), and our default ``ISpaSPPruner`` runs in the same process. A Torch-Pruning cell is reported only when its
per-layer widths equal ours (checked from the pruned modules); otherwise the run says why and skips it.

What Torch-Pruning can do here:

- GPT-2 (multi-head, fused ``c_attn``): transformers' ``Conv1D`` is not a module type Torch-Pruning knows, so the
  blocks' ``Conv1D`` layers become ``nn.Linear`` (same function) for the prune and go back after, and the attention
  modules' ``split_size`` / ``num_heads`` and ``n_inner`` are brought in line with the sliced weights. With head
  removal on the fused ``[q | k | v]`` projection, Torch-Pruning 1.6.1's importance step fails with an IndexError
  (its index mapping through the ``split`` of ``c_attn`` overruns a 1/3-width layer); the run records the error
  and skips the cell.
- LLaMA with grouped-query attention: no. Torch-Pruning's GQA path keeps every key/value head and removes the same
  number of query heads inside each KV group; it has no way to remove a whole KV group (a KV head with its query
  heads), which is what every budget of decoder_perplexity does. Its dependency graph also never finishes on
  transformers' LLaMA attention (the rotary ``rotate_half`` slice/cat loops ``_fix_dependency_graph``; Torch-Pruning
  issue #527). The run records the attempt (with the rotary hidden from the tracer) and what widths it gives.

    python benchmarks/peer_torch_pruning_llm.py [--models llama gpt2] [--tiny] [--output-dir DIR]
"""

from __future__ import annotations

import copy
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import decoder_perplexity as dp  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from demo import lm  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for  # noqa: E402
from hf_ispasp.config import kept_count  # noqa: E402
from hf_ispasp.metrics import count_parameters  # noqa: E402

NAME = "peer_torch_pruning_llm"
OURS = "i-SpaSP (default)"
OURS_QUERY = "i-SpaSP (gqa_groups=query)"
IMPORTANCES = ("magnitude", "taylor")


class NotComparable(Exception):
    """Torch-Pruning cannot give this model the widths of our pruner."""


# Conv1D <-> Linear ------------------------------------------------------------------------------------------
def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def conv1d_to_linear(root: nn.Module) -> None:
    """Every transformers ``Conv1D`` under ``root`` becomes the equivalent ``nn.Linear`` (weight transposed)."""
    conv1d = _conv1d_type()
    for name, child in list(root.named_children()):
        if isinstance(child, conv1d):
            fan_in, fan_out = child.weight.shape
            linear = nn.Linear(fan_in, fan_out, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(root, name, linear)
        else:
            conv1d_to_linear(child)


def linear_to_conv1d(root: nn.Module, names: set[str]) -> None:
    """Turn the ``nn.Linear`` modules that were ``Conv1D`` (``names``, relative to ``root``) back."""
    conv1d = _conv1d_type()
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = getattr(parent, attr)
        layer = conv1d(linear.out_features, linear.in_features)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.t())
            layer.bias.copy_(linear.bias)
        setattr(parent, attr, layer)


# Torch-Pruning ----------------------------------------------------------------------------------------------
def _removal_ratio(total: int, keep: int) -> float:
    """A ratio from which Torch-Pruning's rounding gives exactly ``total - keep`` removed, whichever of its two
    roundings applies (channels: ``total - int(total * (1 - r))``; heads: ``ceil(r * total)``)."""
    return (total - keep - 0.5) / total if keep < total else 0.0


def _calibration_gradients(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """Accumulate the gradients of the LM loss (labels = input_ids) over the calibration batches."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"],
                    use_cache=False)
        (out.loss / len(batches)).backward()


def torch_pruning_gpt2(model: nn.Module, ffn_keep: float, head_keep: float, importance: str,
                       batches: list[dict[str, torch.Tensor]]) -> nn.Module:
    """A copy of a GPT2LMHeadModel pruned by Torch-Pruning's MetaPruner to our per-layer counts."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    blocks = pruned.transformer.h
    conv_names = {f"transformer.h.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules()
                  if isinstance(m, _conv1d_type())}
    conv1d_to_linear(blocks)
    heads, inner = pruned.config.n_head, blocks[0].mlp.c_fc.out_features
    keep_heads, keep_ffn = kept_count(heads, head_keep), kept_count(inner, ffn_keep)
    ratios: dict[nn.Module, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for block in blocks:
        num_heads[block.attn.c_attn] = heads
        if keep_ffn < inner:
            ratios[block.mlp.c_fc] = _removal_ratio(inner, keep_ffn)
        if keep_heads < heads:
            # Torch-Pruning decides head removal inside the channel-removal pass of the attention group, which it
            # skips when that group's channel ratio is 0; with prune_head_dims=False the ratio removes no channel.
            ratios[block.attn.c_attn] = _removal_ratio(heads, keep_heads)
    head_ratio = _removal_ratio(heads, keep_heads)
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude" else \
        tp.importance.GroupTaylorImportance()
    example = batches[0]["input_ids"][:1, :16]
    try:
        pruner = tp.pruner.MetaPruner(
            pruned, example, importance=imp, pruning_ratio=0.0, pruning_ratio_dict=ratios, num_heads=num_heads,
            prune_num_heads=head_ratio > 0, prune_head_dims=False, head_pruning_ratio=head_ratio, round_to=None,
            ignored_layers=[pruned.lm_head], output_transform=lambda out: out.logits.sum(),
        )
        if importance == "taylor":
            _calibration_gradients(pruned, batches)
        pruner.step()
    except Exception as exc:  # recorded: why Torch-Pruning cannot give this model our widths
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise NotComparable(f"Torch-Pruning failed: {type(exc).__name__}: {first}") from exc
    pruned.zero_grad(set_to_none=True)
    linear_to_conv1d(pruned, conv_names)
    for block in blocks:  # the attention modules read these when they split and reshape q/k/v
        attn = block.attn
        attn.split_size = attn.c_attn.nf // 3
        attn.num_heads = attn.split_size // attn.head_dim
    widths = {b.mlp.c_fc.nf for b in blocks}
    if len(widths) == 1:
        pruned.config.n_inner = widths.pop()
    return pruned.eval()


@contextmanager
def _rotary_hidden(model: nn.Module):
    """LLaMA's rotary embedding replaced by the identity while Torch-Pruning traces the model: rotate_half's
    slice + cat makes its dependency graph loop forever. Whole-head pruning keeps each head's rotary intact."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original


def torch_pruning_llama(model: nn.Module, ffn_keep: float, head_keep: float, importance: str,
                        batches: list[dict[str, torch.Tensor]], query: bool = False) -> nn.Module:
    """Torch-Pruning's GQA recipe (its LLM example's num_heads for q / k / v) at our ratios, to record what it
    does; raises :class:`NotComparable` when the widths differ from ours (whole KV groups). With ``query`` the
    target is ours under ``gqa_groups="query"`` (every KV head kept, the same number of query heads removed in each
    KV group), which is what Torch-Pruning's GQA head pruning does."""
    import torch_pruning as tp

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    keep_groups = kept_count(kv_heads, head_keep)  # ours: whole KV groups, each with heads // kv_heads queries
    if query:
        reason = ""
    elif kv_heads < heads and keep_groups < kv_heads:
        reason = (f"ours keeps {keep_groups} of {kv_heads} KV groups ({keep_groups * heads // kv_heads} query heads); "
                  f"Torch-Pruning's GQA head pruning never removes a key/value head")
    else:
        reason = ""
    pruned = copy.deepcopy(model).eval()
    pruned.config._attn_implementation = "eager"  # sdpa's q/k/v coupling is mapped with the wrong sizes
    layers = pruned.model.layers
    inner = layers[0].mlp.gate_proj.out_features
    keep_ffn = kept_count(inner, ffn_keep)
    keep_queries = (kv_heads * kept_count(heads // kv_heads, head_keep) if query
                    else keep_groups * heads // kv_heads)
    num_heads, ratios = {}, {}
    for layer in layers:
        attn = layer.self_attn
        num_heads.update({attn.q_proj: heads, attn.k_proj: kv_heads, attn.v_proj: kv_heads})
        if keep_ffn < inner:
            ratios[layer.mlp.gate_proj] = _removal_ratio(inner, keep_ffn)
        if keep_queries < heads:
            ratios[attn.q_proj] = _removal_ratio(heads, keep_queries)
    head_ratio = _removal_ratio(heads, keep_queries)
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean") if importance == "magnitude" else \
        tp.importance.GroupTaylorImportance()
    example = batches[0]["input_ids"][:1, :16]
    try:
        with _rotary_hidden(pruned):
            pruner = tp.pruner.MetaPruner(
                pruned, example, importance=imp, pruning_ratio=0.0, pruning_ratio_dict=ratios, num_heads=num_heads,
                prune_num_heads=head_ratio > 0, prune_head_dims=False, head_pruning_ratio=head_ratio, round_to=None,
                ignored_layers=[pruned.lm_head], output_transform=lambda out: out.logits.sum(),
            )
        if importance == "taylor":
            _calibration_gradients(pruned, batches)
        pruner.step()
    except Exception as exc:  # the point is to record why it cannot
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        why = f"Torch-Pruning failed: {type(exc).__name__}: {first}"
        raise NotComparable((f"{reason}; " if reason else "") + why) from exc
    pruned.zero_grad(set_to_none=True)
    for layer in layers:
        attn = layer.self_attn
        q, kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        attn.num_key_value_groups = q // kv
        attn.num_heads, attn.num_key_value_heads = q, kv
    got = llama_widths(pruned)
    if reason:
        raise NotComparable(f"{reason}: it gives {got}")
    return pruned.eval()


def llama_widths(model: nn.Module) -> str:
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    return (f"{attn.q_proj.out_features // attn.head_dim} query / {attn.k_proj.out_features // attn.head_dim} KV "
            f"heads, FFN {mlp.gate_proj.out_features}")


def torch_pruning_prune(kind: str, model: nn.Module, ffn_keep: float, head_keep: float, importance: str,
                        batches: list[dict[str, torch.Tensor]], query: bool = False) -> nn.Module:
    if kind == "gpt2":
        return torch_pruning_gpt2(model, ffn_keep, head_keep, importance, batches)
    return torch_pruning_llama(model, ffn_keep, head_keep, importance, batches, query=query)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Per-layer group counts as our adapter reads them from the modules (KV groups / heads, query heads per KV
    head, FFN neurons)."""
    record = adapter_for(model).widths()
    return {key: list(record[key]) for key in ("heads", "q_per_kv", "ffn")}


# Run --------------------------------------------------------------------------------------------------------
def measure_model(kind: str, tiny: bool, results: common.Results) -> None:
    model, tokenizer, folder = dp._load(kind, tiny)
    seq = 32 if tiny else 128
    calibration, _ = dp._train_chunks(tokenizer, tiny)
    test = lm.lm_dataset("test", tokenizer, seq, max_chunks=16 if tiny else dp.TEST_CHUNKS)
    batches = dp._batches(calibration)
    dense_layers = count_parameters(list(adapter_for(model).layers()))
    dense_ppl = lm.perplexity(model, test)
    results.add({"model": kind, "method": "dense", "target": 0.0, "ppl": dense_ppl, "folder": str(folder),
                 "calibration_chunks": len(calibration), "test_tokens": len(test) * seq})
    print(f"{kind}: dense perplexity {dense_ppl:.2f}", flush=True)
    for target in dp.targets(tiny):
        ffn_keep, head_keep = dp.widths_for(model, target)
        base = {"model": kind, "target": target, "ffn_keep": ffn_keep, "head_keep": head_keep}
        # GQA: ours removes whole KV groups by default; Torch-Pruning only query heads inside each KV group, which
        # is ours with gqa_groups="query": that pair is compared at equal widths too.
        modes = [(False, OURS)] + ([(True, OURS_QUERY)] if _is_gqa(model) else [])
        for query, ours_name in modes:
            _compare(kind, model, batches, test, base, ffn_keep, head_keep, dense_layers, results, query, ours_name)


def _is_gqa(model: nn.Module) -> bool:
    config = model.config
    return getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)


def _compare(kind: str, model: nn.Module, batches: list[dict[str, torch.Tensor]], test: Any, base: dict[str, Any],
             ffn_keep: float, head_keep: float, dense_layers: int, results: common.Results, query: bool,
             ours_name: str) -> None:
    """Ours (in the given GQA mode) and Torch-Pruning's importances at the same widths, for one budget."""
    target = base["target"]
    start = time.perf_counter()
    extra = {"gqa_groups": "query"} if query else {}
    ours = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=ffn_keep, head_keep_ratio=head_keep,
                                            show_progress=False, **extra)).prune(batches)
    seconds = time.perf_counter() - start
    expected = layer_widths(ours)
    removed = 1 - count_parameters(list(adapter_for(ours).layers())) / dense_layers
    results.add({**base, "method": ours_name, "ppl": lm.perplexity(ours, test), "prune_s": seconds,
                 "widths": expected, "layer_params_removed": removed, "status": "ok"})
    print(f"{kind} {target:.2f} {ours_name}: {results.records[-1]['ppl']:.2f} {expected}", flush=True)
    del ours
    for importance in IMPORTANCES:
        method = f"Torch-Pruning {importance}" + (" (query heads)" if query else "")
        start = time.perf_counter()
        try:
            pruned = torch_pruning_prune(kind, model, ffn_keep, head_keep, importance, batches, query=query)
        except NotComparable as why:
            results.add({**base, "method": method, "status": "skipped", "reason": str(why)})
            print(f"{kind} {target:.2f} {method}: skipped ({why})", flush=True)
            continue
        seconds = time.perf_counter() - start
        got = layer_widths(pruned)
        if got != expected:
            results.add({**base, "method": method, "status": "skipped", "widths": got,
                         "reason": f"widths {got} differ from ours {expected}"})
            print(f"{kind} {target:.2f} {method}: skipped, widths {got} != {expected}", flush=True)
            continue
        removed = 1 - count_parameters(list(adapter_for(pruned).layers())) / dense_layers
        ppl = lm.perplexity(pruned, test)
        results.add({**base, "method": method, "ppl": ppl, "prune_s": seconds, "widths": got,
                     "layer_params_removed": removed, "status": "ok"})
        print(f"{kind} {target:.2f} {method}: {ppl:.2f} ({seconds:.1f}s)", flush=True)


def report(data: dict[str, Any]) -> str:
    records, meta = data["records"], data["meta"]
    lines = [f"## Decoder LLMs next to Torch-Pruning 1.6.1 ({meta.get('date', '')})", "",
             "The decoders of `decoder_perplexity` (trained here from scratch), its budgets (fraction of the layer "
             "parameters removed), its 128 calibration chunks of 128 training tokens and its held-out test split. "
             "Torch-Pruning's `MetaPruner` removes whole heads and FFN neurons (hidden size untouched) with its "
             "magnitude importance (`GroupMagnitudeImportance(p=2)`, as in its LLM example) or its Taylor importance "
             "(gradients of the LM loss on the calibration chunks); hf_ispasp's default pruner runs in the same "
             "process. A Torch-Pruning cell is shown only where its per-layer widths (heads or KV groups, FFN "
             "neurons, read from the pruned modules) equal ours. Held-out perplexity, lower is better.", "",
             f"`python benchmarks/{NAME}.py`", ""]
    for kind in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == kind]
        dense = next(r for r in rows if r["method"] == "dense")
        targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
        lines += [f"### {kind} (dense perplexity {dense['ppl']:.2f})", "",
                  "| method | " + " | ".join(f"{100 * t:.0f}%" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        ours = {r["target"]: r for r in rows if r["method"] == OURS}
        lines.append("| widths (heads/KV groups, FFN per layer) | " + " | ".join(
            f"{ours[t]['widths']['heads'][0]}, {ours[t]['widths']['ffn'][0]}" if t in ours else "" for t in targets)
            + " |")
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            cells = []
            for t in targets:
                hit = next((r for r in rows if r["method"] == method and r["target"] == t), None)
                cells.append("" if hit is None else f"{hit['ppl']:.2f}" if hit["status"] == "ok" else "n/a")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        reasons = dict.fromkeys(r["reason"] for r in rows if r.get("status") == "skipped")
        if reasons:
            lines += ["", "n/a: " + " / ".join(reasons)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(lm.KINDS), choices=list(lm.KINDS))
    args = parser.parse_args(argv)
    import torch_pruning

    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "torch_pruning": torch_pruning.__version__})
    for kind in args.models:
        measure_model(kind, args.tiny, results)
    text = report(results.data)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
