"""Perplexity from summed token log-losses, as an ``evaluate`` module that ships with hf_ispasp.

The Hub's ``perplexity`` takes texts and a ``model_id`` and downloads that model to score them. A pruned model
exists only in memory (or as a compacted checkpoint that needs ``hf_ispasp.load_pruned``), may sit on a GPU or be
offloaded, and its evaluation batches are already built; so this module takes what the caller's own forward pass
produces: for each group of tokens (a sequence, or a whole batch) the summed next-token negative log-likelihood
and the number of tokens predicted. That also makes the result token-weighted however the groups are cut, and
lets ``add_batch`` accumulate it batch by batch or across processes.

    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                            ignore_index=-100, reduction="sum")
    metric.add_batch(nll=[float(nll)], num_tokens=[int((labels[:, 1:] != -100).sum())])
    metric.compute()["perplexity"]

Output keys: ``perplexity`` (exp of the total NLL over the total token count, the number papers report), and, as
the Hub module returns them, ``perplexities`` (one per group) and ``mean_perplexity`` (their plain mean).
"""

from __future__ import annotations

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Perplexity is the exponential of the mean negative log-likelihood per predicted token:
exp(sum of NLL / number of tokens), NLL in nats. Lower is better; a model that spreads its probability evenly
over a vocabulary of V tokens has perplexity V. Inputs are sums, not per-token values, so the mean is weighted by
tokens whichever way the tokens were grouped.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): for each group of tokens (a sequence or a batch), the summed negative
        log-likelihood of its predicted tokens, in nats (`cross_entropy(..., reduction="sum")`).
    num_tokens (`list` of `int`): for each group, the number of tokens that sum covers (labels of -100 and
        padding excluded).

Returns:
    perplexity (`float`): exp(sum(nll) / sum(num_tokens)); `inf` where that overflows.
    perplexities (`list` of `float`): exp(nll / num_tokens) per group (`nan` for a group of no tokens).
    mean_perplexity (`float`): the mean of `perplexities` over groups with tokens, as the Hub module reports.

Example:
    >>> perplexity = hf_ispasp.evaluation.load("perplexity")  # evaluate.load(<path of this folder>)
    >>> perplexity.compute(nll=[6.0, 2.0], num_tokens=[3, 1])["perplexity"]  # exp(8 / 4)
    7.38905609893065
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity---a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977}
}
"""


def _exp(value: float) -> float:
    """exp that saturates to inf (a diverged model) instead of raising OverflowError."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Token-weighted perplexity from per-group NLL sums and token counts."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll: list[float], num_tokens: list[int]) -> dict[str, float | list[float]]:
        counts = np.asarray(num_tokens, dtype=np.int64)
        if (counts < 0).any():
            raise ValueError("perplexity: num_tokens must not be negative")
        total_tokens = int(counts.sum())
        if total_tokens == 0:
            raise ValueError("perplexity: no predicted token (every num_tokens is 0)")
        # Summed in order, one group after the other, as a plain loop over batches would: the result does not
        # depend on numpy's pairwise summation, so code that switches to this module keeps its numbers.
        total_nll = 0.0
        for value in nll:
            total_nll += float(value)
        per_group = [_exp(float(v) / int(n)) if n > 0 else math.nan for v, n in zip(nll, counts, strict=True)]
        with_tokens = [p for p, n in zip(per_group, counts, strict=True) if n > 0]
        return {
            "perplexity": _exp(total_nll / total_tokens),
            "perplexities": per_group,
            "mean_perplexity": float(np.mean(with_tokens)),
        }
