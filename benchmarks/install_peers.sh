#!/usr/bin/env bash
# Install the peer libraries that benchmarks/bench_peers.py compares against, into an existing venv.
# pyDVL 0.10.0 and dattri 0.3.0 go in with --no-deps (pyDVL pins numpy<2 and would pull other wheels);
# then only the light dependencies their influence modules import, under a constraint that keeps the
# project's torch. Usage: bash benchmarks/install_peers.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
PY="${1:-.venv/bin/python}"
CONSTRAINTS="$(mktemp)"
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$CONSTRAINTS"
"$PY" -m pip install -q --no-deps pydvl==0.10.0 dattri==0.3.0
"$PY" -m pip install -q -c "$CONSTRAINTS" dask==2025.11.0 distributed==2025.11.0 zarr==3.1.3 \
    more-itertools==11.2.1 pyDeprecate==0.14.0 pandas==2.3.3
rm -f "$CONSTRAINTS"
"$PY" -c 'import torch, pydvl.influence.torch, dattri.algorithm.influence_function; print("peers ready, torch", torch.__version__)'
