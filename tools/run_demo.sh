#!/usr/bin/env bash
# The README's demo: install whatever is missing, then run the whole
# workflow on embedded defaults. Arguments go to tools/demo.py, e.g.
# `bash tools/run_demo.sh --data-root data/cityscapes --iters 2000`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/install_deps.sh"
cd "$ROOT"
exec "${PYTHON:-python}" tools/demo.py "$@"
