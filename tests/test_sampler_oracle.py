"""Algorithm 2 (``Ouroboros3D.sample``) on cases with a known answer.

1. An oracle denoiser that always predicts one fixed x0: the probability-flow ODE of a point
   mass, ``dx/ds = (x - x0) / s``, has the exact solution ``x(s) = x0 + (s / s_0)(x_T - x0)``,
   and Euler steps are exact on it: every step's input and the end point are known.
2. The exact posterior mean of a Gaussian data distribution ``x0 ~ N(mu, sd^2)`` (per
   channel): ``D(x; s) = mu + sd^2 / (sd^2 + s^2) (x - mu)``. The ODE then carries the initial
   noise to N(mu, sd^2); the sampler's output is compared with Euler's closed form at 25 steps
   and with the distribution itself at 400 steps (Euler is first order: at SVD's 25 Karras
   steps it shrinks the standard deviation by about 16 percent, at 400 by about 1 percent).
3. The real tiny model: each step's denoiser sees the renders of the previous step's x0, and
   with and without feedback (same generator) the runs agree at step 0 and then differ.

The oracles replace ``Ouroboros3D.denoise`` (the network); decoding, LGM and rendering are
stubbed where they play no part in the answer.
"""

import math

import numpy as np
import pytest
import torch
from tiny_helpers import RES, V, Spy, cameras, tiny_model

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 700.0, 7.0
H = RES // 8


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def karras(n):
    """Karras et al. (2022) Eq. 5, written out here, then 0."""
    ramp = np.linspace(0.0, 1.0, n)
    s = (SIGMA_MAX ** (1 / RHO) + ramp * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return np.append(s, 0.0)


def _cond_image(seed=0):
    return torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def _stub_3d(monkeypatch, model):
    """Decoding = identity on latents, LGM and rendering = zeros (the oracle tests' answer does
    not go through them)."""
    monkeypatch.setattr(model, "decode_latents", lambda latents: latents.clone())
    monkeypatch.setattr(model, "reconstruct", lambda images, c2w, K, c_noise: images.new_zeros(images.shape[0], 1, 14))

    def render(gaussians, c2w, K):
        z = gaussians.new_zeros(c2w.shape[0], c2w.shape[1], 3, RES, RES)
        return dict(rgb=z, ccm=z, alpha=z[:, :, :1], depth=z[:, :, :1])

    monkeypatch.setattr(model, "render", render)


class Oracle:
    """Stands in for ``Ouroboros3D.denoise``; records (x, sigma) of every call."""

    def __init__(self, predict):
        self.predict, self.x, self.sigma = predict, [], []

    def __call__(self, noisy, sigma, embedding, cond_latent, plucker, feedback):
        self.x.append(noisy.clone())
        self.sigma.append(sigma.clone())
        return self.predict(noisy, sigma.reshape(-1, 1, 1, 1, 1).double()).float()


def test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0(model, monkeypatch):
    """Kills: the Euler step leaving x in place (or any wrong step), the initial noise not
    scaled by sqrt(sigma_max^2 + 1), a wrong or reversed schedule, the output not decoded from
    the last x0."""
    target = torch.randn(1, V, 4, H, H, generator=torch.Generator().manual_seed(1))
    oracle = Oracle(lambda x, s: target.double().expand(x.shape[0], -1, -1, -1, -1))
    monkeypatch.setattr(model, "denoise", oracle)
    from model import edm

    euler = Spy(monkeypatch, edm, "euler_step")
    c2w, K = cameras(1)
    n = 25
    out = model.sample(_cond_image(), c2w, K, num_steps=n, generator=torch.Generator().manual_seed(0),
                       progress=False, use_feedback=False)  # fmt: skip

    sigmas = karras(n)
    assert len(oracle.x) == n
    for i in range(n):  # CFG doubles the batch: both halves at the same x and sigma
        np.testing.assert_allclose(oracle.sigma[i].numpy(), sigmas[i], rtol=1e-6)
        torch.testing.assert_close(oracle.x[i][0], oracle.x[i][1])
    x_T = oracle.x[0][:1]
    assert x_T.std().item() == pytest.approx(math.sqrt(SIGMA_MAX**2 + 1), rel=0.25)
    for i in range(n):
        expected = target + (sigmas[i] / sigmas[0]) * (x_T - target)
        torch.testing.assert_close(oracle.x[i][:1], expected, atol=2e-3 * max(sigmas[i], 1), rtol=1e-5)
    torch.testing.assert_close(euler.result(n - 1), target, atol=1e-4, rtol=0)  # x at sigma = 0 is x0
    torch.testing.assert_close(out.views, model.decode_latents(target), atol=1e-5, rtol=0)


MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64).reshape(1, 1, 4, 1, 1)
SD = torch.tensor([0.5, 1.0, 0.25, 0.8], dtype=torch.float64).reshape(1, 1, 4, 1, 1)


def gaussian_posterior_mean(x, s):
    return MU + SD**2 / (SD**2 + s**2) * (x.double() - MU)


def _sample_gaussian(model, monkeypatch, n, batch):
    oracle = Oracle(gaussian_posterior_mean)
    monkeypatch.setattr(model, "denoise", oracle)
    _stub_3d(monkeypatch, model)
    c2w, K = cameras(batch)
    cond = _cond_image().expand(batch, -1, -1, -1)
    out = model.sample(cond, c2w, K, num_steps=n, generator=torch.Generator().manual_seed(2), progress=False)
    return out.views, oracle.x[0][:batch]


def test_gaussian_posterior_mean_oracle_matches_eulers_closed_form(model, monkeypatch):
    """Kills: any change to the Euler update, the schedule or the noise scale (the output is
    pinned to the closed form of 25 Euler steps on the Karras schedule)."""
    n = 25
    views, x_T = _sample_gaussian(model, monkeypatch, n, batch=2)
    s = karras(n)
    sd2 = SD.double() ** 2
    factor = torch.ones_like(sd2)
    for i in range(n - 1):  # Euler: x' - mu = (1 + (s' - s) s / (sd^2 + s^2)) (x - mu)
        factor = factor * (1 + (s[i + 1] - s[i]) * s[i] / (sd2 + s[i] ** 2))
    factor = factor * sd2 / (sd2 + s[n - 1] ** 2)  # the output is the last step's x0 prediction
    expected = MU + factor * (x_T.double() - MU)
    torch.testing.assert_close(views.double(), expected, atol=2e-4, rtol=0)
    ratio = (factor * math.sqrt(SIGMA_MAX**2 + 1) / SD).flatten()
    assert ((ratio > 0.8) & (ratio < 0.87)).all()  # first-order Euler's known shrinkage at 25 steps


@pytest.mark.parametrize("n", [400])
def test_gaussian_posterior_mean_oracle_samples_the_data_distribution(model, monkeypatch, n):
    """Kills: the Euler step leaving x in place, a wrong noise scale or schedule end (the
    samples would not have the data's per-channel mean and standard deviation)."""
    views, _ = _sample_gaussian(model, monkeypatch, n, batch=64)
    samples = views.double().transpose(0, 2).reshape(4, -1)  # per channel: 64 x 4 views x 4 x 4
    count = samples.shape[1]
    mean, std = samples.mean(1), samples.std(1)
    mu, sd = MU.flatten(), SD.flatten()
    assert ((mean - mu).abs() < 5 * sd / math.sqrt(count)).all(), (mean, mu)
    assert ((std / sd - 1).abs() < 0.07).all(), (std, sd)  # 5 standard errors + Euler's 1 %


def test_classifier_free_guidance_is_composed_per_frame(model, monkeypatch):
    """The unconditional half gets a zero CLIP embedding and a zero image latent; the guided x0
    is ``uncond + w_f (cond - uncond)`` with SVD's per-frame scales linspace(1, 3, V).
    Kills: the halves swapped, the unconditional half given the real conditions, no CFG."""
    x0_cond = torch.randn(1, V, 4, H, H, generator=torch.Generator().manual_seed(3)).double()
    x0_uncond = torch.randn(1, V, 4, H, H, generator=torch.Generator().manual_seed(4)).double()
    seen = []

    def conditional_oracle(noisy, sigma, embedding, cond_latent, plucker, feedback):
        cond = embedding.flatten(1).abs().amax(1) > 0
        assert torch.equal(cond, cond_latent.flatten(1).abs().amax(1) > 0)
        seen.append(cond)
        pick = cond.reshape(-1, 1, 1, 1, 1)
        return torch.where(pick, x0_cond, x0_uncond).float()

    monkeypatch.setattr(model, "denoise", conditional_oracle)
    _stub_3d(monkeypatch, model)
    guided = Spy(monkeypatch, model, "_guided_denoise")
    c2w, K = cameras(1)
    model.sample(_cond_image(), c2w, K, num_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert all(s.tolist() == [False, True] for s in seen)
    w = torch.linspace(1.0, 3.0, V, dtype=torch.float64).reshape(1, V, 1, 1, 1)
    torch.testing.assert_close(guided.result(0).double(), x0_uncond + w * (x0_cond - x0_uncond), atol=1e-5, rtol=0)
    seen.clear()
    model.sample(_cond_image(), c2w, K, num_steps=2, guidance=(1.0, 1.0), progress=False)
    assert all(s.tolist() == [True] for s in seen)  # max scale <= 1: no unconditional pass


def _spy_sampling(monkeypatch, model):
    spies = {name: Spy(monkeypatch, model, name) for name in ("_guided_denoise", "decode_latents", "reconstruct", "render")}
    return spies


def test_each_step_sees_the_renders_of_the_previous_steps_x0(model, monkeypatch):
    """Real tiny model, 3 steps with CFG: x0_i -> decoded -> LGM at c_noise(s_i) -> renders_i ->
    feedback of step i + 1. Kills: stale or zero feedback, feedback taken from the wrong step,
    LGM at c_noise = 0, the renders not of the reconstruction of that step's x0."""
    s = _spy_sampling(monkeypatch, model)
    c2w, K = cameras(1)
    n = 3
    out = model.sample(_cond_image(), c2w, K, num_steps=n, generator=torch.Generator().manual_seed(5), progress=False)
    guided, decode, recon, render = s["_guided_denoise"], s["decode_latents"], s["reconstruct"], s["render"]
    assert len(guided) == len(decode) == len(recon) == len(render) == n
    sigmas = karras(n)
    feedback0 = guided.arg(0, 5)
    assert feedback0["ccm"].abs().max() == 0 and feedback0["rgb"].abs().max() == 0
    for i in range(n):
        assert torch.equal(decode.arg(i, 0), guided.result(i)), f"step {i}: decoded x0 is not the step's"
        assert torch.equal(recon.arg(i, 0), decode.result(i))
        np.testing.assert_allclose(recon.arg(i, 3).numpy(), [0.25 * math.log(sigmas[i])], rtol=1e-5)
        assert torch.equal(render.arg(i, 0), recon.result(i))
    for i in range(1, n):
        feedback = guided.arg(i, 5)
        for name in ("ccm", "rgb"):
            assert torch.equal(feedback[name], render.result(i - 1)[name]), f"step {i}: {name} feedback"
        assert not torch.equal(feedback["ccm"], render.result(i)["ccm"])
    assert not torch.equal(render.result(0)["ccm"], render.result(1)["ccm"])  # feedback moves
    assert torch.equal(out.views, decode.result(n - 1)) and torch.equal(out.gaussians, recon.result(n - 1))


def test_with_and_without_feedback_agree_at_step_0_and_then_differ(model, monkeypatch):
    """Same generator: identical initial noise and first step (both start from zero feedback);
    from step 1 the feedback run sees renders and its predictions differ. Kills: feedback
    ignored by the sampler or by the denoiser, ``use_feedback`` ignored, a different noise draw."""
    runs = {}
    c2w, K = cameras(1)
    for use in (True, False):
        with monkeypatch.context() as m:
            s = _spy_sampling(m, model)
            out = model.sample(_cond_image(), c2w, K, num_steps=3, guidance=(1.0, 1.0), use_feedback=use,
                               generator=torch.Generator().manual_seed(6), progress=False)  # fmt: skip
            runs[use] = (s["_guided_denoise"], s["reconstruct"], out)
    (fb, fb_recon, fb_out), (no, no_recon, no_out) = runs[True], runs[False]
    assert len(fb_recon) == 3 and len(no_recon) == 1
    assert torch.equal(fb.arg(0, 0), no.arg(0, 0))  # same x_T
    assert torch.equal(fb.result(0), no.result(0))  # step 0: zero feedback in both
    assert torch.equal(fb.arg(1, 0), no.arg(1, 0))  # so the same x at step 1
    for i in range(3):
        assert no.arg(i, 5)["ccm"].abs().max() == 0
    assert fb.arg(1, 5)["ccm"].abs().max() > 0
    assert (fb.result(1) - no.result(1)).abs().max() > 1e-4
    assert (fb_out.views - no_out.views).abs().max() > 1e-4
