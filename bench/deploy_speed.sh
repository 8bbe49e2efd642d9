#!/usr/bin/env bash
# The deployment figures of the README (issue 25), in one run on one machine: per-image time of
# PyTorch eager float32, ONNX Runtime float32 and ONNX Runtime int8 for
#   * the trained fruit model (FRUIT_WEIGHTS, default output/recipe/seed0/model_final.pth) on the
#     fruit_val photos, with the fruit_val mask and box AP of the float and int8 files
#     (train_net.py --eval-only --onnx);
#   * SOLOv2-R50 at 800x1333 with random weights (seed 0) on 4 coco_mini_val photos.
# Both are quantized alike: --quantize int8 with 14 calibration images (fruit_train; the first
# 14 of coco_mini_val for R50). Needs SOLOV2_DATASETS to hold fruit/ and coco_mini/ (e.g.
# ../shared/data). Output under output/deploy; run it on a quiet machine.
#
#   SOLOV2_DATASETS=../shared/data bash bench/deploy_speed.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${SOLOV2_VENV:-$ROOT/.venv}/bin/python"
OUT=output/deploy
FRUIT_CONFIG=configs/fruit/SOLOv2_R18_fruit.yaml
FRUIT_WEIGHTS="${FRUIT_WEIGHTS:-output/recipe/seed0/model_final.pth}"
R50_CONFIG=configs/SOLOv2_R50_3x.yaml
mkdir -p "$OUT"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed -E 's/^Flags:.*/int8 instructions: /' >"$OUT/cpu.txt"
grep -o -w -E "avx2|avx512_vnni|avx_vnni|amx_int8" /proc/cpuinfo | sort -u | tr '\n' ' ' >>"$OUT/cpu.txt"
echo >>"$OUT/cpu.txt"
cat "$OUT/cpu.txt"

echo "== fruit model: export, int8, evaluation" >&2
rm -rf "$OUT/fruit"
"$PY" -m solov2_d2.export --config-file "$FRUIT_CONFIG" --output "$OUT/fruit" \
    --quantize int8 --calibration fruit_train --calibration-images 14 MODEL.WEIGHTS "$FRUIT_WEIGHTS"
for model in model model_int8; do
    "$PY" train_net.py --config-file "$FRUIT_CONFIG" --eval-only --onnx "$OUT/fruit/$model.onnx" \
        OUTPUT_DIR "$OUT/fruit/eval_$model" >/dev/null
done
"$PY" train_net.py --config-file "$FRUIT_CONFIG" --eval-only MODEL.WEIGHTS "$FRUIT_WEIGHTS" \
    OUTPUT_DIR "$OUT/fruit/eval_eager" >/dev/null
"$PY" - "$OUT/fruit" <<'PYTHON'
import json
import sys

print("| fruit_val | mask AP | mask AP50 | box AP | box AP50 |\n|---|---:|---:|---:|---:|")
for name in ("eager", "model", "model_int8"):
    with open(f"{sys.argv[1]}/eval_{name}/inference/results.json") as f:
        r = json.load(f)
    s, b = r["segm"], r["bbox"]
    label = {"eager": "PyTorch eager", "model": "ONNX float32", "model_int8": "ONNX int8"}[name]
    print(f"| {label} | {s['AP']:.1f} | {s['AP50']:.1f} | {b['AP']:.1f} | {b['AP50']:.1f} |")
PYTHON
"$PY" bench/bench_onnx.py --config-file "$FRUIT_CONFIG" --onnx "$OUT/fruit/model.onnx" \
    --int8 "$OUT/fruit/model_int8.onnx" --openvino --repeat 5 --json "$OUT/fruit/speed.json" \
    MODEL.WEIGHTS "$FRUIT_WEIGHTS"

echo "== SOLOv2-R50 800x1333, random weights: export, int8, speed" >&2
rm -rf "$OUT/r50"
mkdir -p "$OUT/r50"
"$PY" - "$R50_CONFIG" "$OUT/r50/model.pth" <<'PYTHON'
import sys

import solov2_d2  # noqa: F401  # isort: split
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

cfg = get_cfg()
solov2_d2.add_solov2_config(cfg)
cfg.merge_from_file(sys.argv[1])
cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = "", "cpu"
torch.manual_seed(0)
model = build_model(cfg)
torch.save({"model": model.state_dict()}, sys.argv[2])
PYTHON
"$PY" -m solov2_d2.export --config-file "$R50_CONFIG" --output "$OUT/r50" --quantize int8 \
    --calibration coco_mini_val --calibration-images 14 \
    MODEL.WEIGHTS "$OUT/r50/model.pth" MODEL.DEVICE cpu
mapfile -t PHOTOS < <("$PY" -c '
import solov2_d2
from detectron2.data import DatasetCatalog
print("\n".join(d["file_name"] for d in DatasetCatalog.get("coco_mini_val")[20:24]))' 2>/dev/null)
"$PY" bench/bench_onnx.py --config-file "$R50_CONFIG" --onnx "$OUT/r50/model.onnx" \
    --int8 "$OUT/r50/model_int8.onnx" --openvino --input "${PHOTOS[@]}" --repeat 3 \
    --json "$OUT/r50/speed.json" MODEL.WEIGHTS "$OUT/r50/model.pth" MODEL.DEVICE cpu
