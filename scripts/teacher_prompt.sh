#!/usr/bin/env bash
# Which sparse prompt LiteMedSAM takes beside the learner's dense one in phase 1: none, or a box round the
# whole slice (the prompt it was trained with). Two epochs each from the same start (the bundled network, as
# in the ablation's round 2) on the same slices (their embeddings cached): the teacher-guided loss, epoch by
# epoch. (Validation would run the teacher over whole volumes: minutes a case on a CPU.)
#   WORK=demo-work bash scripts/teacher_prompt.sh      (after scripts/ablation_teacher.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-demo-work}
for PROMPT in none full_box; do
  [ -f "$WORK/abl-prompt-$PROMPT/log.csv" ] || $PY -m samless train phase1 --split "$WORK/abl-train/split.json" \
      --out "$WORK/abl-prompt-$PROMPT" --model hardnet39ds_256 --context-slices 1 --batch-size 8 \
      --samples-per-epoch 256 --seed 5 --device cpu --workers 2 --data-cache "$WORK/abl-cache" \
      --sam-type lite_medsam --sparse-prompt "$PROMPT" --embedding-cache "$WORK/abl-emb" --no-augment \
      --optimizer adamw --lr 0.0003 --schedule constant --epochs 2 --val-every 0 \
      --init samless-demo --aggregator conv_upsample_detail
done
for PROMPT in none full_box; do echo "$PROMPT:"; cat "$WORK/abl-prompt-$PROMPT/log.csv"; done
