#!/usr/bin/env bash
# Install lightning-memopt and its test dependencies into the current Python.
# Where no torch is installed, first install the CPU build torch==2.13.0; a torch already there (a CUDA build on a
# GPU machine, say) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
