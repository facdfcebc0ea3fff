"""F1 score as an ``evaluate`` module that ships with hf_ispasp, so it loads without the Hugging Face Hub.

Inputs, options and output follow the Hub's ``f1`` metric (itself scikit-learn's ``f1_score``): binary by
default, or ``average="micro" | "macro" | "weighted" | None`` over several classes; a class that is never
predicted nor present scores 0, as scikit-learn's default ``zero_division`` does. numpy only: hf_ispasp does not
depend on scikit-learn.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 is the harmonic mean of precision and recall: F1 = 2 * TP / (2 * TP + FP + FN), computed per class.
`average` says how classes are combined: "binary" reports the class `pos_label` only, "micro" pools the counts
of all classes (for single-label data this equals accuracy), "macro" is the plain mean over classes, "weighted"
weights each class by its number of true examples, and None returns one score per class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    labels (`list` of `int`, *optional*): the classes to score (and their order for `average=None`); by default
        every class seen in predictions or references, sorted.
    pos_label (`int`, defaults to 1): the class scored when `average="binary"`.
    average (`str` or `None`, defaults to "binary"): "binary", "micro", "macro", "weighted" or None.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    f1 (`float`, or `numpy.ndarray` of one score per class when `average=None`): in [0, 1].

Example:
    >>> f1 = hf_ispasp.evaluation.load("f1")  # evaluate.load(<path of this folder>)
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """Per-class F1 from true/false positive and false negative counts, combined as ``average`` asks."""

    def _info(self) -> evaluate.MetricInfo:
        label = datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label, "references": label}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self, predictions: list, references: list, labels: list | None = None, pos_label: int = 1,
        average: str | None = "binary", sample_weight: list | None = None,
    ) -> dict[str, float | np.ndarray]:
        if average not in _AVERAGES:
            raise ValueError(f"f1: average={average!r}; expected one of {_AVERAGES}")
        pred, true = np.asarray(predictions), np.asarray(references)
        if pred.size == 0:
            raise ValueError("f1: no predictions were given")
        weights = np.ones(pred.shape, np.float64) if sample_weight is None else np.asarray(sample_weight, np.float64)
        if weights.shape != pred.shape:
            raise ValueError(f"f1: {weights.size} sample weights for {pred.size} predictions")
        present = np.union1d(pred, true)
        if average == "binary":
            if present.size > 2:
                raise ValueError(f"f1: average='binary' needs two classes, got {present.tolist()}; choose "
                                 "average='micro', 'macro', 'weighted' or None")
            if pos_label not in present and present.size == 2:
                raise ValueError(f"f1: pos_label={pos_label} is not a class of the data {present.tolist()}")
            classes = np.array([pos_label])
        else:
            classes = present if labels is None else np.asarray(labels)
        # Weighted counts per class: row c compares every example against class c.
        is_pred = pred[None, :] == classes[:, None]
        is_true = true[None, :] == classes[:, None]
        tp = (is_pred & is_true) @ weights
        fp = (is_pred & ~is_true) @ weights
        fn = (~is_pred & is_true) @ weights
        if average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        denominator = 2 * tp + fp + fn
        scores = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        if average is None:
            return {"f1": scores}
        if average == "weighted":
            support = tp + fn
            total = support.sum()
            return {"f1": float(scores @ support / total) if total > 0 else 0.0}
        return {"f1": float(scores.mean())}
