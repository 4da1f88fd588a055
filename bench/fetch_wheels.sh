#!/usr/bin/env bash
# Download, here where PyPI is reachable, the wheels bench/gpu.sh installs offline on a GPU machine
# that already has torch, transformers, peft and accelerate (and their dependencies):
#   - the service's own stack (fastapi, uvicorn, pydantic-settings, httpx, ...), with dependencies,
#     binary wheels for each Python in PYVERSIONS (pip picks the matching one there);
#   - sae-lens and transformer-lens WITHOUT their dependencies (datasets, pyarrow, pandas, wandb,
#     plotly, ... would be ~150 MB): only the small modules their import needs; bench/scale.py
#     stands in for the heavy ones that are missing (never used when loading or running an SAE);
#   - setuptools, wheel and packaging, to build the editable installs of lorasae and lorasae-client offline.
# Versions are pinned to the ones installed in .venv (the ones the tests run with).
#
#   bash bench/fetch_wheels.sh            # -> bench/wheels/ (keep it out of git; carried to the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-bench/wheels}
PY=${PYTHON:-.venv/bin/python}
PYVERSIONS=${PYVERSIONS:-"3.11 3.12 3.13"}  # the pinned fastapi needs >= 3.11
PLATFORM=${PLATFORM:-manylinux2014_x86_64}

pin() {  # name==version as installed in .venv
    for name in "$@"; do
        echo "$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
    done
}
SERVICE=$(pin fastapi uvicorn pydantic-settings httpx python-multipart prometheus-client pydantic requests)
NODEPS=$(pin sae-lens transformer-lens einops jaxtyping wadler-lindig better-abc simple-parsing \
    docstring-parser python-dotenv tenacity typeguard setuptools packaging)" wheel"

rm -rf "$DEST"
mkdir -p "$DEST"
for v in $PYVERSIONS; do
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --dest "$DEST" --only-binary=:all: --python-version "$v" \
        --platform "$PLATFORM" --implementation cp $SERVICE
done
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: $NODEPS
# what gpu.sh installs: the top-level names (pip resolves the rest from the folder)
printf '%s\n' $SERVICE > "$DEST/service.txt"
printf '%s\n' $NODEPS > "$DEST/nodeps.txt"
ls -l "$DEST" | awk 'NR > 1 {print $5, $9}'
du -sh "$DEST"
