"""Gradients of Algorithm 1 per pass and per module.

The three passes of a training step with self-conditioning and joint training, each a loss
term of its own: the diffusion loss (second UNet pass, fed the detached renders), Eq. 2 on the
noisy-pass reconstruction (LGM at c_noise(sigma)) and Eq. 2 on the clean-pass reconstruction
(LGM at c_noise(sigma_min)). The terms are taken from spies on the real functions and each is
differentiated alone with respect to each module: the UNet, the camera MLP, each feedback
adapter, LGM and LGM's time embedding; the frozen VAE and CLIP encoder must get nothing.

At initialisation the zero-initialised layers (camera MLP's last layer, LGM's time
projections, and any adapter layer that starts at zero) must get a gradient, or they would
never leave zero; what sits behind them gets exactly zero until they do. The second test
perturbs every all-zero tensor, as after a first optimizer step, and then requires a non-zero
gradient in every trained tensor, from the right pass and from no other.
"""

import pytest
import torch
from tiny_helpers import Spy, batch, tiny_model

from model import ouroboros
from model.lgm.time_embedding import is_time_embedding_key

DENOISER = ("unet", "camera", "ccm_adapter", "rgb_adapter")
LGM = ("lgm", "lgm_time")


def _modules(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    lgm = list(model.lgm.named_parameters())
    return dict(
        unet=list(model.denoiser.unet.named_parameters()),
        camera=list(model.denoiser.camera.named_parameters()),
        ccm_adapter=list(model.denoiser.ccm_adapter.named_parameters()),
        rgb_adapter=list(model.denoiser.rgb_adapter.named_parameters()),
        lgm=[(n, p) for n, p in lgm if not is_time_embedding_key(n)],
        lgm_time=[(n, p) for n, p in lgm if is_time_embedding_key(n)],
    )


def _edm_loss(pred, x0, sigma):
    s = sigma.reshape(-1, 1, 1, 1, 1)
    return ((1 + s**2) / s**2 * (pred - x0) ** 2).mean()


def _per_pass_gradients(model, monkeypatch, self_cond: bool, seed: int):
    """{pass: {module: [(name, grad or None)]}} and the step's output."""
    monkeypatch.setattr(model.config, "self_cond_prob", 1.0 if self_cond else 0.0)
    monkeypatch.setattr(model.config, "clean_recon_pass", True)
    monkeypatch.setattr(model.config.conditioning, "cond_drop_prob", 0.0)  # keep the conditions
    recon = Spy(monkeypatch, ouroboros, "reconstruction_loss")
    denoise = Spy(monkeypatch, model, "denoise")
    encode = Spy(monkeypatch, model, "encode_views")
    model.zero_grad(set_to_none=True)
    out = model.training_losses(batch(1, seed), generator=torch.Generator().manual_seed(seed))
    assert out["self_cond_used"] is self_cond and len(recon) == 2
    lam = model.config.lpips_weight
    passes = {
        "noisy": recon.result(0)["mse"] + lam * recon.result(0)["lpips"],
        "clean": recon.result(1)["mse"] + lam * recon.result(1)["lpips"],
        "diffusion": _edm_loss(denoise.result(-1), encode.result(0), denoise.arg(-1, 1)),
    }
    torch.testing.assert_close(passes["diffusion"].detach(), out["loss_diffusion"], rtol=1e-5, atol=0)
    torch.testing.assert_close(sum(passes.values()).detach(), out["loss"].detach(), rtol=1e-5, atol=0)
    modules = _modules(model)
    named = [(m, n, p) for m, params in modules.items() for n, p in params]
    grads = {}
    for name, loss in passes.items():
        g = torch.autograd.grad(loss, [p for _, _, p in named], retain_graph=True, allow_unused=True)
        grads[name] = {m: [] for m in modules}
        for (m, n, _), gi in zip(named, g):
            grads[name][m].append((n, gi))
    return grads, out


def _nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().max() > 0)


# Layers of the UNet whose gradient must be clearly non-zero. Per tensor, "every UNet tensor"
# is not a sound claim on the tiny model at 32 px: its deepest levels are 1x1 (self-attention
# over one key), SVD's cross-attention has one key (the CLIP token), and GroupNorm with one
# channel per group removes the per-channel biases before it, so dozens of UNet tensors have a
# zero gradient in exact arithmetic and rounding noise (1e-16 to 1e-10 of the largest) in floats.
UNET_KEY_LAYERS = ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight",
                   "add_embedding.linear_1.weight", "down_blocks.0.resnets.0.spatial_res_block.conv1.weight",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
                   "mid_block.resnets.0.spatial_res_block.conv1.weight", "up_blocks.3.resnets.0.spatial_res_block.conv1.weight")  # fmt: skip


def _dead(named, rel=1e-6, only=None):
    """Tensors whose gradient is None or at most ``rel`` times the largest in ``named``."""
    scale = max(float(g.abs().max()) for _, g in named if g is not None)
    return [n for n, g in named if (only is None or n in only) and (g is None or float(g.abs().max()) <= rel * scale)]


def _check_isolation(grads):
    """Each pass reaches only its own modules, with finite gradients."""
    for name, per_module in grads.items():
        own = DENOISER if name == "diffusion" else LGM
        for module, named in per_module.items():
            if module in own:
                assert all(g is not None and torch.isfinite(g).all() for _, g in named), (name, module)
            else:
                leaked = [n for n, g in named if g is not None]
                assert not leaked, f"the {name} pass reaches {module}: {leaked[:5]}"


def _frozen_stay_frozen(model, out):
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    out["loss"].backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is None for p in model.image_encoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def fresh():
    return tiny_model(seed=0).train()


@pytest.fixture(scope="module")
def stepped():
    """Every all-zero trainable tensor given small random values, as after an optimizer step."""
    model = tiny_model(seed=1).train()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p.abs().max() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def test_per_pass_gradients_at_initialisation(fresh, monkeypatch):
    """Kills (verified, docs/testing.md): the CCM or the RGB renders fed back undetached (LGM
    trained by the diffusion loss), the clean pass removed. Does not kill, by design: LPIPS
    detached (the MSE still trains LGM; test_algorithm1_composed.py catches it), LGM at
    c_noise = 0 (its time embedding still gets a gradient; the reconstruct spies catch it)."""
    grads, out = _per_pass_gradients(fresh, monkeypatch, self_cond=True, seed=7)
    _check_isolation(grads)
    zero_init = {m: {n for n, p in params if p.abs().max() == 0} for m, params in _modules(fresh).items()}
    assert zero_init["camera"] == {"mlp.2.weight", "mlp.2.bias"}
    assert zero_init["lgm_time"] and all("time_emb_proj" in n for n in zero_init["lgm_time"])
    diffusion, noisy, clean = grads["diffusion"], grads["noisy"], grads["clean"]
    # the diffusion loss trains the UNet, the camera MLP's (zero) last layer, both adapters
    assert set(UNET_KEY_LAYERS) <= {n for n, _ in diffusion["unet"]}
    assert not _dead(diffusion["unet"], only=UNET_KEY_LAYERS)
    for module in ("camera", "ccm_adapter", "rgb_adapter"):
        for n, g in diffusion[module]:
            if n in zero_init[module]:
                assert _nonzero(g), f"zero-initialised {module}.{n} gets no gradient: it would stay 0"
    assert all(_nonzero(g) for n, g in diffusion["camera"] if n.startswith("mlp.2."))
    for module in ("ccm_adapter", "rgb_adapter"):
        assert sum(_nonzero(g) for _, g in diffusion[module]) >= 2, module
    # both reconstruction passes train LGM and its zero-initialised time projections
    for rec in (noisy, clean):
        assert all(_nonzero(g) for _, g in rec["lgm"])
        assert all(_nonzero(g) for n, g in rec["lgm_time"] if n in zero_init["lgm_time"])
        # behind the zero projections the time MLP gets exactly 0 until they move
        assert all(not _nonzero(g) for n, g in rec["lgm_time"] if n not in zero_init["lgm_time"])
    # the passes differ: the noisy one sees another input and another c_noise than the clean one
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(noisy["lgm_time"], clean["lgm_time"])
               if a is not None)  # fmt: skip
    _frozen_stay_frozen(fresh, out)


@pytest.mark.parametrize("self_cond", [True, False])
def test_every_trained_tensor_gets_a_gradient_from_its_pass(stepped, monkeypatch, self_cond):
    """After the zero layers have moved, every tensor of the camera MLP, LGM and its time
    embedding (and each adapter with self-conditioning) gets a finite, clearly non-zero gradient,
    and so do the UNet's key layers (UNET_KEY_LAYERS: every UNet tensor gets a finite one);
    without self-conditioning the adapters see zero feedback, LGM is still trained by both
    reconstruction passes. Kills: as the first test, plus any module dropped from its pass."""
    grads, out = _per_pass_gradients(stepped, monkeypatch, self_cond=self_cond, seed=8)
    _check_isolation(grads)
    diffusion = grads["diffusion"]
    for module in ("unet", "camera") + (("ccm_adapter", "rgb_adapter") if self_cond else ()):
        dead = _dead(diffusion[module], only=UNET_KEY_LAYERS if module == "unet" else None)
        assert not dead, f"diffusion pass: {module} tensors without gradient: {dead[:8]}"
    if not self_cond:  # zero feedback: the adapters' input convolution learns nothing from it
        for module in ("ccm_adapter", "rgb_adapter"):
            (g,) = [g for n, g in diffusion[module] if n == "adapter.conv_in.weight"]
            assert g.abs().max() == 0
    for name in ("noisy", "clean"):
        for module in LGM:
            dead = _dead(grads[name][module])
            assert not dead, f"{name} pass: {module} tensors without gradient: {dead[:8]}"
    _frozen_stay_frozen(stepped, out)
