#!/usr/bin/env bash
# Set-up on a fresh machine with nothing but Python: a virtualenv in .venv with the CPU build of
# torch first (so that nothing pulls a multi-GB CUDA build), then dtrpo and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch>=2.5,<2.15"
  else
    # 2.13.0 is the CPU build kept on this project's machines; elsewhere pip picks a build for the platform
    .venv/bin/pip install -q torch==2.13.0 || .venv/bin/pip install -q "torch>=2.5,<2.15"
  fi
fi
# DS_BUILD_OPS=0: DeepSpeed (a dev dependency) installs as pure Python, its CUDA/C++ ops left unbuilt; the
# torch installed above satisfies its requirement, so no other torch build is pulled
DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[dev]"
