#!/usr/bin/env bash
# Table 2 of the paper (the feedback ablation) at toy scale, by one command: about 65 minutes on
# 2 CPU cores, minutes on a GPU (the same command; TINY_RANKS=<number of GPUs> there).
#   1-4. scripts/tiny_pretrain.sh: shared by every row (shards, autoencoder, the diffusion model
#        alone, LGM alone on clean views), the toy stand-ins for pretrained SVD and LGM;
#        TABLE2_BASE=outputs/demo reuses the demo's
#   5.   each row fine-tuned from those same weights, on the same shards, for the same steps:
#          two_stage      no joint training, no feedback (the diffusion model alone; LGM as pretrained)
#          joint          joint training (Algorithm 1), no feedback
#          joint_ccm      joint training + CCM feedback
#          joint_ccm_rgb  joint training + CCM + RGB feedback (the paper's model)
#   6.   each row scored by the GSO benchmark as trained, on the same seen and held-out objects
#   7.   eval.ablation: the table (3DGS PSNR / SSIM / LPIPS and the Δ columns) and image strips
# Re-running resumes every step. Result: ${OUT}/table2/table2.md
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # DS_ACCELERATOR, free_port, step

OUT=${TABLE2_OUTPUT:-outputs/table2_tiny}
BASE=${TABLE2_BASE:-${OUT}/pretrain}
JOINT_STEPS=${TABLE2_JOINT_STEPS:-100}
HELDOUT_OBJECTS=${TABLE2_HELDOUT_OBJECTS:-3}
SAMPLE_STEPS=${TABLE2_SAMPLE_STEPS:-25}
RANKS=${TINY_RANKS:-2}
export TINY_TRAIN_OBJECTS=${TINY_TRAIN_OBJECTS:-4} TINY_RESOLUTION=${TINY_RESOLUTION:-128}


bash scripts/tiny_pretrain.sh "${BASE}"
python scripts/demo_gso.py --seed 0 --count "${TINY_TRAIN_OBJECTS}" --output "${OUT}/seen_gso"
python scripts/demo_gso.py --count "${HELDOUT_OBJECTS}" --output "${OUT}/heldout_gso"

ROWS=(two_stage:false:none joint:true:none joint_ccm:true:ccm joint_ccm_rgb:true:ccm_rgb)
BENCHES=()
for row in "${ROWS[@]}"; do
    IFS=: read -r name joint feedback <<<"${row}"
    step "row ${name}: joint_training=${joint}, feedback=${feedback}, ${JOINT_STEPS} steps"
    deepspeed --master_port "$(free_port)" --num_accelerators "${RANKS}" training/main.py --config training/configs/tiny_joint.yaml \
        --data "${BASE}/shards/shard-*.tar" --output "${OUT}/runs/${name}" --max-steps "${JOINT_STEPS}" \
        --resume auto --set "model.pretrained=${BASE}/diffusion/export" \
        --set "model.overrides.lgm_path=${BASE}/lgm/export/lgm" \
        --set "model.overrides.joint_training=${joint}" --set "model.overrides.feedback=${feedback}"
    step "row ${name}: GSO benchmark"
    python eval/gso_benchmark.py --gso-root "seen=${OUT}/seen_gso" --gso-root "held-out=${OUT}/heldout_gso" \
        --checkpoint "${OUT}/runs/${name}/export" --output "${OUT}/bench/${name}" --selection all \
        --resolution "${TINY_RESOLUTION}" --steps "${SAMPLE_STEPS}" --variants ouroboros
    BENCHES+=(--row "${OUT}/bench/${name}")
done

step "Table 2"
python -m eval.ablation "${BENCHES[@]}" --output "${OUT}/table2" --title "Table 2 at toy scale (tiny preset, CPU)"
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)" | tee "${OUT}/table2/commit.txt"
