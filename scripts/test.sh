#!/usr/bin/env bash
# Set up (if needed) and run the test suite. The default suite (about 10 minutes on 2 cores) deselects the tests
# marked slow (real-model fine-tuning, multi-process runs, benchmark smoke runs: about 8 more minutes); CI
# (CI=true) and HF_ISPASP_SLOW=1 run them too. Extra arguments go to pytest (a -m of your own replaces the
# default selection, e.g. -m slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
if [ "${CI:-}" = "true" ] || [ "${HF_ISPASP_SLOW:-}" = "1" ]; then
  exec "$PY" -m pytest -q "$@"
fi
exec "$PY" -m pytest -q -m "not slow" "$@"
