"""Eq. 2's LPIPS term (model/lgm/loss.py) against the lpips package's own [0, 1] input handling."""

import torch

from model.lgm.loss import lpips_distance, lpips_network


def test_lpips_distance_feeds_the_network_images_in_minus_one_to_one():
    """``lpips.LPIPS(..., normalize=True)`` is the package's own way to take [0, 1] images (it
    maps them to [-1, 1]); ``lpips_distance`` must agree with it. The backbone may be random
    here (no VGG weights cached): the comparison is of the same network on the same input.
    Kills: the [0, 1] -> [-1, 1] scaling dropped or applied twice."""
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ours = lpips_distance(pred, target)
        reference = lpips_network("cpu")(pred, target, normalize=True).mean()
        unscaled = lpips_network("cpu")(pred, target).mean()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(reference, unscaled, rtol=1e-3)  # the scaling matters on these images
