"""common/image_metrics.py against scikit-image (PSNR, SSIM), the lpips package's own behaviour and
known luma / chroma splits."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common import image_metrics as metrics


def _image_pair(seed, h=40, w=52):
    """A smooth image and a noisy, shifted, partly occluded copy: SSIM well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([np.sin(7 * xx + c) * np.cos(5 * yy - c) for c in range(3)]) * 0.4 + 0.5
    a += rng.normal(0, 0.05, a.shape)
    b = np.roll(a, 2, axis=-1) + rng.normal(0, 0.08, a.shape)
    b[:, 5:15, 10:30] = 0.9
    return np.clip(a, 0, 1), np.clip(b, 0, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_matches_skimage(seed):
    a, b = _image_pair(seed)
    ours = metrics.psnr(torch.from_numpy(a), torch.from_numpy(b))
    ref = peak_signal_noise_ratio(a, b, data_range=1.0)
    assert ours.shape == ()
    assert float(ours) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_skimage(seed):
    a, b = _image_pair(seed)
    ref = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=0,
    )
    assert 0.05 < ref < 0.95  # a discriminating pair, not a trivial one
    ours64 = metrics.ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert float(ours64) == pytest.approx(ref, abs=1e-10)
    ours32 = metrics.ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert float(ours32) == pytest.approx(ref, abs=1e-5)


def test_batched_leading_dims_give_per_image_values():
    pairs = [_image_pair(s, 24, 24) for s in range(6)]
    a = torch.from_numpy(np.stack([p[0] for p in pairs])).reshape(2, 3, 3, 24, 24)
    b = torch.from_numpy(np.stack([p[1] for p in pairs])).reshape(2, 3, 3, 24, 24)
    s, p = metrics.ssim(a, b), metrics.psnr(a, b)
    assert s.shape == p.shape == (2, 3)
    for i, (x, y) in enumerate(pairs):
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=0)
        assert float(s.flatten()[i]) == pytest.approx(ref, abs=1e-10)
        assert float(p.flatten()[i]) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0))


def test_identical_images():
    a, _ = _image_pair(3)
    t = torch.from_numpy(a)
    assert float(metrics.ssim(t, t)) == pytest.approx(1.0, abs=1e-12)
    assert torch.isinf(metrics.psnr(t, t))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 17))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        metrics.ssim(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        metrics.ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_lpips_zero_for_identical_and_ordered_by_distortion():
    lp = metrics.LPIPSMetric("vgg")
    assert lp.net == "vgg" and lp.comparable and lp.trunk.real
    a, _ = _image_pair(4, 64, 64)
    clean = torch.from_numpy(a).float()
    rng = np.random.default_rng(0)
    small = (clean + torch.from_numpy(rng.normal(0, 0.02, a.shape)).float()).clamp(0, 1)
    large = (clean + torch.from_numpy(rng.normal(0, 0.3, a.shape)).float()).clamp(0, 1)
    d = lp(torch.stack([clean, small, large]), torch.stack([clean, clean, clean]))
    assert d.shape == (3,)
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(d[1]) < float(d[2])


def test_image_metrics_bundle():
    lp = metrics.LPIPSMetric("alex")
    pairs = [_image_pair(s, 32, 32) for s in range(2)]
    a = torch.from_numpy(np.stack([p[0] for p in pairs])).float()
    b = torch.from_numpy(np.stack([p[1] for p in pairs])).float()
    out = metrics.image_metrics(a, b, lp)
    assert set(out) == {"psnr", "ssim", "lpips"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())


def test_luma_chroma_split_separates_lost_colour_from_lost_brightness():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    grey = torch.full_like(red, 0.299)  # red's BT.601 luma, no colour
    luma_db, chroma_db = metrics.luma_chroma_psnr(grey * 2 - 1, red * 2 - 1, signed=True, pooled=True)
    # chroma of red: (1 - 0.299, -0.299, -0.299); of grey: 0 -> mean squared error 0.22339
    assert luma_db == float("inf") and abs(chroma_db - 10 * math.log10(3 / (0.701**2 + 2 * 0.299**2))) < 1e-4
    dim = red * 0.5  # the same hue at half brightness: both parts lose
    luma_db, chroma_db = metrics.luma_chroma_psnr(dim * 2 - 1, red * 2 - 1, signed=True, pooled=True)
    assert abs(luma_db - 10 * math.log10(1 / 0.1495**2)) < 1e-3 and chroma_db < 20


def test_signed_pooled_psnr_is_one_value_over_all_images_measured_on_0_1():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 4, 3, 8, 8, generator=g) * 2 - 1
    pred = target + 0.2 * torch.randn(target.shape, generator=g)  # overshoots [-1, 1]: clamped
    mse = (((pred + 1) / 2).clamp(0, 1) - (target + 1) / 2).square().mean()
    ours = metrics.psnr(pred, target, signed=True, pooled=True)
    assert ours.shape == () and float(ours) == pytest.approx(10 * math.log10(1 / float(mse)), abs=1e-4)
    assert float(metrics.psnr_from_mse(0.0)) == float("inf")
