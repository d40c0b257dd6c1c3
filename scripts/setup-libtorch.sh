#!/usr/bin/env bash
# Make (or reuse) a Python venv with PyPI torch==2.9.0, the LibTorch that burn-tch 0.21 (through
# tch 0.22) is built against, and print the environment to build and run with `--features tch`.
#
#   eval "$(scripts/setup-libtorch.sh)"      # sets LIBTORCH_USE_PYTORCH, PATH, LD_LIBRARY_PATH
#   cargo test --features tch --test backends
#
# The venv lives in ${DAPE_TORCH_VENV:-$HOME/.cache/dape/torch-venv}; the wheel pulls the CUDA
# libraries too (about 3 GB), so keep that folder between runs. Progress goes to stderr; stdout
# holds only the `export` lines.
set -euo pipefail

VENV=${DAPE_TORCH_VENV:-$HOME/.cache/dape/torch-venv}
TORCH_VERSION=2.9.0

die() { echo "setup-libtorch: error: $*" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || die "python3 is required (e.g. apt-get install python3 python3-venv)"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup-libtorch: installing torch==$TORCH_VERSION into $VENV (about 3 GB, once)" >&2
  python3 -m venv "$VENV" >&2 || die "cannot create a venv in $VENV (is python3-venv installed?)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" >&2 \
    || die "pip could not install torch==$TORCH_VERSION from PyPI"
fi

lib=$("$VENV/bin/python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))" 2>/dev/null)
[ -f "$lib/libtorch_cpu.so" ] || die "no libtorch_cpu.so in $lib"
echo "setup-libtorch: torch $TORCH_VERSION ready in $VENV" >&2
echo "export LIBTORCH_USE_PYTORCH=1"
echo "export PATH=\"$VENV/bin:\$PATH\""
echo "export LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
