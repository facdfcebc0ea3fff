"""Calibration sharded over 2 CPU processes (gloo) selects exactly what one process selects on the same data.

Run as a script, this file is the worker that ``torchrun`` / ``accelerate launch`` start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NUM_SAMPLES = 35  # batches of 4: 9 batches, the last one partial -> 5 batches (20 samples) vs 4 (15)
BATCH_SIZE = 4


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def _dataset() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(NUM_SAMPLES):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        ids = torch.randint(1, 101, (length,), generator=generator).tolist()
        ids[0] = i + 1  # a token that identifies the sample, to check that none is duplicated or dropped
        rows.append({"input_ids": ids})
    return rows


def _prune(accelerator=None):
    from hf_ispasp import ISpaSPPruner, PrunerConfig
    from hf_ispasp.distributed import shard_calibration_data

    config = PrunerConfig(ffn_keep_ratio=0.4, head_keep_ratio=0.5, calibration_batch_size=BATCH_SIZE,
                          show_progress=False, activation_cache="memory")
    shard = shard_calibration_data(_dataset(), accelerator, config)
    seen = [int(i) for batch in shard for i in batch["input_ids"][:, 0]]
    pruner = ISpaSPPruner(_tiny_bert(), config, accelerator=accelerator)
    pruned = pruner.prune(shard)
    return pruned, pruner.report, seen


def _kept_indices(dense, pruned) -> dict[str, list[int]]:
    """Recover which FFN neurons / heads were kept by matching the (never re-fitted) input-side rows."""
    kept = {}
    for i, (d, p) in enumerate(zip(dense.bert.encoder.layer, pruned.bert.encoder.layer, strict=True)):
        for name, dw, pw in (
            ("ffn", d.intermediate.dense.weight, p.intermediate.dense.weight),
            ("query", d.attention.self.query.weight, p.attention.self.query.weight),
        ):
            kept[f"{i}.{name}"] = [int((dw == row).all(-1).nonzero()[0]) for row in pw]
    return kept


def _worker(out: str) -> None:
    from accelerate import Accelerator

    from hf_ispasp.distributed import destroy_process_group

    accelerator = Accelerator(cpu=True)
    pruned, report, seen = _prune(accelerator)
    result = {
        "world": accelerator.num_processes,
        "rank": accelerator.process_index,
        "seen": seen,
        "tokens": report.calibration_tokens,
        "widths": [(b.name, b.groups_after) for b in report.blocks],
        "kept": _kept_indices(_tiny_bert(), pruned),
    }
    with open(os.path.join(out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    if accelerator.is_main_process:
        torch.save(pruned.state_dict(), os.path.join(out, "state.pt"))
    accelerator.wait_for_everyone()
    destroy_process_group()


def _launch(launcher: str, out: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", "29731"]
    else:
        cmd = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29732"]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    proc = subprocess.run([*cmd, __file__, str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single_process():
    # float32 CPU kernels round differently with another thread count; the workers run one thread each.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _prune(None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_select_like_one(launcher, tmp_path, single_process):
    pruned, report, seen = single_process
    _launch(launcher, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Every sample is seen by exactly one process, and the shards are uneven.
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == sorted(seen) == list(range(1, NUM_SAMPLES + 1))
    assert len(ranks[0]["seen"]) != len(ranks[1]["seen"])
    assert ranks[0]["tokens"] + ranks[1]["tokens"] == report.calibration_tokens
    # Same widths and the same kept FFN neurons / heads on both ranks as in one process.
    widths = [[name, kept] for name, kept in ((b.name, b.groups_after) for b in report.blocks)]
    kept = _kept_indices(_tiny_bert(), pruned)
    assert any(len(v) < 37 for k, v in kept.items() if k.endswith("ffn"))  # something was pruned
    for rank in ranks:
        assert rank["widths"] == widths
        assert rank["kept"] == kept
    # Same weights, re-fitted projections included (float64 sums in another order: last-bit differences at most;
    # with another thread count, float32 kernels alone would already differ by ~1e-5 relative).
    state = torch.load(tmp_path / "state.pt")
    reference = pruned.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_shard_without_duplicates_when_single_process():
    from hf_ispasp import PrunerConfig
    from hf_ispasp.distributed import shard_calibration_data

    config = PrunerConfig(calibration_batch_size=BATCH_SIZE, max_calibration_samples=10)
    batches = list(shard_calibration_data(_dataset(), None, config))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert batches[0]["attention_mask"].shape == batches[0]["input_ids"].shape


if __name__ == "__main__":
    _worker(sys.argv[1])
