"""Ouroboros3D: SVD multi-view diffusion and LGM in one recursive diffusion process (Sec. 3).

Training is Algorithm 1 (:meth:`Ouroboros3D.training_losses`), sampling Algorithm 2
(:meth:`Ouroboros3D.sample`). Every camera is in the MODEL FRAME (common.conventions:
the world rotated about +Z so that view 0, the condition view, sits at azimuth 0); LGM works
in its own frame, and its Gaussians are moved back with ``model.cameras.lgm_to_model_gaussians``
before they are rendered with the model-frame cameras.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import T2IAdapter
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from common.atomic import atomic_dir
from model import edm
from model.camera_embedding import CameraEmbedding, latent_plucker_rays
from model.cameras import lgm_to_model_gaussians
from model.conditioning import (
    added_time_ids,
    classifier_free_guidance,
    clip_image_embedding,
    condition_latent,
    conditioning_dropout,
)
from model.config import OuroborosConfig
from model.feedback_adapter import build_adapter
from model.lgm import LGM, LGMConfig, prepare_inputs, reconstruction_loss
from model.multiview_unet import MultiViewUNet
from model.rasterizer import render_gaussians
from model.sampling import RecursiveDenoiser, sample_euler
from model.shipped import resolve_checkpoint
from model.svd import (
    SVDComponents,
    build_svd_components,
    component_configs,
    from_vae_pixels,
    load_svd_components,
    save_svd_components,
    to_vae_pixels,
    vae_encoding,
)

CONFIG_NAME = "ouroboros_config.json"


@dataclass
class SampleOutput:
    views: torch.Tensor  # [B, V, 3, H, W] in [0, 1]
    gaussians: torch.Tensor  # [B, N, 14] model frame
    renders: dict  # render_gaussians output of ``gaussians`` at the V cameras


def use_self_conditioning(prob: float, generator: torch.Generator | None = None) -> bool:
    """Algorithm 1's coin: feed the 3D feedback of a first pass with probability ``prob`` (0.5)."""
    device = generator.device if generator is not None else "cpu"
    return bool(torch.rand(1, generator=generator, device=device).item() < prob)


class Ouroboros3D(nn.Module):
    """The whole model. Build it with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(self, config: OuroborosConfig, svd: SVDComponents, denoiser: MultiViewUNet, lgm: LGM):
        super().__init__()
        # the config describes the parts it is saved with, also those loaded from ``svd_path``
        self.config = dataclasses.replace(config, **component_configs(svd))
        self.denoiser = denoiser
        self.vae = svd.vae
        self.image_encoder = svd.image_encoder
        self.feature_extractor = svd.feature_extractor
        self.lgm = lgm
        self.vae.requires_grad_(False)
        self.image_encoder.requires_grad_(False)
        self.lgm.requires_grad_(config.joint_training)

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_config(cls, config: OuroborosConfig) -> "Ouroboros3D":
        """Build from a config: SVD parts from ``svd_path`` when set (else random), LGM from
        ``lgm_path`` when set (else random), camera MLP and adapters freshly initialised."""
        if config.svd_path:
            svd = load_svd_components(config.svd_path, variant=config.svd_variant)
        else:
            svd = build_svd_components(config)
        unet_channels = tuple(svd.unet.config.block_out_channels)
        camera = CameraEmbedding(out_channels=unet_channels[0], hidden_channels=config.camera_hidden_channels)
        ccm_adapter = rgb_adapter = None
        if config.feedback != "none":
            if tuple(config.adapter_channels) != unet_channels:
                raise ValueError(
                    f"adapter_channels {config.adapter_channels} must equal the UNet's block_out_channels {unet_channels}"
                )
            ccm_adapter = build_adapter(config)
            if config.feedback == "ccm_rgb":
                rgb_adapter = build_adapter(config)
        lgm_cfg = LGMConfig.preset(config.lgm_preset)
        lgm = LGM.from_pretrained(config.lgm_path, lgm_cfg) if config.lgm_path else LGM(lgm_cfg)
        return cls(config, svd, MultiViewUNet(svd.unet, camera, ccm_adapter, rgb_adapter), lgm)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Ouroboros3D":
        """Load a folder written by :meth:`save_pretrained`.

        ``overrides`` change its config (e.g. ``feedback="ccm_rgb"``, ``joint_training=True``
        to fine-tune a diffusion-only model with 3D feedback): a feedback adapter the folder
        does not hold is built fresh (zero output at the start, ``model.feedback_adapter``);
        ``lgm_path`` replaces the folder's LGM with another pretrained one. The folder's SVD
        parts are always loaded from the folder itself. ``path`` may also name a checkpoint
        shipped in the repository (``"tiny"``: ``model.shipped``).
        """
        path = resolve_checkpoint(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; not an Ouroboros3D export")
        config = OuroborosConfig.load(path / CONFIG_NAME)
        if overrides:
            try:
                config = OuroborosConfig.from_dict({**config.to_dict(), **overrides})
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: overrides {sorted(overrides)}: {err}") from err
        svd = load_svd_components(path)
        camera = CameraEmbedding.from_pretrained(path / "camera_embedding")

        def adapter(name: str) -> T2IAdapter:
            folder = path / name
            return T2IAdapter.from_pretrained(folder) if folder.is_dir() else build_adapter(config)

        ccm_adapter = adapter("ccm_adapter") if config.feedback != "none" else None
        rgb_adapter = adapter("rgb_adapter") if config.feedback == "ccm_rgb" else None
        lgm_dir = overrides.get("lgm_path") or path / "lgm"
        lgm = LGM.from_pretrained(lgm_dir)  # architecture from its own config.json
        return cls(config, svd, MultiViewUNet(svd.unet, camera, ccm_adapter, rgb_adapter), lgm)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers-style folder (SVD layout + camera_embedding/, ccm_adapter/,
        rgb_adapter/, lgm/, ouroboros_config.json), atomically: built beside, then renamed.

        The folder is self-contained: it holds every part, so its config names no folder the
        parts were loaded from (``svd_path``, ``lgm_path`` cleared; diffusers' ``_name_or_path``
        emptied), nothing of the machine that wrote it."""
        for part in self.modules():
            if hasattr(part, "register_to_config") and part.config.get("_name_or_path"):
                part.register_to_config(_name_or_path="")
        with atomic_dir(path) as tmp:
            svd = SVDComponents(self.denoiser.unet, self.vae, self.image_encoder, self.feature_extractor)
            save_svd_components(svd, tmp)
            self.denoiser.camera.save_pretrained(tmp / "camera_embedding")
            if self.denoiser.ccm_adapter is not None:
                self.denoiser.ccm_adapter.save_pretrained(tmp / "ccm_adapter")
            if self.denoiser.rgb_adapter is not None:
                self.denoiser.rgb_adapter.save_pretrained(tmp / "rgb_adapter")
            self.lgm.save_pretrained(tmp / "lgm")
            dataclasses.replace(self.config, svd_path=None, lgm_path=None).save(tmp / CONFIG_NAME)

    # ------------------------------------------------------------------ training setup
    def trainable_parameters(self, objective: str = "algorithm1") -> list[nn.Parameter]:
        """``algorithm1``: UNet + camera MLP + adapters, and LGM when ``joint_training``.
        ``reconstruction``: LGM alone (:meth:`reconstruction_losses`). VAE and CLIP frozen."""
        if objective == "reconstruction":
            return list(self.lgm.parameters())
        params = list(self.denoiser.parameters())
        if self.config.joint_training:
            params += list(self.lgm.parameters())
        return params

    def trainable_parameter_groups(self, objective: str = "algorithm1") -> dict[str, list[nn.Parameter]]:
        """:meth:`trainable_parameters` by model: ``denoiser`` (UNet, camera MLP, adapters) and
        ``lgm`` (when it trains); for per-model gradient norms and clipping."""
        params = set(self.trainable_parameters(objective))
        groups = {"denoiser": [p for p in self.denoiser.parameters() if p in params],
                  "lgm": [p for p in self.lgm.parameters() if p in params]}  # fmt: skip
        return {k: [p for p in v if p.requires_grad] for k, v in groups.items() if v}

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        if hasattr(self.lgm, "enable_gradient_checkpointing"):
            self.lgm.enable_gradient_checkpointing()

    def train(self, mode: bool = True) -> "Ouroboros3D":
        super().train(mode)
        self.vae.eval()
        self.image_encoder.eval()
        return self

    # ------------------------------------------------------------------ building blocks
    @property
    def latent_size(self) -> int:
        return self.config.resolution // 8

    @torch.no_grad()
    def encode_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training targets x_0: VAE latents (sampled, times the scaling factor), encoded in
        float32 when the VAE's config has ``force_upcast`` (``model.svd.vae_encoding``).

        images [B, F, 3, H, W] in [0, 1] -> [B, F, C_latent, H/8, W/8] float32
        """
        with vae_encoding(self.vae):
            dist = self.vae.encode(to_vae_pixels(images.flatten(0, 1)).to(self.vae.dtype)).latent_dist
            latents = dist.sample(generator=generator) * self.vae.config.scaling_factor
        return latents.unflatten(0, images.shape[:2]).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents [B, F, 4, h, w] -> images [B, F, 3, 8h, 8w] float32 in [0, 1] (temporal
        decoder over F, in the VAE's dtype as SVD's pipeline decodes)."""
        B, F = latents.shape[:2]
        z = (latents.flatten(0, 1) / self.vae.config.scaling_factor).to(self.vae.dtype)
        return from_vae_pixels(self.vae.decode(z, num_frames=F).sample.unflatten(0, (B, F)).float())

    @torch.no_grad()
    def encode_condition(self, cond_image: torch.Tensor, generator: torch.Generator | None = None):
        """SVD conditioning of the condition image [B, 3, H, W] in [0, 1]:
        (CLIP embedding [B, 1, D], image latent [B, 4, h, w]), both float32."""
        embedding = clip_image_embedding(self.image_encoder, self.feature_extractor, cond_image)
        latent = condition_latent(self.vae, cond_image, self.config.conditioning.noise_aug_strength, generator)
        return embedding.float(), latent.float()

    def denoise(self, noisy, sigma, embedding, cond_latent, plucker, feedback) -> torch.Tensor:
        """The denoiser D(x; s) of Eq. 1: ``c_skip x + c_out F(c_in x; c_noise, cond, camera, feedback)``.

        Args:
            noisy: [B, F, 4, h, w] x = x_0 + s n.  sigma: [B].
            embedding: [B, 1, D].  cond_latent: [B, 4, h, w], concatenated to every frame.
            plucker: [B, F, 6, h, w].  feedback: dict(ccm, rgb) of [B, F, 3, H, W] or None.
        Returns:
            predicted x_0 [B, F, 4, h, w]
        """
        s = edm.broadcast_sigma(sigma, noisy.dim())
        frames = cond_latent[:, None].expand(-1, noisy.shape[1], -1, -1, -1)
        dtype = self.denoiser.unet.dtype  # the network may run in half precision, EDM in fp32
        model_input = torch.cat([edm.c_in(s) * noisy, frames], dim=2).to(dtype)
        ids = added_time_ids(self.config.conditioning, noisy.shape[0], noisy.device, dtype)
        out = self.denoiser(
            model_input, edm.c_noise(sigma), embedding.to(dtype), ids, plucker=plucker, feedback=feedback
        )
        return edm.denoise(out.to(noisy.dtype), noisy, s)

    def reconstruct(self, images: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, c_noise: torch.Tensor):
        """LGM on four of the views (Sec. 3.2): G(x0, c_noise), returned in the model frame.

        Args:
            images: [B, V, 3, H, W] in [0, 1].  c2w: [B, V, 4, 4] model frame.  K: [B, V, 3, 3]
            (pixels of H).  c_noise: [B].
        Returns:
            Gaussians [B, N, 14] float32 in the model frame.

        Only LGM's input tensor is cast to its dtype: the views' preprocessing, the cameras and
        the Gaussians' frame change stay float32, and ``c_noise`` stays float32 (the time
        embedding computes its sinusoids in float32 and casts them itself).
        """
        idx = list(self.config.lgm_input_views)
        lgm_in = prepare_inputs(images[:, idx].float(), c2w[:, idx], K[:, idx], self.config.lgm_resolution)
        dtype = next(self.lgm.parameters()).dtype
        gaussians = self.lgm(lgm_in.to(dtype), c_noise.float())
        return lgm_to_model_gaussians(gaussians.float(), c2w[:, idx[0]].float())

    def render(self, gaussians: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> dict:
        """Render at every camera at the model's resolution (RGB over the configured background)."""
        size = self.config.resolution
        return render_gaussians(gaussians, c2w, K, size, size, background=self.config.background)

    def feedback_maps(self, renders: dict | None, like: torch.Tensor) -> dict | None:
        """The feedback G(x0) (Sec. 3.3): rendered CCM (and RGB), detached; zeros when
        ``renders`` is None (no 3D feedback this step); None when the model has no feedback.

        RGB is in [0, 1]; CCM is the rendered ``centre + 0.5`` composited over 0, in [0, 1] for
        Gaussians inside the unit cube and not clamped (training and sampling feed the same maps).
        """
        if not self.denoiser.has_feedback:
            return None
        B, F = like.shape[:2]
        size = self.config.resolution
        if renders is None:
            zeros = like.new_zeros(B, F, 3, size, size)
            return dict(ccm=zeros, rgb=zeros if self.denoiser.rgb_adapter is not None else None)
        rgb = renders["rgb"].detach() if self.denoiser.rgb_adapter is not None else None
        return dict(ccm=renders["ccm"].detach(), rgb=rgb)

    # ------------------------------------------------------------------ Algorithm 1
    def training_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """Algorithm 1: EDM diffusion loss with 3D-aware self-conditioning + LGM loss (Eq. 2).

        ``batch`` (docs/interfaces.md): images [B, V, 3, H, W] in [0, 1] over the background,
        alphas [B, V, 1, H, W], c2w [B, V, 4, 4] model frame, K [B, V, 3, 3] pixels at H, view 0
        the condition image (a ``ccm`` entry is not read).

        1. ``ln s ~ N(1.0, 1.6^2)``; x = x_0 + s n (x_0: VAE latents of the views).
        2. First pass with zero feedback -> x0_hat (without grad if a second pass follows).
        3. If LGM is needed (joint training, or self-conditioning this step): decode x0_hat,
           reconstruct with LGM at c_noise(s), render the V views; the reconstruction loss
           (Eq. 2) trains LGM when ``joint_training``, plus the clean-image pass at
           c_noise(sigma_min) (Sec. 3.2; not c_noise = 0, which would mean s = 1).
        4. With probability ``self_cond_prob`` (feedback models only): second pass with the
           detached renders as feedback; its x0_hat gives the diffusion loss.
        Returns:
            dict(loss, loss_diffusion, loss_recon_mse, loss_recon_lpips, self_cond_used, visuals)
        """
        cfg = self.config
        images, c2w, K = batch["images"], batch["c2w"], batch["K"]
        alphas = batch["alphas"]
        B, V, _, H, W = images.shape
        if H != cfg.resolution or W != cfg.resolution:
            raise ValueError(f"batch images are {H}x{W}, the model expects {cfg.resolution}x{cfg.resolution}")
        if V != cfg.num_views:
            raise ValueError(f"batch has {V} views, the model expects {cfg.num_views}")
        device = images.device

        x0 = self.encode_views(images, generator)
        embedding, cond_latent = self.encode_condition(images[:, 0], generator)
        drop_embedding, drop_latent = conditioning_dropout(B, cfg.conditioning.cond_drop_prob, generator, device)
        embedding = embedding * (~drop_embedding).to(embedding.dtype)[:, None, None]
        cond_latent = cond_latent * (~drop_latent).to(cond_latent.dtype)[:, None, None, None]
        plucker = latent_plucker_rays(c2w, K, H, self.latent_size)

        sigma = edm.sample_sigmas(B, cfg.edm.p_mean, cfg.edm.p_std, generator, device)
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        noisy = edm.add_noise(x0, noise, edm.broadcast_sigma(sigma, x0.dim()))

        self_cond = self.denoiser.has_feedback and use_self_conditioning(cfg.self_cond_prob, generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self_cond):
            pred_x0 = self.denoise(noisy, sigma, embedding, cond_latent, plucker, self.feedback_maps(None, x0))

        zero = images.new_zeros(())
        recon_mse, recon_lpips = zero, zero
        visuals = {"target": images.detach()}
        if cfg.joint_training or self_cond:
            decoded = self.decode_latents(pred_x0.detach())
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.joint_training):
                renders = self.render(self.reconstruct(decoded, c2w, K, edm.c_noise(sigma)), c2w, K)
            visuals.update(pred=decoded, render_rgb=renders["rgb"].detach(), render_ccm=renders["ccm"].detach())
            if cfg.joint_training:
                recon_mse, recon_lpips = self._recon_loss(renders, images, alphas)
                if cfg.clean_recon_pass:
                    clean_c_noise = edm.c_noise(sigma.new_full((B,), cfg.edm.sigma_min))
                    clean = self.render(self.reconstruct(images, c2w, K, clean_c_noise), c2w, K)
                    mse, lp = self._recon_loss(clean, images, alphas)
                    recon_mse, recon_lpips = recon_mse + mse, recon_lpips + lp
            if self_cond:
                feedback = self.feedback_maps(renders, x0)
                pred_x0 = self.denoise(noisy, sigma, embedding, cond_latent, plucker, feedback)

        loss_diffusion = edm.denoising_loss(pred_x0, x0, edm.broadcast_sigma(sigma, x0.dim()))
        loss = loss_diffusion + recon_mse + cfg.lpips_weight * recon_lpips
        return dict(
            loss=loss,
            loss_diffusion=loss_diffusion.detach(),
            loss_recon_mse=recon_mse.detach(),
            loss_recon_lpips=recon_lpips.detach(),
            self_cond_used=self_cond,
            visuals=visuals,
        )

    def reconstruction_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """LGM alone on the clean views (its own pretraining): Eq. 2 of the renders of
        ``G(x_0, c_noise(sigma_min))`` against the views, the clean pass of Algorithm 1.

        ``batch`` as :meth:`training_losses`. Returns the same keys (``loss_diffusion`` = 0).
        """
        images, c2w, K = batch["images"], batch["c2w"], batch["K"]
        B = images.shape[0]
        c_noise = edm.c_noise(images.new_full((B,), self.config.edm.sigma_min, dtype=torch.float32))
        renders = self.render(self.reconstruct(images, c2w, K, c_noise), c2w, K)
        mse, lp = self._recon_loss(renders, images, batch["alphas"])
        zero = mse.new_zeros(())
        return dict(
            loss=mse + self.config.lpips_weight * lp,
            loss_diffusion=zero,
            loss_recon_mse=mse.detach(),
            loss_recon_lpips=lp.detach(),
            self_cond_used=False,
            visuals=dict(target=images.detach(), render_rgb=renders["rgb"].detach(),
                         render_ccm=renders["ccm"].detach()),
        )

    def _recon_loss(self, renders: dict, images: torch.Tensor, alphas: torch.Tensor):
        """Eq. 2 terms (MSE, LPIPS), unweighted, of renders vs the ground-truth views, in float32."""
        out = reconstruction_loss(renders["rgb"], renders["alpha"], images.float(), alphas.float(), self.config.lpips_weight,
                                  self.config.allow_random_lpips)
        return out["mse"], out["lpips"]

    # ------------------------------------------------------------------ Algorithm 2
    def _guided_denoise(self, x, sigma, embedding, cond_latent, plucker, feedback, scales, do_cfg):
        """D(x; s) with SVD's classifier-free guidance (unconditional = zero embedding and latent)."""
        B = x.shape[0]
        sig = sigma.expand(B)
        if not do_cfg:
            return self.denoise(x, sig, embedding, cond_latent, plucker, feedback)
        double = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
        fb = None if feedback is None else {k: double(v) for k, v in feedback.items()}
        pred = self.denoise(
            double(x),
            double(sig),
            torch.cat([torch.zeros_like(embedding), embedding]),
            torch.cat([torch.zeros_like(cond_latent), cond_latent]),
            double(plucker),
            fb,
        )
        uncond, cond = pred.chunk(2)
        return classifier_free_guidance(uncond, cond, scales)

    @torch.no_grad()
    def sample(
        self,
        cond_image: torch.Tensor,
        c2w: torch.Tensor,
        K: torch.Tensor,
        num_steps: int | None = None,
        feedback_every: int = 1,
        guidance: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        use_feedback: bool = True,
        callback: Callable | None = None,
    ) -> SampleOutput:
        """Algorithm 2: recursive 3D-aware sampling (Euler on the Karras schedule), that is
        :func:`model.sampling.sample_euler` of a :class:`model.sampling.RecursiveDenoiser`.

        The feedback starts at 0; after every ``feedback_every``-th step the predicted x0 is
        decoded, reconstructed by LGM at c_noise(s), rendered at the V cameras and fed to the
        next steps. The last step's reconstruction (at c_noise(sigma_min)) is the output 3D.

        Args:
            cond_image: [B, 3, H, W] in [0, 1].  c2w: [B, V, 4, 4] model frame, view 0 the
            condition view.  K: [B, V, 3, 3] pixels at H.  num_steps: default the config's
            (``edm.num_steps``, 25).  guidance: per-frame (min, max) CFG scales (default: the
            config's, SVD's 1.0 -> 3.0); max <= 1 switches CFG off.
            use_feedback: False runs a feedback model with zero feedback at every step and
            reconstructs only at the end (the two-stage baseline on the same weights).
            callback: ``callback(step=, sigma=, x=, denoised=, gaussians=, renders=)`` after
            every step (``progress`` adds a progress bar beside it).
        """
        cfg = self.config
        num_steps = num_steps or cfg.edm.num_steps
        denoiser = RecursiveDenoiser(self, cond_image, c2w, K, num_steps, feedback_every, guidance, generator,
                                     use_feedback)
        sigmas = edm.karras_sigmas(num_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho).to(cond_image.device)
        shape = (c2w.shape[0], c2w.shape[1], self.vae.config.latent_channels, self.latent_size, self.latent_size)
        x = randn_tensor(shape, generator=generator, device=cond_image.device, dtype=torch.float32)
        x = x * edm.initial_noise_scale(cfg.edm.sigma_max)
        with tqdm(total=num_steps, desc="sampling", disable=not progress) as bar:
            def step_done(**state) -> None:
                bar.update(1)
                if callback is not None:
                    callback(**state)

            sample_euler(denoiser, x, sigmas, step_done)
        # the last step goes to sigma = 0, so x equals its x0 prediction: the decoded views
        return SampleOutput(views=denoiser.views, gaussians=denoiser.gaussians, renders=denoiser.renders)
