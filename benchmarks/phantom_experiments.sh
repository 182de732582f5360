#!/usr/bin/env bash
# Issue 16's experiments on the phantoms, in order, each resumable (a rerun skips what finished):
#   reproducibility -> cross-validation -> compound scaling (implant) and its budget checks (at
#   half and twice its budget) -> voting + measures of its best model -> efficiency vs IoU
#   seed 0 (bone) -> voting + measures of its best model -> its budget check (cpu_x2) ->
#   efficiency vs IoU, both seeds.
# Results go to benchmarks/results/; runs to $WORK (default /tmp/bonejax-experiments).
#   bash benchmarks/phantom_experiments.sh            # everything, hours on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${WORK:-/tmp/bonejax-experiments}
mkdir -p "$WORK"
# A failing step is reported and the next one runs (each records its own failures).
step() {
  echo "=== $(date +%T) $*" >&2
  local rc=0
  "$@" || rc=$?
  [ "$rc" -eq 0 ] || echo "=== $(date +%T) FAILED (exit $rc): $*" >&2
}

best_bundle() {  # the model of the grid cell with the best validation miou_fg
  $PY - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
cells, runs = Path(sys.argv[1]), Path(sys.argv[2])
recs = [json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))]
ok = [r for r in recs if r.get("status") == "ok" and r.get("test_miou_fg") is not None]
best = max(ok, key=lambda r: r.get("val_miou_fg") or 0.0)  # selected on validation
print(runs / best["cell"] / "model")
PY
}
test_scan() { echo "$1/data/scan_004"; }  # the grids' held-out test scan (5 scans: the last)

TAG=$($PY -c "from benchmarks import common; print(common.machine_tag())")
step $PY benchmarks/reproducibility.py --workdir="$WORK/repro"
step $PY benchmarks/crossval_phantom.py --workdir="$WORK/crossval/bone"
step $PY benchmarks/efficiency_vs_iou.py --grid=scaling --workdir="$WORK/scaling"
step $PY benchmarks/efficiency_vs_iou.py --grid=scaling_half --workdir="$WORK/scaling_half" \
  --data="$WORK/scaling/data"
step $PY benchmarks/efficiency_vs_iou.py --grid=scaling_x2 --workdir="$WORK/scaling_x2" \
  --data="$WORK/scaling/data"
step $PY benchmarks/voting_measures.py --name=implant \
  --bundle="$(best_bundle benchmarks/results/efficiency_scaling_${TAG}_cells "$WORK/scaling/runs")" \
  --scan="$(test_scan "$WORK/scaling")"
step $PY benchmarks/efficiency_vs_iou.py --grid=cpu --seeds=0 --workdir="$WORK/cpu"
step $PY benchmarks/voting_measures.py --name=bone \
  --bundle="$(best_bundle benchmarks/results/efficiency_cpu_${TAG}_cells "$WORK/cpu/runs")" \
  --scan="$(test_scan "$WORK/cpu")"
step $PY benchmarks/efficiency_vs_iou.py --grid=cpu_x2 --workdir="$WORK/cpu_x2" \
  --data="$WORK/cpu/data"
step $PY benchmarks/efficiency_vs_iou.py --grid=cpu --workdir="$WORK/cpu"
echo "=== $(date +%T) done" >&2
