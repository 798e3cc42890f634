#!/usr/bin/env bash
# Run Theta's test suite: bootstrap .venv with requirements-dev.txt (only when it changed), then pytest.
#
#   ./tests/run.sh                 # the whole suite (CPU only, offline, a few minutes on 2 cores)
#   ./tests/run.sh -k theta_model  # pytest arguments pass through
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY_SYS="$(command -v python3 || command -v python || true)"
if [ -z "$PY_SYS" ]; then
  echo "error: Python 3.10+ is needed (python3 was not found on PATH)" >&2; exit 2
fi
PY="$("$PY_SYS" src/utils/bootstrap_env.py --requirements requirements-dev.txt | tail -n 1)"
# No network in tests: the hub is never asked, whatever the environment says.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
"$PY" -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$code"
