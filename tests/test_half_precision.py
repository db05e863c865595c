"""Half precision (issue 9, section 1): Algorithm 1 and 2 with the model's weights in bf16 / fp16
the way DeepSpeed's fp16 / bf16 engines cast them (the whole module), on the CPU.

Geometry stays float32 (cameras, inverses, Plücker rays, Gaussians, resizes); only network
inputs are cast. The DeepSpeed launcher run in bf16 is in tests/test_trainer.py.
"""

import numpy as np
import pytest
import torch

from common.conventions import DEFAULT_FOV_DEG, intrinsics, orbit_c2w
from model.config import preset
from model.lgm import prepare_inputs
from model.ouroboros import Ouroboros3D

# 4 views keep the torch rasterizer fast on 2 cores. Not 32 px (as tests/test_algorithms.py):
# the UNet's last downsampler would then see 1x1 features, where PyTorch's CPU bf16 convolution
# backward (torch 2.14) returns garbage weight gradients (seen: 5e34 vs 6.4 in fp32).
RES, V = 64, 4
SMALL = dict(resolution=RES, num_views=V, lgm_input_views=(0, 1, 2, 3), self_cond_prob=1.0)


def _cameras():
    c2w = torch.tensor(orbit_c2w(10.0, np.arange(V) * 360.0 / V), dtype=torch.float32)[None]
    K = torch.tensor(intrinsics(DEFAULT_FOV_DEG, RES), dtype=torch.float32).expand(1, V, 3, 3).clone()
    return c2w, K


def _batch(dtype=torch.float32):
    """Views in ``dtype`` (cameras always float32): the model must not rely on its caller keeping
    the images float32 (the trainer used to cast them to the weights' dtype)."""
    gen = torch.Generator().manual_seed(0)
    c2w, K = _cameras()
    alphas = (torch.rand(1, V, 1, RES, RES, generator=gen) > 0.5).float()
    images = torch.rand(1, V, 3, RES, RES, generator=gen) * alphas + (1 - alphas)
    ccm = torch.rand(1, V, 3, RES, RES, generator=gen) * alphas
    return dict(images=images.to(dtype), alphas=alphas.to(dtype), ccm=ccm.to(dtype), c2w=c2w, K=K,
                key=["obj_o0"])


def _half_model(dtype):
    torch.manual_seed(0)
    return Ouroboros3D.from_config(preset("tiny", **SMALL)).to(dtype)  # as DeepSpeed casts the module


@pytest.mark.parametrize(
    "dtype, views_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["bf16", "fp16", "bf16-with-bf16-views"],
)
def test_algorithm1_step_runs_in_half_precision(dtype, views_dtype):
    """Feedback adapters, joint LGM, the clean pass and self-conditioning (prob 1), all in ``dtype``:
    finite losses and finite gradients in every trainable part, weights still in ``dtype``."""
    model = _half_model(dtype).train()
    out = model.training_losses(_batch(views_dtype), generator=torch.Generator().manual_seed(3))
    assert out["self_cond_used"]
    for name in ("loss", "loss_diffusion", "loss_recon_mse"):
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]), (name, out[name])
    assert float(out["loss_recon_mse"]) > 0
    out["loss"].backward()
    parts = dict(unet=model.denoiser.unet, camera=model.denoiser.camera, ccm=model.denoiser.ccm_adapter,
                 rgb=model.denoiser.rgb_adapter, lgm=model.lgm)
    for name, part in parts.items():
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads, f"{name}: no gradient"
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), f"{name}: all gradients zero"
    assert model.vae.dtype == dtype  # restored after the float32 encodes


def test_sample_runs_with_the_model_in_bf16():
    model = _half_model(torch.bfloat16).eval()
    c2w, K = _cameras()
    cond = _batch()["images"][:, 0]
    out = model.sample(cond, c2w, K, num_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.views.shape == (1, V, 3, RES, RES) and out.views.dtype == torch.float32
    assert out.gaussians.dtype == torch.float32 and torch.isfinite(out.gaussians).all()
    assert torch.isfinite(out.views).all() and torch.isfinite(out.renders["rgb"]).all()


def test_lgm_inputs_keep_float32_geometry_for_half_images():
    """The Plücker channels from bf16 images equal the float32 ones exactly (they are computed from
    the float32 cameras); the RGB channels differ only by the bf16 rounding of the pixels."""
    c2w, K = _cameras()
    images = torch.rand(1, V, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    half = images.to(torch.bfloat16)
    got = prepare_inputs(half, c2w, K, 16)
    want = prepare_inputs(half.float(), c2w, K, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and bf16 cameras would have lost the rays' precision: the float32 path is what we compare to
    bf16_rays = prepare_inputs(half.float(), c2w.to(torch.bfloat16).float(), K, 16)[:, :, 3:]
    assert (bf16_rays - want[:, :, 3:]).abs().max() > 1e-4


@pytest.mark.parametrize("force_upcast", [True, False])
def test_vae_encodes_in_float32_when_its_config_forces_it(force_upcast):
    model = _half_model(torch.bfloat16)
    model.vae.register_to_config(force_upcast=force_upcast)
    seen = []
    hook = model.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    try:
        latents = model.encode_views(_batch()["images"], torch.Generator().manual_seed(0))
        model.encode_condition(_batch()["images"][:, 0], torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    want = torch.float32 if force_upcast else torch.bfloat16
    assert seen == [want, want]
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    assert model.vae.dtype == torch.bfloat16
