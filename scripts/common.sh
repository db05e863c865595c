# What the tiny recipe's scripts share (sourced by scripts/demo.sh, tiny_pretrain.sh,
# reproduce_table2_tiny.sh).
# DeepSpeed's accelerator: CUDA where there is one, else CPU ranks
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
# a free rendezvous port per launch: another DeepSpeed job on this machine may hold the default
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# a step's banner, with the time
step() { printf '\n\033[1m== %s ==  (%s)\033[0m\n' "$*" "$(date +%H:%M:%S)"; }
