"""Algorithm 2 shaped as k-diffusion shapes a sampler: a denoiser, and a sampler of any denoiser.

:class:`RecursiveDenoiser` is ``D(x; sigma)`` of one batch of conditions that carries the 3D
feedback state of Algorithm 2: after its reconstruction steps it decodes its x0 prediction,
reconstructs it with LGM at c_noise(sigma), renders it at the cameras and feeds the renders to
its next calls; its last views, Gaussians and renders are the output. :func:`sample_euler` is
Euler on a sigma schedule for any ``denoiser(x, sigma, step)``, with a
``callback(step=, sigma=, x=, denoised=, gaussians=, renders=)`` after every step: progress bars
and per-step pictures go through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from model import edm
from model.camera_embedding import latent_plucker_rays
from model.conditioning import frame_guidance_scales

if TYPE_CHECKING:
    from model.ouroboros import Ouroboros3D


def reconstruction_steps(num_steps: int, feedback_every: int, has_feedback: bool) -> set[int]:
    """Sampling steps after which x0 is decoded and reconstructed (Algorithm 2).

    With feedback: every ``feedback_every``-th step (every step by default, as Algorithm 2),
    always including the last one, whose reconstruction is the output 3D. Without feedback
    only the last step (the two-stage baseline of Table 2).
    """
    if feedback_every < 1:
        raise ValueError(f"feedback_every must be >= 1, got {feedback_every}")
    steps = set(range(0, num_steps, feedback_every)) if has_feedback else set()
    return steps | {num_steps - 1}


class RecursiveDenoiser:
    """Algorithm 2's guided denoiser with its 3D feedback state, for one batch of conditions.

    Args:
        model: the Ouroboros3D.  cond_image: [B, 3, H, W] in [0, 1].  c2w: [B, V, 4, 4] model
        frame, view 0 the condition view.  K: [B, V, 3, 3] pixels at H.  num_steps: the
        sampler's steps (the last one always reconstructs).  guidance: per-frame (min, max) CFG
        scales (default: the config's); max <= 1 switches CFG off.  use_feedback: False gives
        a feedback model zero feedback at every step and reconstructs only at the end.
    State after a call: ``views`` [B, V, 3, H, W] in [0, 1] (decoded x0), ``gaussians``
    [B, N, 14], ``renders`` (render_gaussians at the V cameras), of the last reconstruction.
    """

    def __init__(self, model: "Ouroboros3D", cond_image: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor,
                 num_steps: int, feedback_every: int = 1, guidance: tuple[float, float] | None = None,
                 generator: torch.Generator | None = None, use_feedback: bool = True):
        cfg = model.config
        if cond_image.shape[-1] != cfg.resolution or cond_image.shape[-2] != cfg.resolution:
            raise ValueError(f"cond_image is {tuple(cond_image.shape[-2:])}, the model expects "
                             f"{cfg.resolution}x{cfg.resolution}")
        guidance = guidance or (cfg.conditioning.min_guidance, cfg.conditioning.max_guidance)
        self.model, self.c2w, self.K = model, c2w, K
        self.scales = frame_guidance_scales(guidance[0], guidance[1], c2w.shape[1]).to(cond_image.device)
        self.do_cfg = max(guidance) > 1.0
        self.embedding, self.cond_latent = model.encode_condition(cond_image, generator)
        self.plucker = latent_plucker_rays(c2w, K, cfg.resolution, model.latent_size)
        self.feeds_back = use_feedback and model.denoiser.has_feedback
        self.recon_at = reconstruction_steps(num_steps, feedback_every, self.feeds_back)
        self.feedback = None
        self.views = self.gaussians = self.renders = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """The guided x0 prediction at ``sigma`` with the feedback of the previous steps (zero at
        first); after a reconstruction step the state holds its views, Gaussians and renders."""
        model = self.model
        if self.feedback is None:
            self.feedback = model.feedback_maps(None, x)
        pred_x0 = model._guided_denoise(x, sigma, self.embedding, self.cond_latent, self.plucker,
                                        self.feedback, self.scales, self.do_cfg)  # fmt: skip
        if step in self.recon_at:
            self.views = model.decode_latents(pred_x0)
            self.gaussians = model.reconstruct(self.views, self.c2w, self.K, edm.c_noise(sigma).expand(x.shape[0]))
            self.renders = model.render(self.gaussians, self.c2w, self.K)
            if self.feeds_back:
                self.feedback = model.feedback_maps(self.renders, x)
        return pred_x0


def sample_euler(denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: Callable | None = None) -> torch.Tensor:
    """Euler steps along ``sigmas`` (descending, the last 0) for any ``denoiser(x, sigma, step)``.

    ``callback(step=, sigma=, x=, denoised=, gaussians=, renders=)`` runs after each step's
    prediction (``gaussians``/``renders``: the denoiser's, None for a denoiser without them).

    Returns:
        x at the last sigma (for sigma 0: the last prediction).
    """
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].float()
        denoised = denoiser(x, sigma, i)
        if callback is not None:
            callback(step=i, sigma=sigma, x=x, denoised=denoised, gaussians=getattr(denoiser, "gaussians", None),
                     renders=getattr(denoiser, "renders", None))
        x = edm.euler_step(x, denoised, sigma, sigmas[i + 1].float())
    return x
