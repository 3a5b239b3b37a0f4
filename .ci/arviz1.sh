#!/usr/bin/env bash
# ArviZ 1.x reads pima-pyro's export: where a Python >= 3.12 exists, a small environment with
# ArviZ 1.x, xarray and h5netcdf (no torch) opens a NetCDF exported by the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for candidate in python3.13 python3.12 $(ls -d "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null); do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
        PY="$candidate"; break
    fi
done
if [ -z "$PY" ]; then
    echo "arviz1: skipped (no Python >= 3.12 on this machine)"; exit 0
fi
if [ ! -x .venv-arviz1/bin/python ]; then
    "$PY" -m venv .venv-arviz1
    .venv-arviz1/bin/python -m pip install --quiet "arviz>=1,<2" xarray h5netcdf h5py matplotlib
fi
.venv/bin/python .ci/export_for_arviz1.py .venv-arviz1/export.nc > /dev/null
.venv-arviz1/bin/python .ci/arviz1_check.py .venv-arviz1/export.nc
