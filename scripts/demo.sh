#!/usr/bin/env bash
# The whole flow on the embedded default, on one machine without a GPU (about 20 minutes on
# 2 cores), in the order the paper builds its model: pretrained parts, then joint fine-tuning.
#   1. the pretrained stages: pretrained/tiny, shipped in the repository (its MODEL_CARD.md: the
#      toy stand-ins for SVD and LGM, made by scripts/pretrain_tiny.py); TINY_FROM_SCRATCH=1
#      makes them anew instead (hours on 2 cores, minutes on a GPU)
#   2. render demo objects on a local Ray cluster into shards (Blender via BlenderProc)
#   3. fine-tune both jointly with CCM + RGB feedback (Algorithm 1; deepspeed, 2 CPU ranks)
#   4. GSO benchmark on the objects it was trained on (seen) and held-out ones, apart
# Re-running resumes every step. Knobs: the DEMO_* variables below.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # DS_ACCELERATOR, free_port, step, pretrained_stages, render_demo_objects

OUT=${DEMO_OUTPUT:-outputs/demo}
TRAIN_OBJECTS=${DEMO_TRAIN_OBJECTS:-4}
HELDOUT_OBJECTS=${DEMO_HELDOUT_OBJECTS:-3}
JOINT_STEPS=${DEMO_JOINT_STEPS:-150}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-25}
RESOLUTION=${DEMO_RESOLUTION:-128}

STAGES=$(pretrained_stages "${OUT}")
render_demo_objects "${TRAIN_OBJECTS}" "${RESOLUTION}" "${OUT}/shards"

step "joint training from ${STAGES} with CCM + RGB feedback (Algorithm 1) for ${JOINT_STEPS} steps"
deepspeed --master_port "$(free_port)" --num_accelerators "${TINY_RANKS:-2}" training/main.py \
    --config training/configs/tiny_joint.yaml --data "${OUT}/shards/shard-*.tar" --output "${OUT}/train" \
    --max-steps "${JOINT_STEPS}" --resume auto --set "model.pretrained=${STAGES}"
echo "TensorBoard: tensorboard --logdir ${OUT}"

step "GSO benchmark: ${TRAIN_OBJECTS} seen and ${HELDOUT_OBJECTS} held-out demo objects"
python scripts/demo_gso.py --seed 0 --count "${TRAIN_OBJECTS}" --output "${OUT}/seen_gso"
python scripts/demo_gso.py --count "${HELDOUT_OBJECTS}" --output "${OUT}/heldout_gso"
python eval/gso_benchmark.py --gso-root "seen=${OUT}/seen_gso" --gso-root "held-out=${OUT}/heldout_gso" \
    --checkpoint "${OUT}/train/export" --output "${OUT}/benchmark" --selection all \
    --resolution "${RESOLUTION}" --steps "${SAMPLE_STEPS}"

step "done"
echo "pretrained stages: ${STAGES}"
echo "rendered objects:  ${OUT}/shards/contact_sheet.png"
echo "training logs:     tensorboard --logdir ${OUT}"
echo "benchmark report:  ${OUT}/benchmark/report.md"
echo "try it:            python -m inference.app --checkpoint ${OUT}/train/export"
