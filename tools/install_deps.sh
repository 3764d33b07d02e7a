#!/usr/bin/env bash
# Install whatever the tests need into the current Python environment.
#
# Idempotent: each step checks first and installs nothing when its
# requirement is already met. It never replaces an installed torch, so a
# CUDA build stays as it is; on a machine without torch it installs the CPU
# build. mmcv is built from source with its compiled ops (pip caches the
# wheel, so only the first build on a machine takes minutes).
set -euo pipefail

PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }
# True when every requirement given is installed at a matching version.
satisfied() {
    "$PYTHON" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

satisfied packaging 2>/dev/null || pip_install packaging
satisfied 'torch>=2.0' || pip_install 'torch==2.13.0'

# openmim pulls openxlab, which pins an old setuptools; install it before
# building mmcv, whose setup.py needs pkg_resources from setuptools<81.
TOOLBOXES=('mmengine>=0.10.0,<0.11.0' 'mmsegmentation>=1.2.0,<2.0.0'
           'mmdet>=3.0.0,<4.0.0' 'openmim>=0.3.9' 'ftfy' 'regex')
TEST_TOOLS=('pytest' 'pytest-xdist' 'matplotlib' 'prettytable' 'pycocotools'
            'vermin==1.9.2')
# The docs extra (pip install mmrepvgg[docs]), at the versions tested: the
# suite builds the documentation.
DOCS=('sphinx==9.0.4' 'myst-parser==5.2.0' 'furo==2025.12.19')
# The deploy extra (pip install mmrepvgg[deploy]), at the versions tested.
ENGINES=('onnx==1.23.2' 'onnxscript==0.7.2' 'onnxruntime==1.32.0'
         'openvino==2026.4.1')
satisfied "${TOOLBOXES[@]}" "${TEST_TOOLS[@]}" "${ENGINES[@]}" "${DOCS[@]}" ||
    pip_install "${TOOLBOXES[@]}" "${TEST_TOOLS[@]}" "${ENGINES[@]}" "${DOCS[@]}"

# mmpretrain writes the model-zoo weights that the tests load. Only its RepVGG
# module is imported: its package imports torchvision, which does not import
# beside every torch build, so its dependencies are left out.
satisfied 'mmpretrain==1.2.0' || pip_install --no-deps 'mmpretrain==1.2.0'

# The full build has the compiled extension mmcv._ext; mmcv-lite lacks it.
if ! satisfied 'mmcv>=2.0.0rc4,<2.2.0' || ! "$PYTHON" -c \
        'import importlib.util as u, sys; sys.exit(not u.find_spec("mmcv._ext"))'
then
    echo "Building mmcv 2.1.0 with its compiled ops: measured at 10-12 minutes" \
        "on 2 cores of an AVX-512 CPU, up to 28 on an AVX2-only one" \
        "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
        "$(nproc) cores here). pip caches the wheel for the next time."
    pip_install 'setuptools>=77,<81' wheel ninja
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
        pip_install --no-build-isolation 'mmcv==2.1.0'
fi

# The package itself, in development mode, pointing at this checkout.
installed_at=$(cd / && "$PYTHON" -c 'import importlib.util as u, os.path as p
spec = u.find_spec("mmrepvgg")
print(p.dirname(p.dirname(p.realpath(spec.origin))) if spec else "")')
if [ "$installed_at" != "$ROOT" ]; then
    pip_install --no-deps --no-build-isolation -e "$ROOT"
fi

# Wheels of the runtime extra (pip install "mmrepvgg[runtime]"), kept in a
# wheelhouse outside the checkout: tests/test_runtime_venv.py installs the
# runtime from it into a fresh virtual environment with no network.
WHEELHOUSE=${MMREPVGG_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmrepvgg/wheelhouse}
RUNTIME=("numpy==$("$PYTHON" -c 'import numpy; print(numpy.__version__)')"
         'onnxruntime==1.32.0' 'opencv-python-headless')
if ! "$PYTHON" -m pip download --disable-pip-version-check --no-index \
        --find-links "$WHEELHOUSE" --only-binary :all: -d "$WHEELHOUSE" \
        "${RUNTIME[@]}" >/dev/null 2>&1; then
    "$PYTHON" -m pip download --disable-pip-version-check --only-binary :all: \
        -d "$WHEELHOUSE" "${RUNTIME[@]}"
fi
