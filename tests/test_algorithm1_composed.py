"""Algorithm 1 (``Ouroboros3D.training_losses``) pinned as composed, not only its parts.

Spies (tests/tiny_helpers.Spy) call the real functions and record what they were given, so each
test checks the composition against a reference computed here from the recorded tensors: the
EDM loss from its formula, Eq. 2 from its formula, c_noise from ``0.25 ln sigma`` with the
sigma the UNet saw. Each test was checked to fail on the mutations named in its docstring
(docs/testing.md lists them).
"""

import math

import pytest
import torch
from tiny_helpers import RES, V, Spy, batch, tiny_model

from model import ouroboros
from model.lgm.loss import lpips_distance

SIGMA_MIN = 0.002


@pytest.fixture(scope="module")
def model():
    return tiny_model().train()


@pytest.fixture
def configure(model, monkeypatch):
    """Set config fields for one test (restored afterwards)."""

    def set_fields(**fields):
        for name, value in fields.items():
            monkeypatch.setattr(model.config, name, value)

    return set_fields


def _gt(images):
    return images.clamp(0, 1)


def _eq2_mse(render, images, alphas):
    """Eq. 2's MSE terms from their definition: mean squared RGB error + mean squared alpha error."""
    return ((render["rgb"] - _gt(images)) ** 2).mean() + ((render["alpha"] - alphas) ** 2).mean()


def _edm_loss(pred, x0, sigma):
    """E[lambda(s) ||D - x0||^2] with lambda = (1 + s^2) / s^2 (appendix A.1), written out."""
    s = sigma.reshape(-1, 1, 1, 1, 1)
    return ((1 + s**2) / s**2 * (pred - x0) ** 2).mean()


def test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips(model, configure, monkeypatch):
    """Kills: LPIPS dropped from the total; lambda not applied; clean pass removed (two renders,
    both in the MSE); the diffusion loss taken from the first pass instead of the second."""
    lam = 0.7
    configure(self_cond_prob=1.0, clean_recon_pass=True, lpips_weight=lam)
    b = batch(1, seed=1)
    denoise = Spy(monkeypatch, model, "denoise")
    encode = Spy(monkeypatch, model, "encode_views")
    render = Spy(monkeypatch, model, "render")
    out = model.training_losses(b, generator=torch.Generator().manual_seed(1))

    assert out["self_cond_used"] is True
    assert len(render) == 2, "noisy-pass and clean-pass renders"
    mse = sum(_eq2_mse(render.result(i), b["images"], b["alphas"]) for i in range(2))
    with torch.no_grad():
        lp = sum(lpips_distance(render.result(i)["rgb"].flatten(0, 1), _gt(b["images"]).flatten(0, 1))
                 for i in range(2))  # fmt: skip
    assert len(denoise) == 2
    sigma = denoise.arg(1, 1)
    diffusion = _edm_loss(denoise.result(1), encode.result(0), sigma)  # the second pass's x0

    torch.testing.assert_close(out["loss_diffusion"], diffusion.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_recon_mse"], mse.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_recon_lpips"], lp, rtol=1e-4, atol=0)
    expected = diffusion + mse + lam * lp
    torch.testing.assert_close(out["loss"].detach(), expected.detach(), rtol=1e-5, atol=0)
    # every term is there and large enough that dropping it would show
    for term in (diffusion, mse, lam * lp):
        assert term > 1e-3 * expected
    assert out["loss"].requires_grad
    # the first pass's prediction does not give the diffusion loss
    first = _edm_loss(denoise.result(0), encode.result(0), sigma)
    assert not torch.allclose(first, diffusion, rtol=1e-3)


@pytest.mark.parametrize("clean_pass", [True, False])
def test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min(
    model, configure, monkeypatch, clean_pass
):
    """Kills: clean pass removed; clean pass at the noisy sigma (or at c_noise = 0, i.e. s = 1);
    LGM given a zero c_noise in the noisy pass; one sample's c_noise used for the whole batch."""
    configure(self_cond_prob=0.0, clean_recon_pass=clean_pass)
    b = batch(2, seed=2)
    denoise = Spy(monkeypatch, model, "denoise")
    decode = Spy(monkeypatch, model, "decode_latents")
    recon = Spy(monkeypatch, model, "reconstruct")
    model.training_losses(b, generator=torch.Generator().manual_seed(2))

    assert len(recon) == (2 if clean_pass else 1)
    sigma = denoise.arg(0, 1)
    assert sigma.shape == (2,) and sigma[0] != sigma[1]
    images, c2w, K, c_noise = recon.calls[0][0]
    assert torch.equal(images, decode.result(0)), "noisy pass: LGM on the decoded x0 prediction"
    assert torch.equal(c2w, b["c2w"]) and torch.equal(K, b["K"])
    torch.testing.assert_close(c_noise, torch.tensor([0.25 * math.log(s) for s in sigma.tolist()]))
    if clean_pass:
        images, c2w, K, c_noise = recon.calls[1][0]
        assert torch.equal(images, b["images"]), "clean pass: LGM on the batch's own images"
        assert torch.equal(c2w, b["c2w"]) and torch.equal(K, b["K"])
        torch.testing.assert_close(c_noise, torch.full((2,), 0.25 * math.log(SIGMA_MIN)))


def test_unet_sees_c_in_times_x0_plus_sigma_noise(model, configure, monkeypatch):
    """The noisy input is x0 + sigma n with n standard normal, scaled by c_in = 1/sqrt(s^2+1)
    before the UNet. Kills: the noise scaled by sigma^2 (or not at all), c_in not applied."""
    configure(self_cond_prob=0.0, joint_training=False)
    monkeypatch.setattr(model.config.conditioning, "cond_drop_prob", 0.0)
    encode = Spy(monkeypatch, model, "encode_views")
    denoise = Spy(monkeypatch, model, "denoise")
    unet = Spy(monkeypatch, model.denoiser, "forward")
    model.training_losses(batch(2, seed=9), generator=torch.Generator().manual_seed(9))
    x0, noisy, sigma = encode.result(0), denoise.arg(0, 0), denoise.arg(0, 1)
    assert (sigma.log().abs() > 0.3).all()  # far enough from 1 that sigma and sigma^2 differ
    noise = (noisy - x0) / sigma.reshape(-1, 1, 1, 1, 1)
    assert noise.mean().abs() < 0.2 and 0.85 < noise.std() < 1.15  # 2 x 256 samples
    s = sigma.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(unet.arg(0, 0)[:, :, :4], noisy / torch.sqrt(s**2 + 1))


def test_dropped_conditions_reach_the_unet_as_zeros(model, configure, monkeypatch):
    """Kills: conditioning dropout drawn but not applied (to the CLIP embedding, to the image
    latent, or to either); the masks swapped; the configured probability not used."""
    configure(self_cond_prob=0.0, joint_training=False)
    monkeypatch.setattr(model.config.conditioning, "cond_drop_prob", 0.3)
    drop_embedding = torch.tensor([False, True, False, True])
    drop_latent = torch.tensor([False, False, True, True])
    drawn = []

    def fixed_dropout(batch_size, prob, generator=None, device="cpu"):
        drawn.append((batch_size, prob))
        return drop_embedding.clone(), drop_latent.clone()

    monkeypatch.setattr(ouroboros, "conditioning_dropout", fixed_dropout)
    condition = Spy(monkeypatch, model, "encode_condition")
    unet = Spy(monkeypatch, model.denoiser, "forward")
    model.training_losses(batch(4, seed=3), generator=torch.Generator().manual_seed(3))

    assert drawn == [(4, 0.3)]
    embedding, latent = condition.result(0)
    assert len(unet) == 1
    sample, _, hidden = unet.calls[0][0][:3]
    assert hidden.shape == embedding.shape and sample.shape[2] == 8  # 4 noisy + 4 condition channels
    for i in range(4):
        frames = sample[i, :, 4:]  # the condition latent, concatenated to every frame
        if drop_embedding[i]:
            assert hidden[i].abs().max() == 0, f"sample {i}: embedding not dropped"
        else:
            torch.testing.assert_close(hidden[i], embedding[i])
        if drop_latent[i]:
            assert frames.abs().max() == 0, f"sample {i}: image latent not dropped"
        else:
            torch.testing.assert_close(frames, latent[i].expand_as(frames))
    assert embedding.abs().amax(dim=(1, 2)).min() > 0 and latent.abs().amax(dim=(1, 2, 3)).min() > 0


def _lgm_grads(model):
    return [p.grad for p in model.lgm.parameters()]


@pytest.mark.parametrize("lam", [0.7, 0.0])
def test_lpips_term_alone_gives_lgm_its_weighted_gradient(model, configure, monkeypatch, lam):
    """The MSE term is detached (its value kept) and the diffusion loss cannot reach LGM, so
    LGM's gradient is lambda times the gradient of LPIPS(render, target), recomputed here.
    lambda = 0 is the control: then LGM gets no gradient at all.
    Kills: LPIPS dropped from the total; LPIPS detached; lambda not applied."""
    configure(self_cond_prob=0.0, clean_recon_pass=False, lpips_weight=lam)

    def mse_detached(out):
        return {**out, "mse": out["mse"].detach()}

    Spy(monkeypatch, ouroboros, "reconstruction_loss", transform=mse_detached)
    render = Spy(monkeypatch, model, "render")
    b = batch(1, seed=4)
    model.zero_grad(set_to_none=True)
    out = model.training_losses(b, generator=torch.Generator().manual_seed(4))
    out["loss"].backward(retain_graph=True)
    grads = _lgm_grads(model)
    model.zero_grad(set_to_none=True)
    if lam == 0.0:
        assert all(g is None for g in grads)
        return
    params = list(model.lgm.parameters())
    lp = lpips_distance(render.result(0)["rgb"].flatten(0, 1), _gt(b["images"]).flatten(0, 1))
    reference = torch.autograd.grad(lam * lp, params, allow_unused=True)
    nonzero = 0
    for g, r in zip(grads, reference):
        if r is None:
            assert g is None or g.abs().max() == 0
            continue
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
        nonzero += bool(g.abs().max() > 0)
    assert nonzero > 0.5 * len(params)


@pytest.mark.parametrize("joint", [True, False])
def test_feedback_reaches_the_second_pass_detached(model, configure, monkeypatch, joint):
    """Kills: the renders not detached before the second pass; the second pass given zero
    feedback (or the first pass given the renders); the first pass run with gradients."""
    configure(self_cond_prob=1.0, clean_recon_pass=False, joint_training=joint)
    denoise = Spy(monkeypatch, model, "denoise")
    render = Spy(monkeypatch, model, "render")
    out = model.training_losses(batch(1, seed=5), generator=torch.Generator().manual_seed(5))

    assert out["self_cond_used"] is True and len(denoise) == 2 and len(render) == 1
    first, second = denoise.calls[0][0][5], denoise.calls[1][0][5]
    assert first["ccm"].abs().max() == 0 and first["rgb"].abs().max() == 0  # Algorithm 1: zero feedback
    assert first["ccm"].shape == (1, V, 3, RES, RES)
    renders = render.result(0)
    assert renders["ccm"].requires_grad is joint  # LGM trained in the noisy pass only when joint
    assert renders["ccm"].abs().max() > 0
    for name in ("ccm", "rgb"):
        assert torch.equal(second[name], renders[name].detach())
        assert not second[name].requires_grad
    assert not denoise.result(0).requires_grad, "no gradient through the first pass"
    assert denoise.result(1).requires_grad
    if not joint:
        assert out["loss_recon_mse"] == 0 and out["loss_recon_lpips"] == 0
