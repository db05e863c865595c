"""Train the pretrained tiny stages once, on many procedural objects (resumable at every step).

    python scripts/pretrain_tiny.py --output outputs/pretrain [--config scripts/pretrain_tiny.yaml]

1. render the training and held-out demo objects (``<output>/shards/seed<S>``, a render job a
   seed, 2 x 16 frames each);
2. train the autoencoder (the colour recipe) and, beside it, LGM alone on the clean views;
3. train the multi-view diffusion model alone on the autoencoder's latent (as soon as the
   autoencoder is done, beside LGM if it still trains);
4. assemble ``<output>/stages``: one ``Ouroboros3D`` export (the diffusion stage's UNet and
   autoencoder, the LGM stage's LGM), loaded by ``Ouroboros3D.from_pretrained`` as any
   checkpoint; ``pretrained/tiny`` in the repository is a copy of it;
5. score them (``<output>/scores``, what ``pretrained/tiny/MODEL_CARD.md`` reports): the
   autoencoder on the held-out objects, the stages' GSO benchmark on seen and held-out
   objects, the training curves.

Each stage is a run of ``training/main.py`` with a shipped config and the ``--set`` assignments
of the knob file (``scripts/pretrain_tiny.yaml``); its log is ``<output>/logs/<stage>.log``.
Re-running resumes every step (a finished render or run is a no-op).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

from common.atomic import atomic_write_text  # noqa: E402
from training.engine import free_port  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}  ({time.strftime('%H:%M:%S')})", flush=True)


def render(seed: int, count: int, knobs: dict, out: Path) -> None:
    say(f"render {count} demo objects of seed {seed} -> {out}")
    subprocess.run([sys.executable, "-m", "data_pipeline", "render", "--source", "demo", "--seed", str(seed),
                    "--count", str(count), "--output", str(out), "--resolution", str(knobs["resolution"]),
                    "--samples", str(knobs["samples"]), "--no-denoise", "--per-shard", str(knobs["per_shard"])],
                   cwd=REPO, check=True)  # fmt: skip


def stage_command(stage: dict, shards: Path, run: Path, extra: list[str]) -> list[str]:
    """The trainer's command line of a stage: deepspeed with ``ranks`` processes, or one process."""
    data = "::".join(str(shards / f"seed{s}" / "shard-*.tar") for s in stage["seeds"])
    args = ["training/main.py", "--config", stage["config"], "--data", data, "--output", str(run),
            "--resume", "auto", *(x for a in [*stage["set"], *extra] for x in ("--set", a))]
    if stage["ranks"] == 1:
        return [sys.executable, *args]
    return ["deepspeed", "--master_port", str(free_port()), "--num_accelerators", str(stage["ranks"]), *args]


def start(name: str, stage: dict, out: Path, extra: list[str] = ()) -> subprocess.Popen:
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"stage {name}: {stage['config']} (log {log})")
    cmd = stage_command(stage, out / "shards", out / name, list(extra))
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def wait(name: str, proc: subprocess.Popen, out: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}): see {out / 'logs' / f'{name}.log'}")
    say(f"stage {name} done")


def assemble(out: Path) -> Path:
    """``<output>/stages``: the diffusion stage's export with the LGM stage's LGM (self-contained,
    as every ``save_pretrained`` folder: its config names no folder of the machine that made it)."""
    from model.ouroboros import Ouroboros3D

    model = Ouroboros3D.from_pretrained(out / "diffusion" / "export", lgm_path=str(out / "lgm" / "export" / "lgm"))
    model.save_pretrained(out / "stages")
    return out / "stages"


def score(out: Path, knobs: dict) -> Path:
    """``<output>/scores``: what the model card reports. The autoencoder's round trip on the
    held-out objects' frames (``bench/bench_autoencoder.py``, beside a random one; a picture),
    the stages' GSO benchmark (Algorithm 2 before any joint fine-tuning) on seen and held-out
    objects apart, and the three runs' training curves."""
    scores, run = out / "scores", knobs["score"]
    scores.mkdir(parents=True, exist_ok=True)
    first_seed, heldout_seed = next(iter(knobs["train_objects"])), next(iter(knobs["heldout_objects"]))
    say(f"score: autoencoder round trip on the held-out objects (seed {heldout_seed})")
    table = subprocess.run([sys.executable, "bench/bench_autoencoder.py", "--svd", str(out / "autoencoder" / "export"),
                            "--data", str(out / "shards" / f"seed{heldout_seed}" / "shard-*.tar"), "--random",
                            "--picture", str(scores / "autoencoder_heldout.png")],
                           cwd=REPO, check=True, capture_output=True, text=True).stdout  # fmt: skip
    atomic_write_text(scores / "autoencoder_heldout.md", table)
    print(table, flush=True)
    say("score: the stages' GSO benchmark, seen and held-out objects")
    for split, seed, count in (("seen", first_seed, run["seen_objects"]), ("heldout", heldout_seed, run["heldout_objects"])):
        subprocess.run([sys.executable, "scripts/demo_gso.py", "--seed", str(seed), "--count", str(count),
                        "--output", str(scores / f"{split}_gso")], cwd=REPO, check=True)  # fmt: skip
    subprocess.run([sys.executable, "eval/gso_benchmark.py", "--gso-root", f"seen={scores / 'seen_gso'}",
                    "--gso-root", f"held-out={scores / 'heldout_gso'}", "--checkpoint", str(out / "stages"),
                    "--output", str(scores / "benchmark"), "--selection", "all", "--resolution",
                    str(knobs["render"]["resolution"]), "--steps", str(run["sample_steps"]), "--variants", "ouroboros"],
                   cwd=REPO, check=True)  # fmt: skip
    subprocess.run([sys.executable, "tools/plot_losses.py", *(f"--run={name}={out / name}" for name in knobs["stages"]),
                    "--key", "loss", "--key", "autoencoder:psnr", "--smooth", "100", "--log",
                    "--output", str(scores / "curves.png")], cwd=REPO, check=True)  # fmt: skip
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO / "scripts" / "pretrain_tiny.yaml")
    args = p.parse_args()
    knobs = yaml.safe_load(args.config.read_text())
    out, stages = args.output.resolve(), knobs["stages"]
    if not os.environ.get("DS_ACCELERATOR"):
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    first_seed, *other_seeds = knobs["train_objects"]
    render(first_seed, knobs["train_objects"][first_seed], knobs["render"], out / "shards" / f"seed{first_seed}")
    autoencoder = start("autoencoder", stages["autoencoder"], out)  # trains on the first seed
    for seed in other_seeds:
        render(seed, knobs["train_objects"][seed], knobs["render"], out / "shards" / f"seed{seed}")
    for seed, count in knobs["heldout_objects"].items():
        render(seed, count, knobs["render"], out / "shards" / f"seed{seed}")
    lgm = start("lgm", stages["lgm"], out)
    wait("autoencoder", autoencoder, out)  # the diffusion model needs its latent, not LGM
    diffusion = start("diffusion", stages["diffusion"], out,
                      [f"model.overrides.svd_path={out / 'autoencoder' / 'export'}"])
    wait("lgm", lgm, out)
    wait("diffusion", diffusion, out)
    say(f"stages assembled in {assemble(out)}")
    say(f"scores, pictures and curves in {score(out, knobs)}")


if __name__ == "__main__":
    main()
