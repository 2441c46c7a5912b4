#!/usr/bin/env bash
# README's first command: a fresh virtual environment with a regular (non-editable) install, then the
# whole loop on the bundled noisy-digits example (store ./influence-store.db, report ./influence-store-report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-demo
.venv-demo/bin/pip install -q torch==2.13.0
.venv-demo/bin/pip install -q .
.venv-demo/bin/influence-store demo --quiet
