#!/usr/bin/env python
"""Text-classification base + the Hub: a model card with the results, then ``push_to_hub``.

    python examples/by_feature/hub_upload.py --push_to_hub --hub_model_id me/minilm-polarity-pruned
    python examples/by_feature/hub_upload.py --dry_run   # the folder and its card only, no upload

``hf_ispasp.set_card_info`` stores the metrics (dense and pruned) and the dataset in the width record, so
``save_pruned`` and ``push_to_hub`` write a card (``README.md``) with them, the widths picture and a
``modeling_pruned.py`` that loads the checkpoint with ``trust_remote_code=True``. Log in first
(``hf auth login``) or pass ``--hub_token``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the base script

import text_classification as base  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

from hf_ispasp import ISpaSPPruner, set_card_info  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base.build_parser()
    parser.add_argument("--push_to_hub", action="store_true", help="upload the pruned model to the Hub")
    parser.add_argument("--hub_model_id", help="repository id (default: the output folder's name)")
    parser.add_argument("--hub_token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry_run", action="store_true", help="write the folder and card, upload nothing")
    args = parser.parse_args(argv)
    accelerator, tokenizer, model, loaders = base.setup(args)
    if args.train_steps:
        model = base.train(accelerator, model, loaders["train"], args.train_steps, args.learning_rate)
    dense_logits, labels = base.predict(accelerator, model, loaders["eval"])
    pruner = ISpaSPPruner(model, base.pruner_config(args))
    pruned = pruner.prune(loaders["calibration"])
    metrics = {"dense": base.score(dense_logits, labels),
               "pruned": base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    dataset = Path(args.train_file).name if args.train_file else "sentence-polarity (Pang & Lee)"
    set_card_info(pruned, metrics={"accuracy": metrics["pruned"]["accuracy"]},
                  dense_metrics={"accuracy": metrics["dense"]["accuracy"]},
                  dataset={"id": dataset, "name": dataset, "split": "test"}, tags=["text-classification"])
    results = base.finish(accelerator, args, pruned, tokenizer, pruner.report, metrics)
    if args.push_to_hub and not args.dry_run and accelerator.is_main_process:
        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        pruned.push_to_hub(repo_id, token=args.hub_token, private=args.private, commit_message="i-SpaSP pruned")
        with tempfile.TemporaryDirectory() as folder:  # the tokenizer's files, in a second commit
            tokenizer.save_pretrained(folder)
            HfApi(token=args.hub_token).upload_folder(repo_id=repo_id, folder_path=folder, commit_message="tokenizer")
        results["hub_repo"] = repo_id
        print(f"uploaded to https://huggingface.co/{repo_id}")
    return results


if __name__ == "__main__":
    main()
