#!/usr/bin/env bash
# The shared stages of the tiny recipe, the toy stand-ins for the paper's pretrained SVD and LGM
# (used by scripts/demo.sh and scripts/reproduce_table2_tiny.sh; each step resumes when re-run):
#   1. render procedural demo objects on a local Ray cluster into shards (Blender via BlenderProc)
#   2. train the tiny autoencoder on their frames (python -m training.autoencoder), and side by
#      side LGM alone on the clean views (deepspeed, 1 rank; it needs no autoencoder)
#   3. train the multi-view diffusion model alone (deepspeed, CPU ranks)
# Usage: scripts/tiny_pretrain.sh OUT   (knobs: the TINY_* variables below)
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's accelerator: CUDA where there is one, else CPU ranks
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
# a free rendezvous port per launch: another DeepSpeed job on this machine may hold the default
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

OUT=$1
TRAIN_OBJECTS=${TINY_TRAIN_OBJECTS:-4}
RESOLUTION=${TINY_RESOLUTION:-128}
AE_STEPS=${TINY_AE_STEPS:-800}
DIFFUSION_STEPS=${TINY_DIFFUSION_STEPS:-1500}
LGM_STEPS=${TINY_LGM_STEPS:-200}
RANKS=${TINY_RANKS:-2}
SHARDS="${OUT}/shards/shard-*.tar"

step() { printf '\n\033[1m== %s ==  (%s)\033[0m\n' "$*" "$(date +%H:%M:%S)"; }
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
python -m training.autoencoder --data "${SHARDS}" --output "${OUT}/autoencoder" --steps "${AE_STEPS}" --batch 1
echo "round trip: ${OUT}/autoencoder/roundtrip.png; waiting for LGM"
wait "${lgm}" || { echo "LGM training failed: ${OUT}/lgm.log" >&2; tail -20 "${OUT}/lgm.log" >&2; exit 1; }

step "train the multi-view diffusion model alone for ${DIFFUSION_STEPS} steps (${RANKS} CPU ranks)"
train --config training/configs/tiny_diffusion.yaml --output "${OUT}/diffusion" --max-steps "${DIFFUSION_STEPS}" \
    --set "model.overrides.svd_path=${OUT}/autoencoder/svd"
