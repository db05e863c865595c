"""The pretrained tiny stages shipped in ``pretrained/tiny`` (its MODEL_CARD.md): they load
through the code any checkpoint goes through, and they are trained, judged on objects rendered
anew by the real render job: the autoencoder's round trip on held-out objects, LGM's renders of
a seen object against a random LGM's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_pipeline
from data_paths import REPO

from common.image_metrics import psnr_from_mse
from model import edm
from model.config import OuroborosConfig
from model.lgm import LGM
from model.ouroboros import Ouroboros3D
from model.shipped import SHIPPED_ROOT, resolve_checkpoint
from model.svd import from_vae_pixels, to_vae_pixels
from training.autoencoder import roundtrip
from training.config import load_config
from training.loader import orbit_views

TINY = SHIPPED_ROOT / "tiny"
HELDOUT_SEED = 1000  # scripts/pretrain_tiny.yaml: the held-out seed, never trained on


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def shipped() -> Ouroboros3D:
    return Ouroboros3D.from_pretrained("tiny").eval()


def test_the_name_resolves_to_the_shipped_folder(tmp_path, monkeypatch):
    assert resolve_checkpoint("tiny") == TINY
    assert (TINY / "MODEL_CARD.md").is_file()
    assert resolve_checkpoint(tmp_path / "run" / "export") == tmp_path / "run" / "export"  # paths stay
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert resolve_checkpoint("tiny").resolve() == tmp_path / "tiny"  # a folder of that name here wins
    (tmp_path / "tiny").rmdir()
    monkeypatch.setattr("model.shipped.SHIPPED_ROOT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_checkpoint("tiny")


def test_shipped_stages_load_as_any_checkpoint(shipped):
    """By name and by folder the same weights; the demo's fine-tuning config (``tiny_joint``,
    ``model.pretrained=tiny``: feedback and joint training switched on, as the trainer's
    ``build_model`` loads it) keeps those weights and adds fresh adapters whose first output is
    zero (the pretrained model's predictions unchanged)."""
    _assert_same(_state(shipped), _state(Ouroboros3D.from_pretrained(TINY)))
    config = json.loads((TINY / "ouroboros_config.json").read_text())
    assert config["feedback"] == "none" and not config["joint_training"]  # the stages, not a joint run
    assert config["svd_path"] is None and config["lgm_path"] is None  # self-contained: no folder of the maker's machine
    # the config describes the parts it ships with: built from it alone, the same architecture
    rebuilt = Ouroboros3D.from_config(OuroborosConfig.load(TINY / "ouroboros_config.json"))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}
    assert config["vae"]["latent_channels"] == shipped.vae.config.latent_channels == 32
    cfg = load_config("tiny_joint", ["model.pretrained=tiny"])
    model = Ouroboros3D.from_pretrained(cfg.model.pretrained, **cfg.model.overrides)
    assert model.config.feedback == "ccm_rgb" and model.config.joint_training
    for part in ("denoiser.unet", "denoiser.camera", "lgm", "vae", "image_encoder"):
        _assert_same(_state(model.get_submodule(part)), _state(shipped.get_submodule(part)))
    res = model.config.resolution
    for adapter in (model.denoiser.ccm_adapter, model.denoiser.rgb_adapter):
        assert all(float(f.abs().max()) == 0.0 for f in adapter(torch.rand(1, 3, res, res)))


@pytest.fixture(scope="module")
def heldout_shards(tmp_path_factory):
    """Two held-out demo objects rendered anew as the stages' training objects were (128 px,
    32 samples, no denoiser: scripts/pretrain_tiny.yaml)."""
    out = tmp_path_factory.mktemp("heldout")
    run_pipeline(["render", "--source", "demo", "--seed", str(HELDOUT_SEED), "--count", "2", "--resolution", "128",
                  "--samples", "32", "--no-denoise", "--per-shard", "2", "--workers", "2", "--output", str(out)])
    return str(out / "shard-*.tar")


def test_shipped_autoencoder_round_trip_on_heldout_objects(shipped, heldout_shards):
    """>= 25 dB over all frames of two held-out objects at the model's resolution (PSNR of the
    pooled MSE, [0, 1] images); a random autoencoder of the same config stays far below."""
    cfg = shipped.config
    random_vae = type(shipped.vae).from_config(shipped.vae.config).eval()
    errors = {"shipped": [], "random": []}
    with torch.no_grad():
        for _, views in orbit_views(heldout_shards, cfg.resolution, cfg.background):
            pixels = to_vae_pixels(views["images"])[None]
            for name, vae in (("shipped", shipped.vae), ("random", random_vae)):
                recon = from_vae_pixels(roundtrip(vae, pixels)[0]).clamp(0, 1)
                errors[name].append(float((recon - views["images"]).square().mean()))
    assert len(errors["shipped"]) == 2 * 2 * 2  # objects x orbits x frame groups
    db = {k: float(psnr_from_mse(sum(v) / len(v))) for k, v in errors.items()}
    assert db["shipped"] >= 25.0, db
    assert db["random"] < db["shipped"] - 10, db


def test_shipped_lgm_beats_a_random_lgm_on_a_seen_object(shipped, demo_shards):
    """LGM of the stages on the clean views of the demo's first object (seed 0, trained on), at
    ``c_noise(sigma_min)`` as it was trained: its renders at the 8 views against the views,
    against a random LGM of the same config in the same model."""
    cfg = shipped.config
    _, views = next(orbit_views(str(demo_shards / "shard-*.tar"), cfg.resolution, cfg.background))
    batch = {k: v[None] for k, v in views.items()}
    c_noise = edm.c_noise(torch.full((1,), cfg.edm.sigma_min))

    def psnr(model: Ouroboros3D) -> float:
        with torch.no_grad():
            gaussians = model.reconstruct(batch["images"], batch["c2w"], batch["K"], c_noise)
            rgb = model.render(gaussians, batch["c2w"], batch["K"])["rgb"].clamp(0, 1)
        return float(psnr_from_mse(float((rgb - batch["images"]).square().mean())))

    trained = psnr(shipped)
    torch.manual_seed(0)
    lgm = shipped.lgm
    shipped.lgm = LGM(lgm.config).eval()
    try:
        random = psnr(shipped)
    finally:
        shipped.lgm = lgm
    assert trained >= random + 5.0, (trained, random)
    assert trained >= 15.0, (trained, random)


def test_the_app_and_the_cli_use_the_shipped_stages_by_default(tmp_path):
    """``python -m inference.app`` with no ``--checkpoint`` serves ``pretrained/tiny``; the CLI
    with none generates from it."""
    from inference import app

    assert app.parse_args([]).checkpoint == "tiny"
    folder, model, _, digest = app.load_checkpoint("tiny", torch.device("cpu"))
    assert folder == TINY and model.vae.config.latent_channels == 32 and digest == app.hash_folder(TINY)
    image = REPO / "inference" / "examples" / "demo1000_0000_box_vertex_colors.png"
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "inference.image_to_3d", "--image", str(image), "--output", str(out),
                          "--steps", "2", "--orbit-frames", "4", "--no-mesh"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "views.png").is_file() and (out / "gaussians.ply").is_file()
