#!/usr/bin/env bash
# Install whatever is missing, then run the whole test suite, and run the
# tests that compare floating-point outputs again with oneDNN and ATen held
# to an older instruction set than this CPU's (AVX2 on an AVX-512 CPU, AVX
# without FMA on an AVX2 one; not SSE4.1, below what OpenVINO's CPU plugin
# supports): other CPUs round differently, and the tests must hold on all
# of them.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k deploy`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
bash "$ROOT/tools/install_deps.sh"
cd "$ROOT"
"$PYTHON" -m pytest tests "$@"

if grep -qw avx512f /proc/cpuinfo; then
    isa=AVX2 aten=avx2
else
    isa=AVX aten=default
fi
echo "== the numerics tests again, as a CPU limited to $isa computes them"
ONEDNN_MAX_CPU_ISA=$isa ATEN_CPU_CAPABILITY=$aten \
    "$PYTHON" -m pytest tests "$@" -m numerics
