"""experiments/autoencoder_recipes.py: the frame cache that lets a machine without the shards (a GPU
one) run the same recipes gives the same frames, and a file that is not a cache is refused."""

import json
import subprocess
import sys

import torch
from data_paths import REPO

SCRIPT = REPO / "experiments" / "autoencoder_recipes.py"


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--name", "t", "--steps", "2", "--evals", "2", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_frame_cache_round_trips_and_bad_cache_is_refused(demo_shards, tmp_path):
    shards = str(demo_shards / "shard-*.tar")
    cache = tmp_path / "frames.pt"
    first = run_recipe("--train", shards, "--heldout", shards, "--frames", str(cache), "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    assert cache.exists()
    again = run_recipe("--frames", str(cache), "--out", str(tmp_path))  # no shards named: the cache alone
    assert again.returncode == 0, again.stderr[-2000:]
    head_a, head_b = (json.loads(p.stdout.splitlines()[0]) for p in (first, again))
    assert head_a["orbits"] == head_b["orbits"] == 8 and head_a["seen"] == head_b["seen"]
    for key in ("heldout_thumbnail_db", "heldout_linear_code_db"):  # uint8 storage: within 0.05 dB
        for size, db in head_a[key].items():
            assert abs(db - head_b[key][size]) < 0.05, (key, size, db, head_b[key][size])
    evals = [json.loads(line) for line in again.stdout.splitlines()[1:]]
    assert evals and evals[-1]["step"] == 2 and 5 < evals[-1]["heldout_db"] < 40
    assert (tmp_path / "t_2.png").exists()

    bad = tmp_path / "bad.pt"
    torch.save({"train": torch.zeros(1)}, bad)
    refused = run_recipe("--frames", str(bad), "--out", str(tmp_path))
    assert refused.returncode != 0 and "bad.pt: not a frame cache" in refused.stderr


def test_augment_views_draws_colours_per_step_orbit_or_view():
    from training.autoencoder_recipe import augment_views

    x = torch.zeros(2, 4, 3, 2, 2)
    x[:, :, 0] = 0.2  # every view of both orbits the same pale red (no channel clamps when rotated)
    x[:, :, 1:] = -0.1

    def colours(y):  # [B, V, 3]: each view's colour (mirroring cannot change a flat image)
        return y.mean((-1, -2))

    cases = (("step", True, True), ("orbit", True, False), ("view", False, False))
    for per, same_in_orbit, same_across_orbits in cases:
        c = colours(augment_views(x, torch.Generator().manual_seed(1), per))
        assert torch.allclose(c[:, :1].expand_as(c), c, atol=1e-6) == same_in_orbit, per
        assert torch.allclose(c[0], c[1], atol=1e-6) == same_across_orbits, per
        grey = c.mean(-1, keepdim=True)  # permutations and rotations about the grey axis keep the channel mean
        assert torch.allclose(grey, torch.full_like(grey, (0.2 - 0.1 - 0.1) / 3), atol=1e-5), per


def test_linear_path_init_decodes_views_apart_and_keeps_the_signal():
    from diffusers import AutoencoderKLTemporalDecoder

    from training.autoencoder_recipe import init_linear_path
    from model.config import preset

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(**preset("tiny").vae)
    z = torch.randn(8, 4, 8, 8)
    z2 = z.clone()
    z2[3] += 1.0

    def decode(latents):
        with torch.no_grad():
            return vae.decode(latents, num_frames=8).sample

    changed = (decode(z2) - decode(z)).abs().flatten(1).amax(1)
    assert (changed[[2, 4]] > 0).all()  # PyTorch's default init: the temporal layers mix views
    init_linear_path(vae)
    changed = (decode(z2) - decode(z)).abs().flatten(1).amax(1)
    assert changed[3] > 1e-3 and changed[torch.arange(8) != 3].max() == 0  # each view decoded alone
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert 0.2 < mean.std() < 5  # variance-preserving path: the latent neither vanishes nor explodes
