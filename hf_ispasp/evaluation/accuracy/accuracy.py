"""Accuracy as an ``evaluate`` module that ships with hf_ispasp, so it loads without the Hugging Face Hub.

Inputs, options and output follow the Hub's ``accuracy`` metric, so code written against
``evaluate.load("accuracy")`` runs unchanged on ``evaluate.load(<this folder>)``. numpy only: the Hub script
needs scikit-learn, which hf_ispasp does not depend on.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the share of examples whose predicted label equals the reference label:
(number of correct predictions) / (number of predictions), each example counted with its sample weight if given.
With the "multilabel" configuration every example is a row of labels and counts as correct only when the whole
row matches (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of `list` of `int` for "multilabel"): predicted labels.
    references (`list` of `int`, or of `list` of `int` for "multilabel"): true labels.
    normalize (`bool`, defaults to `True`): `False` returns the (weighted) number of correct examples instead
        of their share.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    accuracy (`float`): in [0, 1] with `normalize=True`, otherwise the count of correct examples.

Example:
    >>> accuracy = hf_ispasp.evaluation.load("accuracy")  # evaluate.load(<path of this folder>)
    >>> accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])
    {'accuracy': 0.5}
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Share (or weighted count) of exact matches between predicted and true labels."""

    def _info(self) -> evaluate.MetricInfo:
        label = datasets.Value("int64")
        if self.config_name == "multilabel":
            label = datasets.Sequence(label)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label, "references": label}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(
        self, predictions: list, references: list, normalize: bool = True, sample_weight: list | None = None
    ) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("accuracy: no predictions were given")
        if self.config_name == "multilabel":
            correct = np.array([np.array_equal(p, r) for p, r in zip(predictions, references, strict=True)])
        else:
            correct = np.asarray(predictions) == np.asarray(references)
        if sample_weight is None:
            hits = np.count_nonzero(correct)  # an exact integer, so hits / n is correctly rounded
            return {"accuracy": float(hits / correct.size if normalize else hits)}
        weights = np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"accuracy: {weights.size} sample weights for {correct.size} predictions")
        hits = float(np.dot(correct, weights))
        return {"accuracy": hits / float(weights.sum()) if normalize else hits}
