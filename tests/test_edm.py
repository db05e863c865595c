"""EDM functions (model/edm.py) against diffusers' EulerDiscreteScheduler configured as SVD's."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from model import edm
from model.svd import SVD_SCHEDULER_CONFIG  # the published img2vid scheduler_config.json


@pytest.fixture(scope="module")
def scheduler():
    s = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    s.set_timesteps(25)
    return s


def test_karras_sigmas_match_svd_scheduler(scheduler):
    ours = edm.karras_sigmas(25)
    assert ours.shape == (26,) and ours[-1] == 0
    torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert ours[0] == pytest.approx(700.0) and ours[-2] == pytest.approx(0.002)


def test_timesteps_are_c_noise(scheduler):
    torch.testing.assert_close(
        edm.c_noise(edm.karras_sigmas(25)[:-1]).float(), scheduler.timesteps.float(), rtol=1e-5, atol=1e-5
    )


def test_initial_noise_scale_matches_scheduler(scheduler):
    assert edm.initial_noise_scale() == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)


def test_coefficients_match_formulas():
    s = torch.tensor([0.002, 0.5, 1.0, 3.0, 700.0], dtype=torch.float64)
    torch.testing.assert_close(edm.c_in(s), 1 / (s**2 + 1).sqrt())
    torch.testing.assert_close(edm.c_out(s), -s / (s**2 + 1).sqrt())
    torch.testing.assert_close(edm.c_skip(s), 1 / (s**2 + 1))
    torch.testing.assert_close(edm.c_noise(s), 0.25 * s.log())
    torch.testing.assert_close(edm.loss_weight(s), (1 + s**2) / s**2)


def test_scale_model_input_and_step_match_scheduler():
    """scale_model_input == c_in x; the scheduler's step == our denoise + euler_step."""
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    sched.set_timesteps(25)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 6, 6, generator=gen, dtype=torch.float64) * 5
    sigmas = edm.karras_sigmas(25)
    for i in (0, 7, 24):
        sched._step_index = i
        sigma = sigmas[i]
        out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(sched.scale_model_input(x, sched.timesteps[i]), edm.c_in(sigma) * x,
                                   rtol=1e-5, atol=1e-6)
        sched._step_index = i
        step = sched.step(out, sched.timesteps[i], x)
        pred_x0 = edm.denoise(out, x, sigma)
        torch.testing.assert_close(step.pred_original_sample, pred_x0, rtol=1e-5, atol=1e-5)
        ours = edm.euler_step(x, pred_x0, float(sigma), float(sigmas[i + 1]))
        torch.testing.assert_close(step.prev_sample, ours, rtol=1e-5, atol=1e-4)


def test_denoise_inverts_the_v_target():
    """With F equal to its ideal target, D(x0 + s n; s) == x0 exactly: the preconditioning is
    consistent (target F* = (x0 - c_skip x) / c_out)."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    n = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.1, 1.0, 20.0], dtype=torch.float64)[:, None]
    x = edm.add_noise(x0, n, s)
    target = (x0 - edm.c_skip(s) * x) / edm.c_out(s)
    torch.testing.assert_close(edm.denoise(target, x, s), x0)
    # EDM's choice of c_out: that ideal target has unit variance for unit-variance data.
    big_x0 = torch.randn(200_000, generator=gen, dtype=torch.float64)
    big_n = torch.randn(200_000, generator=gen, dtype=torch.float64)
    for sv in (0.3, 2.0, 50.0):
        sv = torch.tensor(sv, dtype=torch.float64)
        xt = big_x0 + sv * big_n
        f_star = (big_x0 - edm.c_skip(sv) * xt) / edm.c_out(sv)
        assert f_star.var().item() == pytest.approx(1.0, abs=0.02)


def test_lognormal_sigma_distribution():
    gen = torch.Generator().manual_seed(2)
    s = edm.sample_sigmas(100_000, generator=gen)
    logs = s.log()
    assert logs.mean().item() == pytest.approx(1.0, abs=0.03)
    assert logs.std().item() == pytest.approx(1.6, abs=0.03)
    again = edm.sample_sigmas(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, edm.sample_sigmas(5, generator=torch.Generator().manual_seed(3)))


def test_denoising_loss_is_weighted_mse():
    x0 = torch.zeros(2, 3)
    pred = torch.full((2, 3), 2.0)  # an error of 2, not 1: squared and absolute errors differ
    s = torch.tensor([[1.0], [2.0]])
    expected = 4.0 * (2.0 * 3 + 1.25 * 3) / 6
    assert edm.denoising_loss(pred, x0, s).item() == pytest.approx(expected)
    assert edm.broadcast_sigma(torch.ones(4), 5).shape == (4, 1, 1, 1, 1)


def test_add_noise_is_x0_plus_sigma_times_noise():
    x0, noise = torch.full((2, 3), 0.5), torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0]])
    s = torch.tensor([[0.5], [3.0]])  # not 1: sigma and sigma^2 differ
    torch.testing.assert_close(edm.add_noise(x0, noise, s), torch.tensor([[1.0, -0.5, 0.75], [1.25, 3.5, -2.5]]))
