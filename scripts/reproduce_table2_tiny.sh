#!/usr/bin/env bash
# Table 2 of the paper (the feedback ablation) at toy scale, by one command: every row fine-tuned
# from the same pretrained stages (pretrained/tiny; TINY_FROM_SCRATCH=1 makes them anew), on the
# same shards, for the same steps, each decisive row with several training seeds so that its
# seed-to-seed spread is measured beside the differences between rows. Hours on 2 CPU cores,
# minutes on a GPU (the same command; TINY_RANKS=<number of GPUs> there).
#   1. the pretrained stages and the demo objects' shards (as scripts/demo.sh)
#   2. each row, for each of its seeds:
#        two_stage      no joint training, no feedback (the diffusion model alone; LGM as pretrained)
#        joint          joint training (Algorithm 1), no feedback              (decisive: TABLE2_SEEDS)
#        joint_ccm      joint training + CCM feedback
#        joint_ccm_rgb  joint training + CCM + RGB feedback (the paper's model) (decisive: TABLE2_SEEDS)
#   3. each run scored by the GSO benchmark as trained, on the same seen and held-out objects
#   4. eval.ablation: the table (3DGS PSNR / SSIM / LPIPS, the Δ columns, each row's mean and
#      spread over its seeds) and image strips
# Re-running resumes every step. Result: ${OUT}/table2/table2.md
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh  # DS_ACCELERATOR, free_port, step, pretrained_stages, render_demo_objects

OUT=${TABLE2_OUTPUT:-outputs/table2_tiny}
TRAIN_OBJECTS=${TABLE2_TRAIN_OBJECTS:-4}
HELDOUT_OBJECTS=${TABLE2_HELDOUT_OBJECTS:-3}
JOINT_STEPS=${TABLE2_JOINT_STEPS:-300}
SAMPLE_STEPS=${TABLE2_SAMPLE_STEPS:-25}
SEEDS=${TABLE2_SEEDS:-0 1}           # training seeds of the decisive rows
OTHER_SEEDS=${TABLE2_OTHER_SEEDS:-0} # of the two others
RESOLUTION=${TABLE2_RESOLUTION:-128}
RANKS=${TINY_RANKS:-2}

STAGES=$(pretrained_stages "${OUT}")
render_demo_objects "${TRAIN_OBJECTS}" "${RESOLUTION}" "${OUT}/shards"
python scripts/demo_gso.py --seed 0 --count "${TRAIN_OBJECTS}" --output "${OUT}/seen_gso"
python scripts/demo_gso.py --count "${HELDOUT_OBJECTS}" --output "${OUT}/heldout_gso"

ROWS=(two_stage:false:none:other joint:true:none:decisive joint_ccm:true:ccm:other joint_ccm_rgb:true:ccm_rgb:decisive)
BENCHES=()
for row in "${ROWS[@]}"; do
    IFS=: read -r name joint feedback kind <<<"${row}"
    seeds=${OTHER_SEEDS}
    [ "${kind}" = decisive ] && seeds=${SEEDS}
    for seed in ${seeds}; do
        run="${name}_s${seed}"
        step "run ${run}: joint_training=${joint}, feedback=${feedback}, seed ${seed}, ${JOINT_STEPS} steps"
        deepspeed --master_port "$(free_port)" --num_accelerators "${RANKS}" training/main.py \
            --config training/configs/tiny_joint.yaml --data "${OUT}/shards/shard-*.tar" --output "${OUT}/runs/${run}" \
            --max-steps "${JOINT_STEPS}" --resume auto --set "seed=${seed}" --set "model.pretrained=${STAGES}" \
            --set "model.overrides.joint_training=${joint}" --set "model.overrides.feedback=${feedback}"
        step "run ${run}: GSO benchmark"
        python eval/gso_benchmark.py --gso-root "seen=${OUT}/seen_gso" --gso-root "held-out=${OUT}/heldout_gso" \
            --checkpoint "${OUT}/runs/${run}/export" --output "${OUT}/bench/${run}" --selection all \
            --resolution "${RESOLUTION}" --steps "${SAMPLE_STEPS}" --variants ouroboros
        BENCHES+=(--row "${OUT}/bench/${run}")
    done
done

step "Table 2"
python -m eval.ablation "${BENCHES[@]}" --output "${OUT}/table2" --title "Table 2 at toy scale (tiny preset, CPU)"
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)" | tee "${OUT}/table2/commit.txt"
