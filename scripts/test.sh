#!/usr/bin/env bash
# Fresh virtual environment with everything the tests need, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test,dask,postgres]'
# An editable install byte-compiles nothing (a regular one does): compile now, so that where writing bytecode is
# off (PYTHONDONTWRITEBYTECODE) a process started from this checkout does not compile its modules every time.
.venv/bin/python -m compileall -q influence_store plugins migrations
# The optional AllenNLP 2.10.1 set (its own metadata pins torch<1.13): --no-deps keeps torch 2.13.0.
.venv/bin/pip install -q --no-deps -r requirements-allennlp.txt
# The example plugin package, installed like a user would (not editable): tests find it through its entry point.
.venv/bin/pip install -q ./examples/influence-store-cg
# kronfluence 1.0.1, the peer the EK-FAC parity tests compare with: --no-deps keeps torch 2.13.0 (it would
# pull torchvision). Its other imports (huggingface_hub, safetensors, requests, PyYAML, ...) come with the
# AllenNLP set above at the versions pinned there; these are the ones that set lacks.
.venv/bin/pip install -q --no-deps kronfluence==1.0.1 accelerate==1.10.1 einops==0.8.1 einconv==0.1.0 \
    opt-einsum==3.4.0 psutil==7.1.0 charset-normalizer==3.4.3
.venv/bin/ruff check .   # the lint rules in pyproject.toml ([tool.ruff])
.venv/bin/python -m pytest -q "$@"
