#!/usr/bin/env bash
# The shared stages of the tiny recipe, the toy stand-ins for the paper's pretrained SVD and LGM
# (used by scripts/demo.sh and scripts/reproduce_table2_tiny.sh; each step resumes when re-run):
#   1. render procedural demo objects on a local Ray cluster into shards (Blender via BlenderProc)
#   2. train the tiny autoencoder on their frames (training/main.py, objective autoencoder), and
#      side by side LGM alone on the clean views (deepspeed, 1 rank; it needs no autoencoder)
#   3. train the multi-view diffusion model alone (deepspeed, CPU ranks)
# Usage: scripts/tiny_pretrain.sh OUT   (knobs: the TINY_* variables below)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # DS_ACCELERATOR, free_port, step

OUT=$1
TRAIN_OBJECTS=${TINY_TRAIN_OBJECTS:-4}
RESOLUTION=${TINY_RESOLUTION:-128}
AE_STEPS=${TINY_AE_STEPS:-800}
DIFFUSION_STEPS=${TINY_DIFFUSION_STEPS:-1500}
LGM_STEPS=${TINY_LGM_STEPS:-200}
RANKS=${TINY_RANKS:-2}
SHARDS="${OUT}/shards/shard-*.tar"

train() { deepspeed --master_port "$(free_port)" --num_accelerators "${RANKS}" training/main.py --data "${SHARDS}" --resume auto "$@"; }

step "render ${TRAIN_OBJECTS} demo objects on local Ray -> ${OUT}/shards"
python -m data_pipeline render --source demo --count "${TRAIN_OBJECTS}" \
    --output "${OUT}/shards" --resolution "${RESOLUTION}" --samples 32 --no-denoise --per-shard 8
echo "contact sheet: ${OUT}/shards/contact_sheet.png"

# The autoencoder (one process) and LGM (one rank) need different things: they train side by side.
step "train the autoencoder for ${AE_STEPS} steps, and beside it LGM alone on the clean views for ${LGM_STEPS} steps"
mkdir -p "${OUT}"
echo "LGM log: ${OUT}/lgm.log"
deepspeed --master_port "$(free_port)" --num_accelerators 1 training/main.py --data "${SHARDS}" --resume auto \
    --config training/configs/tiny_lgm.yaml --output "${OUT}/lgm" --max-steps "${LGM_STEPS}" > "${OUT}/lgm.log" 2>&1 &
lgm=$!
python training/main.py --config tiny_autoencoder --data "${SHARDS}" --output "${OUT}/autoencoder" \
    --max-steps "${AE_STEPS}" --resume auto
echo "round trip: ${OUT}/autoencoder/roundtrip.png; waiting for LGM"
wait "${lgm}" || { echo "LGM training failed: ${OUT}/lgm.log" >&2; tail -20 "${OUT}/lgm.log" >&2; exit 1; }

step "train the multi-view diffusion model alone for ${DIFFUSION_STEPS} steps (${RANKS} CPU ranks)"
train --config training/configs/tiny_diffusion.yaml --output "${OUT}/diffusion" --max-steps "${DIFFUSION_STEPS}" \
    --set "model.overrides.svd_path=${OUT}/autoencoder/export"
