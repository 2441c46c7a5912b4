#!/usr/bin/env bash
# Fresh virtual environment with everything the tests need, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test,dask,postgres]'
# The optional AllenNLP 2.10.1 set (its own metadata pins torch<1.13): --no-deps keeps torch 2.13.0.
.venv/bin/pip install -q --no-deps -r requirements-allennlp.txt
# The example plugin package, installed like a user would (not editable): tests find it through its entry point.
.venv/bin/pip install -q ./examples/influence-store-cg
.venv/bin/python -m pytest -q "$@"
