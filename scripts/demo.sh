#!/usr/bin/env bash
# Set up (if needed) and run the main job: fine-tune MiniLM-L6 on sentence polarity (cached), prune it
# with i-SpaSP, print before/after size, FLOPs, latency and accuracy, save and reload the compacted model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$PY" -m hf_ispasp.cli demo "$@"
