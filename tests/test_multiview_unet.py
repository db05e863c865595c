"""Multi-view UNet (model/multiview_unet.py), camera MLP and feedback adapters."""

import pytest
import torch

from model.camera_embedding import CameraEmbedding, latent_plucker_rays
from model.config import preset
from model.feedback_adapter import build_adapter
from model.multiview_unet import MultiViewUNet
from model.svd import build_svd_components
from tiny_helpers import as_trained

B, F, LATENT = 1, 8, 8


def _inputs(gen):
    sample = torch.randn(B, F, 8, LATENT, LATENT, generator=gen)
    t = torch.tensor([0.3])
    ehs = torch.randn(B, 1, 32, generator=gen)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    plucker = torch.randn(B, F, 6, LATENT, LATENT, generator=gen)
    return sample, t, ehs, ids, plucker


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    cfg = preset("tiny")
    unet = build_svd_components(cfg).unet.eval()
    camera = CameraEmbedding(out_channels=cfg.unet["block_out_channels"][0], hidden_channels=16)
    # adapters as after training: fresh ones output zero, which would make the feedback tests void
    return MultiViewUNet(unet, camera, as_trained(build_adapter(cfg)), as_trained(build_adapter(cfg))).eval()


@torch.no_grad()
def test_no_feedback_zero_camera_equals_plain_unet(net):
    sample, t, ehs, ids, plucker = _inputs(torch.Generator().manual_seed(1))
    ref = net.unet(sample, t, ehs, ids).sample
    torch.testing.assert_close(net(sample, t, ehs, ids), ref, rtol=0, atol=0)
    # zero-initialised camera MLP: rays change nothing yet
    torch.testing.assert_close(net(sample, t, ehs, ids, plucker=plucker), ref, rtol=0, atol=0)


@torch.no_grad()
def test_camera_and_feedback_change_the_output(net):
    sample, t, ehs, ids, plucker = _inputs(torch.Generator().manual_seed(2))
    ref = net(sample, t, ehs, ids)
    camera = CameraEmbedding(out_channels=32, hidden_channels=16)
    torch.nn.init.normal_(camera.mlp[-1].weight)
    moved = MultiViewUNet(net.unet, camera).eval()
    assert not torch.allclose(moved(sample, t, ehs, ids, plucker=plucker), ref)
    maps = dict(ccm=torch.rand(B, F, 3, 64, 64), rgb=torch.rand(B, F, 3, 64, 64))
    assert not torch.allclose(net(sample, t, ehs, ids, feedback=maps), ref)


@torch.no_grad()
def test_feedback_is_added_before_downsampling(net):
    """Reference for Eq. 14: hook the adapter features onto each down block's last layer output
    in the plain diffusers forward; the result must equal ours."""
    sample, t, ehs, ids, _ = _inputs(torch.Generator().manual_seed(3))
    maps = dict(ccm=torch.rand(B, F, 3, 64, 64), rgb=torch.rand(B, F, 3, 64, 64))
    feats = [a + b for a, b in zip(net.ccm_adapter(maps["ccm"].flatten(0, 1)), net.rgb_adapter(maps["rgb"].flatten(0, 1)))]
    hooks = []
    for block, feat in zip(net.unet.down_blocks, feats):
        last = block.attentions[-1] if hasattr(block, "attentions") else block.resnets[-1]

        def hook(module, args, output, feat=feat):
            if isinstance(output, tuple):
                return (output[0] + feat, *output[1:])
            if hasattr(output, "sample"):
                output.sample = output.sample + feat
                return output
            return output + feat

        hooks.append(last.register_forward_hook(hook))
    try:
        ref = net.unet(sample, t, ehs, ids).sample
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(net(sample, t, ehs, ids, feedback=maps), ref, rtol=1e-5, atol=1e-5)


def test_adapter_scales_match_table3_layout():
    cfg = preset("tiny")
    feats = build_adapter(cfg)(torch.zeros(2, 3, cfg.resolution, cfg.resolution))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 8, 8), (64, 4, 4), (64, 2, 2), (64, 1, 1)]


def test_latent_plucker_rays_use_scaled_intrinsics():
    from common.conventions import intrinsics, orbit_c2w

    c2w = torch.tensor(orbit_c2w(10.0, [0.0, 45.0]), dtype=torch.float32)[None]
    K = torch.tensor(intrinsics(39.6, 64), dtype=torch.float32).expand(1, 2, 3, 3)
    rays = latent_plucker_rays(c2w, K, image_size=64, latent_size=8)
    assert rays.shape == (1, 2, 6, 8, 8)
    d = rays[0, 0, 3:]
    # the centre of the 8x8 latent grid looks along the optical axis (towards the origin)
    centre = d[:, 3:5, 3:5].mean((1, 2))
    forward = c2w[0, 0, :3, 2]
    assert torch.nn.functional.cosine_similarity(centre, forward, dim=0) > 0.99


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(4)
    cfg = preset("tiny")
    unet = build_svd_components(cfg).unet
    camera = CameraEmbedding(32, 16)
    torch.nn.init.normal_(camera.mlp[-1].weight, std=0.1)
    net = MultiViewUNet(unet, camera, build_adapter(cfg))
    sample, t, ehs, ids, plucker = _inputs(torch.Generator().manual_seed(5))
    maps = dict(ccm=torch.rand(B, F, 3, 64, 64), rgb=None)

    def grads():
        net.zero_grad()
        net(sample, t, ehs, ids, plucker=plucker, feedback=maps).square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain = grads()
    net.enable_gradient_checkpointing()
    assert net.unet.is_gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
