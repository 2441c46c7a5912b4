#!/usr/bin/env bash
# Fresh virtual environment with a regular (non-editable) install, then the bundled example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-demo
.venv-demo/bin/pip install -q torch==2.13.0
.venv-demo/bin/pip install -q .
.venv-demo/bin/python examples/digits_noisy.py
