"""Image metrics, the project's one module for them: PSNR, SSIM, LPIPS, and PSNR's luma / chroma parts.

The benchmark (Sec. 4.1, "Metrics"), the trainers' logs, the benchmarks and the experiments all
import them from here. Images are ``[..., 3, H, W]`` tensors in ``[0, data_range]`` (any leading
batch dims; ``signed=True``: in ``[-1, 1]``, measured on ``[0, 1]`` after ``(x + 1) / 2`` and
clamping there, data range 1), and a metric returns one value per image (``[...]``), so that callers can average
over views, objects or both as they need; ``pooled=True`` gives one value over all the images
(the PSNR of their pooled squared error).

* PSNR: ``10 log10(data_range^2 / MSE)`` over all pixels and channels of an image
  (:func:`psnr_from_mse`, the one place the formula is written).
* Luma / chroma (ITU-R BT.601): luma ``Y = 0.299 R + 0.587 G + 0.114 B``, chroma the three
  channels minus their luma (zero for greys); :func:`luma_chroma_psnr` splits a PSNR into the two,
  to tell lost colour from lost brightness.
* SSIM: Wang et al. 2004 with the standard constants: Gaussian window of 11 taps, sigma 1.5,
  ``K1 = 0.01``, ``K2 = 0.03``, population (not sample) covariance, computed per channel on
  the valid region (no padding) and averaged over the region and the channels. This is exactly
  what ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)`` computes.
* LPIPS (Zhang et al. 2018) with the ``lpips`` package, VGG trunk by default (the backbone the
  paper names for its perceptual loss, Eq. 2, and the one the GSO benchmarks it compares with
  report), built by the project's one builder (:func:`common.perceptual.builder.build_lpips`):
  ImageNet trunk from the install step's cache. When the cache is missing the trunk is random
  (with a warning) and :attr:`LPIPSMetric.comparable` is False: such numbers exercise the code
  path only and must not be compared with published ones; :attr:`LPIPSMetric.trunk` says which
  trunk produced the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() < 3 or pred.shape[-3] != 3:
        raise ValueError(f"expected images [..., 3, H, W], got {tuple(pred.shape)}")


def _prepared(pred: torch.Tensor, target: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked images; ``signed`` ones ([-1, 1]) mapped to [0, 1] and clamped there."""
    _check_pair(pred, target)
    if signed:
        return ((pred + 1) / 2).clamp(0, 1), ((target + 1) / 2).clamp(0, 1)
    return pred, target


def _mse(error: torch.Tensor, pooled: bool) -> torch.Tensor:
    """Mean squared ``error`` [..., C, H, W] per image ([...]), or over everything (``pooled``)."""
    square = error.pow(2)
    return square.mean() if pooled else square.flatten(-3).mean(-1)


def psnr_from_mse(mse, data_range: float = 1.0) -> torch.Tensor:
    """``10 log10(data_range^2 / mse)`` in dB (``inf`` where ``mse`` is 0).

    Args:
        mse: a tensor (any shape) or a number (then a float64 tensor comes back).
    """
    if not torch.is_tensor(mse):
        mse = torch.tensor(float(mse), dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, signed: bool = False,
         pooled: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` per image.

    Args:
        pred, target: [..., 3, H, W] in [0, data_range]; ``signed``: in [-1, 1], measured on
            [0, 1] (data range 1).
        pooled: one value from the squared error of all the images together.
    Returns:
        [...] in dB (``inf`` for identical images); ``pooled``: [].
    """
    pred, target = _prepared(pred, target, signed)
    return psnr_from_mse(_mse(pred - target, pooled), data_range)


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights of R, G, B


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of images [..., 3, H, W] -> [..., 1, H, W]."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("c,...chw->...hw", weights, images).unsqueeze(-3)


def chroma(images: torch.Tensor) -> torch.Tensor:
    """The colour part of images [..., 3, H, W]: each channel minus the luma (``luma``); zero for
    greys. Linear, so ``chroma(x - y) = chroma(x) - chroma(y)``."""
    return images - luma(images)


def luma_chroma_psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, signed: bool = False,
                     pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(luma dB, chroma dB): :func:`psnr` of the luma and of the chroma of the images (same
    arguments). A round trip that keeps brightness and greys the colours scores high on the
    first and low on the second: how much of an error is lost colour.
    """
    pred, target = _prepared(pred, target, signed)
    return (psnr_from_mse(_mse(luma(pred) - luma(target), pooled), data_range),
            psnr_from_mse(_mse(chroma(pred) - chroma(target), pooled), data_range))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64):
    """Normalised 1-D Gaussian taps ``exp(-x^2 / (2 sigma^2))``, ``x = -(size//2) .. size//2``.

    Returns:
        [size]
    """
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter with no padding: [N, C, H, W] -> [N, C, H-k+1, W-k+1]."""
    c = x.shape[1]
    k = window.numel()
    wx = window.view(1, 1, 1, k).expand(c, 1, 1, k)
    wy = window.view(1, 1, k, 1).expand(c, 1, k, 1)
    return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, Eq. 13) per image, mean over channels.

    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
    with ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` and local statistics from a Gaussian window,
    averaged over the valid (unpadded) region.

    Args:
        pred, target: [..., 3, H, W] in [0, data_range], H and W >= window_size.
    Returns:
        [...]
    """
    _check_pair(pred, target)
    h, w = pred.shape[-2:]
    if min(h, w) < window_size:
        raise ValueError(f"images of {h}x{w} px are smaller than the SSIM window ({window_size})")
    lead = pred.shape[:-3]
    x = pred.reshape(-1, *pred.shape[-3:])
    y = target.reshape(-1, *target.shape[-3:]).to(x.dtype)
    window = gaussian_window(window_size, sigma, dtype=x.dtype).to(x.device)
    mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
    var_x = _filter_valid(x * x, window) - mu_x * mu_x
    var_y = _filter_valid(y * y, window) - mu_y * mu_y
    cov_xy = _filter_valid(x * y, window) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(-1).reshape(lead)


class LPIPSMetric:
    """LPIPS distance per image with the ``lpips`` package (linear heads v0.1, shipped with it).

    Attributes:
        net: trunk name ("vgg" by default, or "alex").
        trunk: :class:`common.perceptual.builder.LPIPSTrunk` (which trunk, real or random).
        comparable: True when the trunk has its ImageNet weights; False when it had to be random:
            the numbers are then NOT comparable with published LPIPS values.
    """

    def __init__(self, net: str = "vgg", device: str | torch.device = "cpu"):
        from common.perceptual.builder import build_lpips

        self.model = build_lpips(net, allow_random=True).to(device)
        self.net = net
        self.trunk = self.model.trunk
        self.comparable = self.trunk.real
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """LPIPS per image.

        Args:
            pred, target: [..., 3, H, W] in [0, 1].
        Returns:
            [...] (lower is better)
        """
        _check_pair(pred, target)
        lead = pred.shape[:-3]
        x = pred.reshape(-1, *pred.shape[-3:]).float()
        y = target.reshape(-1, *target.shape[-3:]).float()
        out = [
            self.model(x[i : i + chunk].to(self.device), y[i : i + chunk].to(self.device), normalize=True)
            .flatten()
            .cpu()
            for i in range(0, x.shape[0], chunk)
        ]
        return torch.cat(out).reshape(lead)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, lpips_metric: LPIPSMetric) -> dict:
    """PSNR, SSIM and LPIPS per image of ``pred`` against ``target`` ([..., 3, H, W] in [0, 1]).

    Returns:
        dict(psnr=[...], ssim=[...], lpips=[...]) float64 CPU tensors.
    """
    pred = pred.clamp(0.0, 1.0)
    target = target.clamp(0.0, 1.0)
    return {
        "psnr": psnr(pred.double(), target.double()).cpu(),
        "ssim": ssim(pred.double(), target.double()).cpu(),
        "lpips": lpips_metric(pred, target).double(),
    }

