"""The multi-view denoiser F_theta: SVD's UNet with camera rays and 3D-aware feedback (Sec. 3.1, 3.3).

:class:`MultiViewUNet` reuses every module of diffusers' ``UNetSpatioTemporalConditionModel``
and re-states its ``forward`` (diffusers 0.42) with two additions:

1. camera: the per-pixel Plucker embedding (:mod:`model.camera_embedding`) is added to the
   output of ``conv_in``. That is the first place where the features have the UNet's width
   at the latent resolution, and it reaches every later layer, including the first skip
   connection; with the zero-initialised last layer the sum is exactly the pretrained UNet.
2. feedback: the adapters' features at the four encoder scales (Eq. 14) are added to the
   output of each down block's last layer, before its downsampler, as diffusers' T2I-Adapter
   integration does (``down_intrablock_additional_residuals``). The sum therefore flows both
   down the encoder and into that scale's last skip connection.

With ``feedback=None`` the adapters are not run and the forward is the plain UNet's.
"""

from __future__ import annotations

import torch
from diffusers import T2IAdapter, UNetSpatioTemporalConditionModel
from torch import nn

from model.camera_embedding import CameraEmbedding
from model.feedback_adapter import feedback_features


def _run_resnet(block: nn.Module, resnet: nn.Module, hidden, temb, indicator):
    """One resnet of a spatio-temporal block, checkpointed when the block asks for it."""
    if torch.is_grad_enabled() and block.gradient_checkpointing:
        return block._gradient_checkpointing_func(resnet, hidden, temb, indicator)
    return resnet(hidden, temb, image_only_indicator=indicator)


def down_block_forward(
    block: nn.Module,
    hidden: torch.Tensor,
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    indicator: torch.Tensor,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(CrossAttn)DownBlockSpatioTemporal.forward`` with ``residual`` added after its last layer.

    Args:
        hidden: [B*F, C_in, h, w].  residual: [B*F, C_out, h, w] feedback features or None.
    Returns:
        (hidden after the downsampler, the skip connections), as diffusers' block returns them.
    """
    outputs = ()
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    last = len(block.resnets) - 1
    for i, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
        hidden = _run_resnet(block, resnet, hidden, temb, indicator)
        if attn is not None:
            hidden = attn(
                hidden, encoder_hidden_states=encoder_hidden_states, image_only_indicator=indicator, return_dict=False
            )[0]
        if i == last and residual is not None:
            hidden = hidden + residual  # Eq. 14: F_enc^i + F_p^i + F_t^i
        outputs = outputs + (hidden,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            hidden = downsampler(hidden)
        outputs = outputs + (hidden,)
    return hidden, outputs


class MultiViewUNet(nn.Module):
    """F_theta(c_in x; c_noise, cond image, camera, feedback) (Sec. 3.1, 3.3).

    Args:
        unet: diffusers ``UNetSpatioTemporalConditionModel`` (SVD's, possibly pretrained).
        camera: :class:`CameraEmbedding` with ``out_channels == unet.config.block_out_channels[0]``.
        ccm_adapter, rgb_adapter: feedback adapters F^0 and F^1, or None (no feedback / CCM only).
    """

    def __init__(
        self,
        unet: UNetSpatioTemporalConditionModel,
        camera: CameraEmbedding,
        ccm_adapter: T2IAdapter | None = None,
        rgb_adapter: T2IAdapter | None = None,
    ):
        super().__init__()
        if rgb_adapter is not None and ccm_adapter is None:
            raise ValueError("an RGB feedback adapter needs the CCM adapter (feedback 'ccm_rgb')")
        self.unet = unet
        self.camera = camera
        self.ccm_adapter = ccm_adapter
        self.rgb_adapter = rgb_adapter

    @property
    def has_feedback(self) -> bool:
        return self.ccm_adapter is not None

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's resnets (diffusers' own switch, honoured by this forward)."""
        self.unet.enable_gradient_checkpointing()

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        plucker: torch.Tensor | None = None,
        feedback: dict | None = None,
    ) -> torch.Tensor:
        """Mirror of diffusers' ``UNetSpatioTemporalConditionModel.forward`` plus camera and feedback.

        Args:
            sample: [B, F, C_in, h, w] (scaled noisy latents concatenated with the image latents).
            timestep: [B] or scalar, c_noise(sigma).
            encoder_hidden_states: [B, 1, D] CLIP image embedding.
            added_time_ids: [B, 3] (fps, motion bucket, noise augmentation).
            plucker: [B, F, 6, h, w] latent-pixel rays, or None (no camera term).
            feedback: None, or dict(ccm=[B, F, 3, 8h, 8w], rgb=[B, F, 3, 8h, 8w] or None) renders
                in [0, 1] (zeros when the 3D feedback is switched off for this step).
        Returns:
            F_theta output [B, F, C_out, h, w].
        """
        unet = self.unet
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        upsample_size = None

        # 1. time
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        batch_size, num_frames = sample.shape[:2]
        timesteps = timesteps.expand(batch_size)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch_size, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        sample = sample.flatten(0, 1)
        emb = emb.repeat_interleave(num_frames, dim=0)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)

        # 2. pre-process, + camera embedding (Sec. 3.1)
        sample = unet.conv_in(sample)
        if plucker is not None:
            sample = sample + self.camera(plucker.flatten(0, 1).to(sample.dtype))
        indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        # 3. down, + feedback features at each scale (Eqs. 12-14)
        residuals = [None] * len(unet.down_blocks)
        if feedback is not None:
            if not self.has_feedback:
                raise ValueError("feedback given to a MultiViewUNet built without feedback adapters")
            rgb = feedback.get("rgb")
            residuals = feedback_features(
                self.ccm_adapter,
                self.rgb_adapter,
                feedback["ccm"].flatten(0, 1).to(sample.dtype),
                None if self.rgb_adapter is None else rgb.flatten(0, 1).to(sample.dtype),
            )
            if len(residuals) != len(unet.down_blocks):
                raise ValueError(f"{len(residuals)} adapter scales for {len(unet.down_blocks)} UNet down blocks")
        down_block_res_samples = (sample,)
        for block, residual in zip(unet.down_blocks, residuals):
            sample, res_samples = down_block_forward(
                block, sample, emb, encoder_hidden_states, indicator, residual
            )
            down_block_res_samples += res_samples

        # 4. mid
        sample = unet.mid_block(
            hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states, image_only_indicator=indicator
        )

        # 5. up
        for i, block in enumerate(unet.up_blocks):
            res_samples = down_block_res_samples[-len(block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
            if i < len(unet.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            kwargs = dict(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res_samples,
                upsample_size=upsample_size,
                image_only_indicator=indicator,
            )
            if getattr(block, "has_cross_attention", False):
                kwargs["encoder_hidden_states"] = encoder_hidden_states
            sample = block(**kwargs)

        # 6. post-process
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        return sample.reshape(batch_size, num_frames, *sample.shape[1:])
