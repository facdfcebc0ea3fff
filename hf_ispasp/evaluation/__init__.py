"""The metrics hf_ispasp reports, as Hugging Face ``evaluate`` modules that ship inside the package.

``evaluate.load("accuracy")`` fetches its script from the Hub, which many machines that prune models cannot
reach. The folders beside this file are ordinary ``evaluate`` modules, loaded by path with the API a Hub id
gives: ``accuracy`` and ``f1`` (the Hub metrics' inputs and outputs, numpy only), ``perplexity`` (from summed
token NLLs, since a pruned model cannot be fetched by a Hub id) and ``pruning_fidelity`` (agreement, KL and
relative output error of a pruned model against the dense one). Nothing here installs or downloads anything.

    from hf_ispasp.evaluation import load
    accuracy = load("accuracy")            # = evaluate.load(metric_path("accuracy")), no network
    accuracy.compute(predictions=[0, 1], references=[1, 1])
    bleu = load("bleu")                    # not ours: evaluate.load("bleu"), from the Hub or its cache

``evaluate`` itself is imported on first use: it pulls in ``transformers.pipelines``, which ``import hf_ispasp``
should not pay for.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

__all__ = ["LOCAL_METRICS", "MetricNotFoundError", "compute", "load", "metric_path"]

LOCAL_METRICS: tuple[str, ...] = ("accuracy", "f1", "perplexity", "pruning_fidelity")
_ROOT = Path(__file__).resolve().parent
_TRUE = {"1", "ON", "YES", "TRUE"}


class MetricNotFoundError(FileNotFoundError):
    """A metric name that is neither ours nor loadable by ``evaluate`` (a path, a cached or reachable Hub id)."""


def metric_path(name: str) -> str:
    """The folder of one of our ``evaluate`` modules, for ``evaluate.load(metric_path(name))``.

    Args:
        name: one of :data:`LOCAL_METRICS`.
    """
    if name not in LOCAL_METRICS:
        raise ValueError(f"{name!r} is not a metric shipped with hf_ispasp; those are {', '.join(LOCAL_METRICS)}")
    return str(_ROOT / name)


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def load(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """An ``evaluate`` module: ours for the names in :data:`LOCAL_METRICS`, ``evaluate.load(name)`` otherwise.

    Our names take precedence over the Hub's (``"accuracy"`` loads the copy in this package, which gives the
    same results as the Hub's and needs no network); any other name is passed on unchanged, so a local script
    path or a Hub id (``"bleu"``, ``"evaluate-metric/accuracy"``) works as with ``evaluate.load``.

    Args:
        name: a name in :data:`LOCAL_METRICS`, a path to an ``evaluate`` script or folder, or a Hub id.
        **kwargs: passed to ``evaluate.load`` (``config_name``, ``keep_in_memory``, ``experiment_id``, ...).

    Raises:
        MetricNotFoundError: ``name`` is not ours and ``evaluate`` could not find it, which it reports as a
            missing file even where the cause is an unreachable (or ``HF_HUB_OFFLINE``) Hub.
    """
    import evaluate

    if name in LOCAL_METRICS:
        return evaluate.load(metric_path(name), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except (FileNotFoundError, ConnectionError) as err:
        if _hub_offline():
            why = ("the Hugging Face Hub is switched off (HF_HUB_OFFLINE / HF_EVALUATE_OFFLINE) and no cached copy "
                   "exists; load it once with network access, or pass the path of a local script")
        else:
            why = f"evaluate could not load it as a path or from the Hub ({err})"
        raise MetricNotFoundError(
            f"metric {name!r} is not one shipped with hf_ispasp ({', '.join(LOCAL_METRICS)}), and {why}"
        ) from err


@functools.cache
def _shared(name: str, config_name: str | None) -> tuple[evaluate.EvaluationModule, threading.Lock]:
    return load(name, config_name=config_name, keep_in_memory=True), threading.Lock()


def compute(name: str, config_name: str | None = None, **inputs: Any) -> dict[str, Any]:
    """``load(name).compute(**inputs)`` with the module loaded once per process and kept in memory.

    For library code that scores many models in a row (benchmarks, ``classification_metrics``): loading hashes
    and imports the script each time, and a module not kept in memory writes its inputs to an Arrow file under
    ``~/.cache/huggingface/evaluate``. A lock keeps concurrent callers from mixing their inputs.

    Args:
        name: as for :func:`load`.
        config_name: the module's configuration (``"multilabel"`` for accuracy, ``"labels"`` for fidelity).
        **inputs: the module's inputs and options (``predictions=``, ``references=``, ``average=``, ...).
    """
    module, lock = _shared(name, config_name)
    with lock:
        return module.compute(**inputs)
