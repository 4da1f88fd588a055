#!/usr/bin/env bash
# The GPU numbers (issue 17 part 4), in at most 8 minutes on one GPU machine without internet that
# has torch, transformers, peft and accelerate: installs the wheels of bench/wheels/ (made here by
# bench/fetch_wheels.sh, carried with the tree) into a venv that sees the machine's packages, then
# runs bench/scale.py (random Llama-3.2-1B-shaped model, 16k-wide SAE, 1/8/32 mixed adapters).
#
#   bash bench/gpu.sh                   # JSON in $OUT/scale.json (OUT defaults to bench-output)
#   bash bench/gpu.sh --small           # extra arguments go to bench/scale.py
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL_S=${TOTAL_S:-480}
OUT=${OUT:-bench-output}
WHEELS=${WHEELS:-bench/wheels}
PY=${PYTHON:-python3}
VENV=${BENCH_VENV:-.bench-venv}
mkdir -p "$OUT"

if [ ! -f "$WHEELS/service.txt" ]; then
    echo "no $WHEELS/service.txt: run bash bench/fetch_wheels.sh where PyPI is reachable first" >&2
    exit 2
fi
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'transformers', transformers.__version__, \
'peft', peft.__version__)"

# a venv over the machine's packages (torch stays the machine's); plain pip where venv is missing
if [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" 2>/dev/null; then
    PY="$VENV/bin/python"
else
    echo "no venv module: installing into $PY's environment" >&2
    export PIP_BREAK_SYSTEM_PACKAGES=1
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS")
"${PIP[@]}" -r "$WHEELS/service.txt"
"${PIP[@]}" --no-deps -r "$WHEELS/nodeps.txt"
"${PIP[@]}" --no-deps -e . -e clients
echo "installed in $((SECONDS - START)) s" >&2

LEFT=$((TOTAL_S - (SECONDS - START)))
# scale.py stops starting rounds at its budget and writes what it measured; timeout is the backstop
timeout --signal=TERM --kill-after=15 "$((LEFT - 5))" \
    "$PY" bench/scale.py --time-budget-s "$((LEFT - 45))" --out "$OUT/scale.json" "$@"
