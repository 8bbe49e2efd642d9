#!/usr/bin/env bash
# Run the test suite in the project's environment, building the environment first when needed.
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/test_matrix_nms.py -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec "${SOLOV2_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
