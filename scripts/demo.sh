#!/usr/bin/env bash
# The whole flow on the embedded default, on one machine without a GPU (about 30 minutes on
# 2 cores), in the order the paper builds its model: pretrained parts, then joint fine-tuning.
#   1-4. scripts/tiny_pretrain.sh: render demo objects, train the autoencoder, the multi-view
#        diffusion model alone and LGM alone on the clean views
#   5.   fine-tune both jointly with CCM + RGB feedback (Algorithm 1; deepspeed, 2 CPU ranks)
#   6.   GSO benchmark on the objects it was trained on (seen) and held-out ones, apart
# Re-running resumes every step. Knobs: the DEMO_* variables below and TINY_* of tiny_pretrain.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # DS_ACCELERATOR, free_port, step

OUT=${DEMO_OUTPUT:-outputs/demo}
HELDOUT_OBJECTS=${DEMO_HELDOUT_OBJECTS:-3}
JOINT_STEPS=${DEMO_JOINT_STEPS:-60}
SAMPLE_STEPS=${DEMO_SAMPLE_STEPS:-25}
export TINY_TRAIN_OBJECTS=${TINY_TRAIN_OBJECTS:-4} TINY_RESOLUTION=${TINY_RESOLUTION:-128}


bash scripts/tiny_pretrain.sh "${OUT}"

step "joint training with CCM + RGB feedback (Algorithm 1) for ${JOINT_STEPS} steps"
deepspeed --master_port "$(free_port)" --num_accelerators "${TINY_RANKS:-2}" training/main.py \
    --config training/configs/tiny_joint.yaml --data "${OUT}/shards/shard-*.tar" --output "${OUT}/train" \
    --max-steps "${JOINT_STEPS}" --resume auto \
    --set "model.pretrained=${OUT}/diffusion/export" --set "model.overrides.lgm_path=${OUT}/lgm/export/lgm"
echo "TensorBoard: tensorboard --logdir ${OUT}"

step "GSO benchmark: ${TINY_TRAIN_OBJECTS} seen and ${HELDOUT_OBJECTS} held-out demo objects"
python scripts/demo_gso.py --seed 0 --count "${TINY_TRAIN_OBJECTS}" --output "${OUT}/seen_gso"
python scripts/demo_gso.py --count "${HELDOUT_OBJECTS}" --output "${OUT}/heldout_gso"
python eval/gso_benchmark.py --gso-root "seen=${OUT}/seen_gso" --gso-root "held-out=${OUT}/heldout_gso" \
    --checkpoint "${OUT}/train/export" --output "${OUT}/benchmark" --selection all \
    --resolution "${TINY_RESOLUTION}" --steps "${SAMPLE_STEPS}"

step "done"
echo "rendered objects: ${OUT}/shards/contact_sheet.png"
echo "autoencoder:      ${OUT}/autoencoder/roundtrip.png"
echo "training logs:    tensorboard --logdir ${OUT}"
echo "benchmark report: ${OUT}/benchmark/report.md"
