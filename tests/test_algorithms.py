"""Algorithms 1 and 2 of the paper on the tiny preset (model/ouroboros.py, model/conditioning.py)."""

import json

import numpy as np
import pytest
import torch

from common.conventions import DEFAULT_FOV_DEG, intrinsics, orbit_c2w
from model.conditioning import classifier_free_guidance, conditioning_dropout, frame_guidance_scales
from model.config import preset
from model.ouroboros import Ouroboros3D, use_self_conditioning
from model.sampling import reconstruction_steps

# The tiny preset shrunk further (32 px, 4 views at 90 degrees) so that the torch reference
# rasterizer keeps these end-to-end tests within the suite's budget on 2 CPU cores.
RES, V = 32, 4
SMALL = dict(resolution=RES, num_views=V, lgm_input_views=(0, 1, 2, 3))


def _cameras(batch=1, elevation=10.0):
    c2w = orbit_c2w(elevation, np.arange(V) * 360.0 / V)  # model frame: view 0 at azimuth 0
    K = intrinsics(DEFAULT_FOV_DEG, RES)
    c2w = torch.tensor(c2w, dtype=torch.float32).expand(batch, V, 4, 4).clone()
    K = torch.tensor(K, dtype=torch.float32).expand(batch, V, 3, 3).clone()
    return c2w, K


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    c2w, K = _cameras()
    alphas = (torch.rand(1, V, 1, RES, RES, generator=gen) > 0.5).float()
    images = torch.rand(1, V, 3, RES, RES, generator=gen)
    images = images * alphas + (1 - alphas)  # composited over the white background
    ccm = torch.rand(1, V, 3, RES, RES, generator=gen) * alphas
    return dict(images=images, alphas=alphas, ccm=ccm, c2w=c2w, K=K, key=["obj_o0"])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Ouroboros3D.from_config(preset("tiny", **SMALL))


# ----------------------------------------------------------------------------- decisions
def test_self_conditioning_frequency_is_half():
    gen = torch.Generator().manual_seed(0)
    draws = [use_self_conditioning(0.5, gen) for _ in range(4000)]
    assert 0.47 < np.mean(draws) < 0.53
    again = [use_self_conditioning(0.5, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(again)) == 1  # same seed, same decision
    assert not any(use_self_conditioning(0.0, gen) for _ in range(100))
    assert all(use_self_conditioning(1.0, gen) for _ in range(100))


def test_conditioning_dropout_rates():
    gen = torch.Generator().manual_seed(1)
    drop_e, drop_l = conditioning_dropout(200_000, 0.05, gen)
    both = (drop_e & drop_l).float().mean().item()
    only_e = (drop_e & ~drop_l).float().mean().item()
    only_l = (~drop_e & drop_l).float().mean().item()
    for rate in (both, only_e, only_l):
        assert rate == pytest.approx(0.05, abs=0.003)


def test_per_frame_guidance():
    scales = frame_guidance_scales(1.0, 3.0, 8)
    torch.testing.assert_close(scales, torch.tensor([1.0, 9 / 7, 11 / 7, 13 / 7, 15 / 7, 17 / 7, 19 / 7, 3.0]))
    uncond, cond = torch.zeros(2, 8, 4, 2, 2), torch.ones(2, 8, 4, 2, 2)
    out = classifier_free_guidance(uncond, cond, scales)
    torch.testing.assert_close(out[:, :, 0, 0, 0], scales.expand(2, 8))


def test_reconstruction_steps():
    assert reconstruction_steps(25, 1, True) == set(range(25))
    assert reconstruction_steps(5, 2, True) == {0, 2, 4}
    assert reconstruction_steps(6, 4, True) == {0, 4, 5}
    assert reconstruction_steps(25, 1, False) == {24}
    with pytest.raises(ValueError):
        reconstruction_steps(5, 0, True)


# ----------------------------------------------------------------------------- Algorithm 1
# Not slow: 1.8-4.6 CPU s (tools/cpu_durations.py); the 30-80 s once noted here were wall time
# on the shared machine under load.
def test_algorithm1_gradients_reach_every_trainable_parameter(tiny_model):
    model = tiny_model.train()
    model.zero_grad(set_to_none=True)
    flags = []
    # one step with 3D self-conditioning (and the clean-image LGM pass), one without either
    for prob, seed in ((1.0, 1), (0.0, 2)):
        model.config.self_cond_prob = prob
        model.config.clean_recon_pass = prob == 1.0
        out = model.training_losses(_batch(seed), generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(out["loss"])
        assert out["loss_recon_mse"] > 0 and out["loss_diffusion"] > 0
        out["loss"].backward()
        flags.append(out["self_cond_used"])
    model.config.self_cond_prob, model.config.clean_recon_pass = 0.5, True
    assert flags == [True, False]
    trainable = {id(p) for p in model.trainable_parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) in trainable and p.grad is None]
    assert not missing, f"no gradient reached: {missing[:10]}"
    frozen = [n for n, p in model.named_parameters() if id(p) not in trainable and p.grad is not None]
    assert not frozen, f"frozen parameters got gradients: {frozen[:10]}"
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    # zero-initialised layers learn: the camera MLP's last layer, every adapter's input conv
    assert model.denoiser.camera.mlp[-1].weight.grad.abs().sum() > 0
    assert model.denoiser.ccm_adapter.adapter.conv_in.weight.grad.abs().sum() > 0
    assert model.denoiser.rgb_adapter.adapter.conv_in.weight.grad.abs().sum() > 0
    lgm_grads = [p.grad.abs().sum() for p in model.lgm.parameters()]
    assert sum(g > 0 for g in lgm_grads) > 0.5 * len(lgm_grads)
    model.zero_grad(set_to_none=True)


def test_algorithm1_without_joint_training_or_feedback():
    torch.manual_seed(0)
    model = Ouroboros3D.from_config(preset("tiny", joint_training=False, feedback="none", **SMALL))
    assert model.denoiser.ccm_adapter is None
    assert not any(p.requires_grad for p in model.lgm.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.denoiser.parameters()}
    out = model.training_losses(_batch(3), generator=torch.Generator().manual_seed(3))
    assert not out["self_cond_used"] and out["loss_recon_mse"] == 0
    out["loss"].backward()
    assert all(p.grad is None for p in model.lgm.parameters())


def test_wider_latent_agrees_through_autoencoder_and_unet():
    """``with_latent_channels``: the autoencoder's latent, the UNet's input (noisy and image
    latents concatenated) and its output agree, so Algorithm 1 and 2 run on a 16-channel latent."""
    from model.config import with_latent_channels

    torch.manual_seed(0)
    model = Ouroboros3D.from_config(with_latent_channels(preset("tiny", **SMALL), 16))
    assert model.vae.config.latent_channels == 16
    assert (model.denoiser.unet.config.in_channels, model.denoiser.unet.config.out_channels) == (32, 16)
    model.training_losses(_batch(2), generator=torch.Generator().manual_seed(2))["loss"].backward()
    c2w, K = _cameras()
    out = model.sample(_batch(2)["images"][:, 0], c2w, K, num_steps=2, guidance=(1.0, 1.0), progress=False)
    assert out.views.shape == (1, V, 3, RES, RES) and torch.isfinite(out.views).all()
    with pytest.raises(ValueError, match="positive"):
        with_latent_channels(preset("tiny"), 0)


# ----------------------------------------------------------------------------- Algorithm 2
# Not slow: 1.2-1.7 CPU s (tools/cpu_durations.py).
def test_algorithm2_reconstructs_every_step_and_feeds_back(tiny_model, monkeypatch):
    model = tiny_model.eval()
    calls, feedbacks = [], []
    reconstruct, denoise = model.reconstruct, model.denoise

    def counting_reconstruct(images, c2w, K, c_noise):
        calls.append(c_noise.clone())
        return reconstruct(images, c2w, K, c_noise)

    def spying_denoise(noisy, sigma, embedding, cond_latent, plucker, feedback):
        feedbacks.append(feedback["ccm"].abs().sum().item())
        return denoise(noisy, sigma, embedding, cond_latent, plucker, feedback)

    monkeypatch.setattr(model, "reconstruct", counting_reconstruct)
    monkeypatch.setattr(model, "denoise", spying_denoise)
    c2w, K = _cameras(batch=1)
    cond = torch.rand(1, 3, RES, RES)
    out = model.sample(cond, c2w, K, num_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert len(calls) == 3  # Algorithm 2: LGM after every denoising step
    assert calls[-1].item() == pytest.approx(0.25 * np.log(0.002), rel=1e-5)  # last one at sigma_min
    assert feedbacks[0] == 0 and all(f > 0 for f in feedbacks[1:])  # starts at 0, then fed back
    assert out.views.shape == (1, V, 3, RES, RES) and out.views.abs().max() <= 1
    assert out.gaussians.ndim == 3 and out.gaussians.shape[-1] == 14
    assert out.renders["rgb"].shape == (1, V, 3, RES, RES)

    calls.clear()
    model.sample(cond, c2w, K, num_steps=3, feedback_every=2, guidance=(1.0, 1.0), progress=False)
    assert len(calls) == 2  # steps 0 and 2 (the last)

    calls.clear(), feedbacks.clear()
    model.sample(cond, c2w, K, num_steps=2, guidance=(1.0, 1.0), use_feedback=False, progress=False)
    assert len(calls) == 1 and feedbacks == [0, 0]  # two-stage baseline: zero feedback, LGM at the end


def test_sampler_takes_any_denoiser_and_reports_every_step_to_its_callback(tiny_model):
    """sample_euler: any denoiser(x, sigma, step); the callback sees each step's sigma, x and
    prediction, and the recursive denoiser's Gaussians and renders of that step."""
    from model import edm
    from model.sampling import sample_euler

    sigmas = edm.karras_sigmas(4)
    seen = []
    x_T = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    x0 = torch.full_like(x_T, 0.3)
    out = sample_euler(lambda x, sigma, step: x0, x_T, sigmas,
                       callback=lambda **state: seen.append(state))
    assert torch.allclose(out, x0)  # Euler on a point-mass oracle ends at x0
    assert [s["step"] for s in seen] == [0, 1, 2, 3]
    assert [float(s["sigma"]) for s in seen] == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert seen[0]["x"] is x_T and all(s["denoised"] is x0 for s in seen)
    assert all(s["gaussians"] is None and s["renders"] is None for s in seen)  # a plain denoiser

    c2w, K = _cameras(batch=1)
    cond = torch.rand(1, 3, RES, RES)
    for use_feedback, with_3d in ((True, [True, True, True]), (False, [False, False, True])):
        steps = []
        out = tiny_model.sample(cond, c2w, K, num_steps=3, guidance=(1.0, 1.0), progress=False,
                                use_feedback=use_feedback, callback=lambda **state: steps.append(state))
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert [s["gaussians"] is not None for s in steps] == with_3d  # the 3D of each reconstruction
        assert steps[-1]["gaussians"] is out.gaussians and steps[-1]["renders"] is out.renders
        assert steps[-1]["denoised"].shape == (1, V, tiny_model.vae.config.latent_channels,
                                               tiny_model.latent_size, tiny_model.latent_size)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "export")
    loaded = Ouroboros3D.from_pretrained(tmp_path / "export").eval()
    ref = tiny_model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)
    assert json.loads(json.dumps(loaded.config.to_dict())) == json.loads(json.dumps(tiny_model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="ouroboros_config.json"):
        Ouroboros3D.from_pretrained(tmp_path)
