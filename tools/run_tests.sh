#!/usr/bin/env bash
# Install whatever is missing, then run the whole test suite. On an AVX-512
# CPU, run the tests that compare floating-point outputs again with oneDNN
# and ATen held to AVX2: CPUs of either kind must pass them, and an AVX2
# CPU's own run is already the AVX2 one.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k deploy`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
bash "$ROOT/tools/install_deps.sh"
cd "$ROOT"
"$PYTHON" -m pytest tests "$@"

if grep -qw avx512f /proc/cpuinfo; then
    echo "== the numerics tests again, as a CPU limited to AVX2 computes them"
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        "$PYTHON" -m pytest tests "$@" -m numerics
fi
