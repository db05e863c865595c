#!/usr/bin/env bash
# The whole flow on the embedded default, on one machine without a GPU (about 20 minutes on
# 2 cores): render procedural demo objects on a local Ray cluster into shards, train the tiny
# preset with the deepspeed launcher on two CPU ranks, and score it on held-out demo objects
# with the GSO benchmark. Re-running resumes each step. Override with environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUTPUT:-outputs/demo}
TRAIN_OBJECTS=${DEMO_TRAIN_OBJECTS:-12}
HELDOUT_OBJECTS=${DEMO_HELDOUT_OBJECTS:-3}
RESOLUTION=${DEMO_RESOLUTION:-128}
TRAIN_STEPS=${DEMO_TRAIN_STEPS:-60}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-25}
RANKS=${DEMO_RANKS:-2}

step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

step "1/3 render ${TRAIN_OBJECTS} demo objects on local Ray -> ${OUT}/shards"
python -m data_pipeline render --source demo --count "${TRAIN_OBJECTS}" \
    --output "${OUT}/shards" --resolution "${RESOLUTION}" --samples 32 --no-denoise --per-shard 8
echo "contact sheet: ${OUT}/shards/contact_sheet.png"

step "2/3 train the tiny preset for ${TRAIN_STEPS} steps (deepspeed, ${RANKS} CPU ranks)"
DS_ACCELERATOR=cpu deepspeed --num_accelerators "${RANKS}" training/main.py \
    --config training/configs/tiny.yaml --data "${OUT}/shards/shard-*.tar" \
    --output "${OUT}/train" --max-steps "${TRAIN_STEPS}" --resume auto
echo "TensorBoard: tensorboard --logdir ${OUT}/train/tb"

step "3/3 GSO benchmark on ${HELDOUT_OBJECTS} held-out demo objects"
python scripts/demo_heldout.py --count "${HELDOUT_OBJECTS}" --output "${OUT}/heldout_gso"
python eval/gso_benchmark.py --gso-root "${OUT}/heldout_gso" --checkpoint "${OUT}/train/export" \
    --output "${OUT}/benchmark" --selection "${OUT}/heldout_gso/selection.txt" \
    --steps "${SAMPLE_STEPS}"

step "done"
echo "rendered objects: ${OUT}/shards/contact_sheet.png"
echo "training logs:    ${OUT}/train/tb"
echo "benchmark report: ${OUT}/benchmark/report.md"
