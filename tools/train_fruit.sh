#!/usr/bin/env bash
# The main job: SOLOv2 trained from random initialisation on fruit_train (14 photos) on the CPU,
# evaluated on fruit_val (4 photos) with COCO mask and box AP, and pictures of its predictions on
# the val photos. Builds the environment first when needed.
#
#   bash tools/train_fruit.sh [KEY VALUE ...]
#
# Arguments are config overrides for configs/fruit/SOLOv2_R18_fruit.yaml, e.g. SOLVER.MAX_ITER 100.
# Environment: SOLOV2_FRUIT_OUTPUT, the output folder (default output/fruit). Its earlier results
# are removed at the start. It receives:
#   log.txt             the full log (progress: iteration, losses, ETA; AP tables at the end)
#   metrics.json        losses, learning rate and times every 20 iterations, then the AP
#                       (detectron2's JSONWriter); events.out.tfevents.* for TensorBoard
#   model_final.pth     the trained model
#   inference/results.json      the final evaluation (segm and bbox AP, AP50, ... per class)
#   inference_TTA/results.json  the same with test-time augmentation (TEST.AUG), when enabled
#   inference/fruit_val/        the predictions in COCO's format
#   predictions/*.jpg   the val photos with the predicted masks, classes and scores
#   learning_curve.png  the training losses and the fruit_val AP at each evaluation
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/bootstrap.sh
PY="${SOLOV2_VENV:-$ROOT/.venv}/bin/python"
CONFIG="configs/fruit/SOLOv2_R18_fruit.yaml"
OUT="${SOLOV2_FRUIT_OUTPUT:-output/fruit}"
START=$(date +%s)

rm -rf "$OUT"/{log.txt,metrics.json,last_checkpoint,config.yaml,inference,inference_TTA,predictions}
rm -f "$OUT"/learning_curve.png
rm -f "$OUT"/events.out.tfevents.* "$OUT"/model_*.pth

echo "[train_fruit] training on fruit_train, then evaluating on fruit_val; output in $OUT" >&2
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"

echo "[train_fruit] drawing the predictions on the fruit_val photos" >&2
mapfile -t VAL_IMAGES < <("$PY" -c '
import solov2_d2
from detectron2.data import DatasetCatalog
print("\n".join(d["file_name"] for d in DatasetCatalog.get("fruit_val")))' 2>/dev/null)
"$PY" demo.py --config-file "$CONFIG" --input "${VAL_IMAGES[@]}" --output "$OUT/predictions" \
    --opts "$@" MODEL.WEIGHTS "$OUT/model_final.pth"

"$PY" -m solov2_d2.engine.learning_curve "$OUT" --title "fruit job: $CONFIG $*" >/dev/null

"$PY" - "$OUT" "$(($(date +%s) - START))" <<'PYTHON'
import json
import os
import sys

import yaml

out, seconds = sys.argv[1], int(sys.argv[2])
with open(f"{out}/config.yaml") as f:
    test_sets = ", ".join(yaml.safe_load(f)["DATASETS"]["TEST"])
with open(f"{out}/inference/results.json") as f:
    results = json.load(f)
if os.path.isfile(f"{out}/inference_TTA/results.json"):
    with open(f"{out}/inference_TTA/results.json") as f:
        results.update(json.load(f))
print(f"\n[train_fruit] {test_sets} after {seconds // 60} min {seconds % 60} s in all:")
for suffix, how in (("_TTA", "with test-time augmentation"), ("", "without")):
    if "segm" + suffix not in results:
        continue
    print(f"  {how}:")
    for task, name in (("segm", "mask"), ("bbox", "box")):
        r = results[task + suffix]
        print(f"    {name:4s} AP {r['AP']:5.1f}   AP50 {r['AP50']:5.1f}   AP75 {r['AP75']:5.1f}")
print(f"  metrics: {out}/inference*/results.json, {out}/metrics.json")
print(f"  pictures: {out}/predictions/, learning curve: {out}/learning_curve.png")
PYTHON
