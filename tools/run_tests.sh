#!/usr/bin/env bash
# Install whatever is missing, then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k deploy`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/install_deps.sh"
cd "$ROOT"
exec "${PYTHON:-python}" -m pytest tests "$@"
