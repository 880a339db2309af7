#!/usr/bin/env bash
# The main job, end to end on a CPU:
#   install -> synthetic demo dataset (COCO panoptic format -> DeepLab2
#   TFRecords) -> train_and_eval of a narrow kMaX-DeepLab -> PQ ->
#   SavedModel export -> rendered predictions.
#
#   bash demo.sh [OUTPUT_DIR]        (default: demo_output)
#
# Running it again resumes from the last checkpoint instead of retraining.
set -euo pipefail
cd "$(dirname "$0")"
OUT="$(python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "${1:-demo_output}")"
CONFIG=configs/demo/kmax_demo.textproto
export DEMO_DIR="$OUT/data"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
START=$(date +%s)

echo "== 1/5 install"
python3 -m pip install -q -e .

echo "== 2/5 demo dataset -> $DEMO_DIR"
# Reuses a complete earlier build; an interrupted one is built again.
python3 data/build_demo_data.py --output_dir="$DEMO_DIR" --reuse_existing

echo "== 3/5 train_and_eval -> $OUT/model"
python3 trainer/train.py --config_file="$CONFIG" --mode=train_and_eval \
  --model_dir="$OUT/model"

echo "== 4/5 panoptic quality (and instance AP) on the demo validation split"
python3 - "$OUT/model/kmax_demo/eval_metrics.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
m = report['metrics']
print(f"step {report['step']}, {report['num_examples']} images: "
      f"PQ {100 * m['evaluation/pq/PQ']:.1f}  SQ {100 * m['evaluation/pq/SQ']:.1f}  "
      f"RQ {100 * m['evaluation/pq/RQ']:.1f}  "
      f"PQ_thing {100 * m['evaluation/pq/PQ_thing']:.1f}  "
      f"PQ_stuff {100 * m['evaluation/pq/PQ_stuff']:.1f}  "
      f"mIoU {100 * m['evaluation/iou/mIoU']:.1f}  "
      f"AP {100 * m.get('evaluation/ap/AP', 0.0):.1f}")
print(f"{'class':<10} {'kind':<6} {'PQ':>5} {'SQ':>5} {'RQ':>5} "
      f"{'TP':>4} {'FN':>4} {'FP':>4}")
for name, row in report.get('panoptic_quality_per_class', {}).items():
  print(f"{name:<10} {'thing' if row['is_thing'] else 'stuff':<6} "
        f"{100 * row['PQ']:5.1f} {100 * row['SQ']:5.1f} {100 * row['RQ']:5.1f} "
        f"{row['TP']:4.0f} {row['FN']:4.0f} {row['FP']:4.0f}")
PY

echo "== 5/5 SavedModel export and rendered predictions"
python3 trainer/export_model.py --config_file="$CONFIG" \
  --checkpoint_path="$OUT/model/kmax_demo" --output_path="$OUT/saved_model/1" \
  --overwrite
python3 -m deeplab_kmax.predict --saved_model="$OUT/saved_model/1" \
  --inputs="$DEMO_DIR/coco/val2017/00000050000[1-6].jpg" \
  --output_dir="$OUT/predictions"
python3 -m deeplab_kmax.comparison_sheet --predictions="$OUT/predictions" \
  --ground_truth="$DEMO_DIR/coco/annotations/panoptic_val2017.json" \
  --images="$DEMO_DIR/coco/val2017" \
  --dataset_descriptor="$DEMO_DIR/demo_shapes.json" \
  --output="$OUT/predictions/comparison.png"

echo "done in $(( $(date +%s) - START )) s: overlays in $OUT/predictions/*_overlay.png,"
echo "image | ground truth | prediction in $OUT/predictions/comparison.png"
echo "try it in a browser (pip install -e \".[app]\" first): DEMO_DIR=$DEMO_DIR python3 -m deeplab_kmax.app --config_file=$CONFIG --checkpoint_path=$OUT/model/kmax_demo --examples_dir=$DEMO_DIR/coco/val2017  then open http://127.0.0.1:7860"
