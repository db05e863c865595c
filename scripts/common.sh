# What the tiny recipe's scripts share (sourced by scripts/demo.sh and reproduce_table2_tiny.sh).
# DeepSpeed's accelerator: CUDA where there is one, else CPU ranks
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
# a free rendezvous port per launch: another DeepSpeed job on this machine may hold the default
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# a step's banner, with the time (on stderr: functions below print their result on stdout)
step() { printf '\n\033[1m== %s ==  (%s)\033[0m\n' "$*" "$(date +%H:%M:%S)" >&2; }

# pretrained_stages OUT: prints the pretrained stages' folder: "tiny" (pretrained/tiny, shipped),
# or with TINY_FROM_SCRATCH=1 the stages made anew by scripts/pretrain_tiny.py in OUT/pretrain
pretrained_stages() {
    if [ "${TINY_FROM_SCRATCH:-0}" = 1 ]; then
        step "TINY_FROM_SCRATCH=1: the pretrained stages anew (scripts/pretrain_tiny.py -> $1/pretrain)"
        python scripts/pretrain_tiny.py --output "$1/pretrain" >&2
        echo "$1/pretrain/stages"
    else
        step "pretrained stages: pretrained/tiny (shipped; pretrained/tiny/MODEL_CARD.md)"
        echo tiny
    fi
}

# render_demo_objects COUNT RESOLUTION DIR: the first COUNT demo objects of seed 0 (the first
# of the stages' training objects) rendered into DIR on local Ray, as the stages' were
render_demo_objects() {
    step "render $1 demo objects on local Ray -> $3"
    python -m data_pipeline render --source demo --seed 0 --count "$1" --output "$3" --resolution "$2" \
        --samples 32 --no-denoise --per-shard 8
    echo "contact sheet: $3/contact_sheet.png" >&2
}
