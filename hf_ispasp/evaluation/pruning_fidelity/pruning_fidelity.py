"""How closely a pruned model reproduces its dense original, as an ``evaluate`` module shipped with hf_ispasp.

Accuracy against labels says how good a pruned model is; fidelity says how much pruning changed it, which is
what a pruning method controls and what shows a damaged model even where labels are few or noisy. It compares
the two models' outputs on the same inputs:

- ``agreement``: share of examples where both models predict the same class (argmax);
- ``kl``: mean KL(dense || pruned) between the softmax distributions, in nats: the information the pruned model
  loses about the dense model's prediction, per example;
- ``relative_error``: ||pruned - dense|| / ||dense|| over all logits (Frobenius norms), the output error that
  i-SpaSP's selection minimises layer by layer, measured at the end of the network.

The ``"labels"`` configuration takes the two models' predicted classes instead of logits and returns
``agreement`` only. Rows are examples; a language model's token positions can be passed as rows.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fidelity of a pruned model to the dense model it was cut from, from the logits both give on the same examples:
agreement of their predicted classes, mean KL divergence KL(dense || pruned) of their softmax distributions, and
the relative error ||pruned - dense|| / ||dense|| of the logits.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): logits of the pruned model, one row per example (with the
        "labels" configuration: its predicted classes, `list` of `int`).
    references (`list` of `list` of `float`): logits of the dense model on the same examples, same shape (with
        "labels": its predicted classes).

Returns:
    agreement (`float`): share of examples whose argmax agrees, in [0, 1].
    kl (`float`): mean over examples of KL(softmax(dense) || softmax(pruned)), in nats (not with "labels").
    relative_error (`float`): Frobenius norm of (pruned - dense) over that of dense (not with "labels").

Example:
    >>> fidelity = hf_ispasp.evaluation.load("pruning_fidelity")  # evaluate.load(<path of this folder>)
    >>> fidelity.compute(predictions=[[2.0, 0.0], [0.0, 1.0]], references=[[2.0, 0.0], [1.0, 0.0]])["agreement"]
    0.5
"""

_CITATION = """
@article{wolfe2021ispasp,
  title={i-SpaSP: Structured Neural Pruning via Sparse Signal Recovery},
  author={Wolfe, Cameron R. and Kyrillidis, Anastasios},
  journal={arXiv preprint arXiv:2112.04905},
  year={2021}
}
"""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, shifted by the row maximum so that no exp overflows."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PruningFidelity(evaluate.Metric):
    """Agreement, KL(dense || pruned) and relative output error of a pruned model against the dense one."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "labels":
            row = datasets.Value("int64")
        else:
            row = datasets.Sequence(datasets.Value("float64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": row, "references": row}),
            reference_urls=["https://arxiv.org/abs/2112.04905"],
        )

    def _compute(self, predictions: list, references: list) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("pruning_fidelity: no predictions were given")
        if self.config_name == "labels":
            return {"agreement": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
        pruned = np.asarray(predictions, dtype=np.float64)
        dense = np.asarray(references, dtype=np.float64)
        if pruned.ndim != 2 or pruned.shape != dense.shape:
            raise ValueError(f"pruning_fidelity: logits of shape {pruned.shape} (pruned) and {dense.shape} (dense); "
                             "expected the same (examples, classes) shape for both")
        agreement = float(np.mean(pruned.argmax(-1) == dense.argmax(-1)))
        log_dense, log_pruned = _log_softmax(dense), _log_softmax(pruned)
        kl = float((np.exp(log_dense) * (log_dense - log_pruned)).sum(-1).mean())
        dense_norm = float(np.linalg.norm(dense))
        error = float(np.linalg.norm(pruned - dense))
        return {"agreement": agreement, "kl": kl, "relative_error": error / dense_norm if dense_norm > 0 else
                (0.0 if error == 0 else float("inf"))}
