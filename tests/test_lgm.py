"""LGM with the time embedding (model/lgm): official key compatibility, zero-init time
independence, checkpoints, inputs, and the Eq. 2 loss."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from data_paths import FIXTURES

from raycast_oracle import one_torch_thread

from common import conventions as C
from model import cameras
from model.lgm import LGM, LGMConfig, prepare_inputs, reconstruction_loss
from model.lgm import loss as lgm_loss
from model.lgm.time_embedding import is_time_embedding_key


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LGM(LGMConfig.preset("tiny")).eval()


def _inputs(batch=2, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 9, size, size, generator=gen)


@pytest.mark.parametrize("preset", ["lrm", "big"])
def test_official_names_and_shapes(preset):
    """Built on the meta device, our LGM has exactly the official state dict plus time keys."""
    fixture = json.loads((FIXTURES / "lgm_state_dict.json").read_text())["configs"][preset]
    with torch.device("meta"):
        model = LGM(LGMConfig.preset(preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in ours.items() if not is_time_embedding_key(k)}
    assert official == fixture["state_dict"]
    assert sum(torch.Size(s).numel() for s in official.values()) == fixture["params"]
    extra = set(ours) - set(official)
    assert extra and all(k.startswith("unet.") for k in extra)
    opts = fixture["options"]
    cfg = LGMConfig.preset(preset)
    assert cfg.splat_size == opts["splat_size"] and cfg.input_size == opts["input_size"]


def test_output_is_independent_of_time_at_init(tiny):
    x = _inputs()
    with torch.no_grad():
        plain = tiny(x)
        for c in (torch.tensor([-1.2, 0.3]), torch.tensor([2.0, 2.0])):
            assert torch.equal(tiny(x, c), plain)
        # Once the zero-initialised projections move, the noise level matters.
        trained = LGM(tiny.config)
        trained.load_state_dict(tiny.state_dict())
        for name, p in trained.named_parameters():
            if "time_emb_proj" in name:
                p.add_(0.01 * torch.randn_like(p))
        assert not torch.allclose(trained(x, torch.tensor([-1.2, 0.3])), trained(x, torch.tensor([2.0, 2.0])))
    assert plain.shape == (2, 4 * 16 * 16, 14)


def test_activations(tiny):
    with torch.no_grad():
        g = tiny(_inputs(1, 64) * 5, torch.tensor([0.5]))
    assert g.shape == (1, 4 * 32 * 32, 14)
    assert g[..., 0:3].abs().max() <= 1
    assert ((g[..., 3] > 0) & (g[..., 3] < 1)).all()
    assert (g[..., 4:7] > 0).all()
    torch.testing.assert_close(g[..., 7:11].norm(dim=-1), torch.ones(g.shape[:2]))
    assert ((g[..., 11:] >= 0) & (g[..., 11:] <= 1)).all()


def test_save_and_load_round_trip(tiny, tmp_path):
    model = LGM(tiny.config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # time keys non-zero too
    model.save_pretrained(tmp_path / "lgm")
    model.save_pretrained(tmp_path / "lgm")  # overwriting is atomic and works
    assert sorted(p.name for p in (tmp_path / "lgm").iterdir()) == ["config.json", "model.safetensors"]
    loaded = LGM.from_pretrained(tmp_path / "lgm")
    assert loaded.config == model.config
    x, c = _inputs(1), torch.tensor([0.7])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, c), model.eval()(x, c), rtol=0, atol=0)


def test_official_checkpoint_without_time_keys_loads_strictly(tiny, tmp_path):
    """An fp16 file with exactly the official keys loads; anything else is refused by name."""
    official = {k: v.half() for k, v in tiny.state_dict().items() if not is_time_embedding_key(k)}
    path = tmp_path / "model_fp16_fixrot.safetensors"
    save_file(official, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = LGM.from_pretrained(path, tiny.config)
    assert any("time-embedding" in str(w.message) for w in caught)
    for k, v in loaded.state_dict().items():
        if is_time_embedding_key(k) and "time_emb_proj" in k:
            assert not v.any()
        elif not is_time_embedding_key(k):
            assert v.dtype == torch.float32 and torch.equal(v, official[k].float())

    # LGM's training-time LPIPS network, if a file carries it, is not part of the model.
    save_file({**official, "lpips_loss.net.slice1.0.weight": torch.zeros(2)}, str(tmp_path / "lp.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LGM.from_pretrained(tmp_path / "lp.safetensors", tiny.config)

    broken = dict(official)
    broken.pop("unet.conv_in.weight")
    save_file(broken, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing.safetensors.*\n.*unet.conv_in.weight"):
        LGM.from_pretrained(tmp_path / "missing.safetensors", tiny.config)
    save_file({**official, "unet.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unet.extra.weight"):
        LGM.from_pretrained(tmp_path / "extra.safetensors", tiny.config)
    save_file({**official, "conv.bias": torch.zeros(3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"conv.bias: \(3,\) != \(14,\)"):
        LGM.from_pretrained(tmp_path / "shape.safetensors", tiny.config)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.safetensors"):
        LGM.from_pretrained(tmp_path / "junk.safetensors", tiny.config)
    with pytest.raises(FileNotFoundError):
        LGM.from_pretrained(tmp_path / "nowhere.safetensors", tiny.config)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model = LGM(tiny.config)
    model.load_state_dict(tiny.state_dict())
    x, c = _inputs(1, 16), torch.tensor([0.2])

    def grads():
        model.zero_grad()
        model(x, c).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_prepare_inputs():
    """ImageNet-normalised RGB + Plücker rays of the cameras moved into LGM's frame."""
    B, V, H = 1, 4, 48
    c2w = torch.tensor(C.orbit_c2w(0.0, [0.0, 90.0, 180.0, 270.0]), dtype=torch.float32)[None]
    K = torch.tensor(C.intrinsics(C.DEFAULT_FOV_DEG, H), dtype=torch.float32).expand(B, V, 3, 3)
    images = torch.full((B, V, 3, H, H), 0.5)
    x = prepare_inputs(images, c2w, K, 32)
    assert x.shape == (B, V, 9, 32, 32)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, 0, :3, 5, 7], expected)
    K32 = cameras.scale_intrinsics(K, H, 32)
    lgm_c2w = cameras.model_to_lgm_c2w(c2w, c2w[:, 0])
    torch.testing.assert_close(x[:, :, 3:], cameras.plucker_rays(lgm_c2w, K32, 32, 32))
    # View 0 (model +X) is LGM's front camera on +Z: its central rays point along -Z.
    centre = x[0, 0, 6:9, 15:17, 15:17].mean((-1, -2))
    torch.testing.assert_close(centre / centre.norm(), torch.tensor([0.0, 0.0, -1.0]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="cameras"):
        prepare_inputs(images, c2w[:, :3], K, 32)


def test_reconstruction_loss_eq2():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 2, 3, 32, 32, generator=gen, requires_grad=True)
    gt = torch.rand(1, 2, 3, 32, 32, generator=gen)
    pa, ga = torch.rand(1, 2, 1, 32, 32, generator=gen), torch.rand(1, 2, 1, 32, 32, generator=gen)
    out = reconstruction_loss(pred, pa, gt, ga, lpips_weight=0.5)
    assert lgm_loss.lpips_network("cpu").trunk.real  # the install step's ImageNet VGG16
    mse = ((pred - gt) ** 2).mean() + ((pa - ga) ** 2).mean()
    torch.testing.assert_close(out["mse"], mse)
    assert out["lpips"] > 0
    torch.testing.assert_close(out["loss"], mse + 0.5 * out["lpips"])
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    net = lgm_loss.lpips_network("cpu")
    assert not any(p.requires_grad for p in net.parameters())
    same = reconstruction_loss(gt, ga, gt, ga, lpips_weight=1.0)
    assert same["loss"].abs() < 1e-6
    assert reconstruction_loss(pred, pa, gt, ga, 0.0)["lpips"] == 0


def test_lgm_learns_through_the_rasterizer():
    """The whole chain (inputs -> LGM -> model frame -> rasterizer -> Eq. 2) is differentiable:
    a few Adam steps on one object reduce the reconstruction loss, time embedding included."""
    from model.rasterizer import render_gaussians

    torch.manual_seed(0)
    model = LGM(LGMConfig.preset("tiny")).train()
    size = 32
    c2w = torch.tensor(C.orbit_c2w(10.0, [0.0, 90.0, 180.0, 270.0]), dtype=torch.float32)[None]
    K = torch.tensor(C.intrinsics(C.DEFAULT_FOV_DEG, size), dtype=torch.float32).expand(1, 4, 3, 3)
    # Target: a red ball in the middle, over white.
    target = render_gaussians(
        torch.tensor([[[0, 0, 0, 0.95, 0.2, 0.2, 0.2, 1, 0, 0, 0, 0.9, 0.1, 0.1]]]), c2w, K, size, size
    )
    x = prepare_inputs(target["rgb"], c2w, K, size)
    c_noise = torch.tensor([0.3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        g = cameras.lgm_to_model_gaussians(model(x, c_noise), c2w[:, 0])
        out = render_gaussians(g, c2w, K, size, size)
        loss = reconstruction_loss(out["rgb"], out["alpha"], target["rgb"], target["alpha"], 0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    proj = [p for n, p in model.named_parameters() if "time_emb_proj" in n]
    assert any(p.abs().sum() > 0 for p in proj)  # the zero-initialised layers started learning
