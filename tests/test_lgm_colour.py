"""tools/lgm_colour.py: the colour-follow measure on renders whose answer is known."""

import math

import torch

from tools.lgm_colour import colour_follow, rotate_object_colours


def _views(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.ones(8, 3, 16, 16)
    alphas = torch.zeros(8, 1, 16, 16)
    alphas[..., 4:12, 4:12] = 1
    images[..., 4:12, 4:12] = torch.rand(8, 3, 1, 1, generator=g) * torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
    return images, alphas


def test_rotation_changes_only_the_object():
    images, alphas = _views()
    rotated = rotate_object_colours(images, alphas)
    assert torch.equal(rotated[..., :4, :], images[..., :4, :])  # background kept
    assert torch.equal(rotated[:, 1, 4:12, 4:12], images[:, 0, 4:12, 4:12])  # R moved to G
    assert torch.equal(rotated[:, 0, 4:12, 4:12], images[:, 2, 4:12, 4:12])  # B moved to R


def test_follow_is_one_for_copied_colours_zero_for_fixed_ones_and_between_for_a_mix():
    images, alphas = _views()
    rotated = rotate_object_colours(images, alphas)
    mask = alphas
    assert math.isclose(colour_follow(images, rotated, images, rotated, mask), 1.0, rel_tol=1e-5)
    fixed = torch.full_like(images, 0.4)  # the same paint whatever the input
    assert colour_follow(fixed, fixed, images, rotated, mask) == 0.0
    half = 0.5 * images + 0.5 * fixed, 0.5 * rotated + 0.5 * fixed
    assert math.isclose(colour_follow(*half, images, rotated, mask), 0.5, rel_tol=1e-5)
    grey = torch.full_like(images, 0.5)
    assert math.isnan(colour_follow(grey, grey, grey, rotate_object_colours(grey, alphas), mask))


def test_pixel_offsets_are_zero_on_the_rays_and_measure_a_shift():
    """Gaussians put on their pixels' rays (at any depth) project onto their pixels: offset 0;
    the same shifted sideways by a known amount in each camera's frame: that many pixels."""
    from common import conventions as C

    from tools.lgm_colour import pixel_offsets

    res, s = 64, 16
    c2w = torch.tensor(C.orbit_c2w(20.0, [0.0, 90.0, 180.0, 270.0])).float()
    K = torch.tensor(C.intrinsics(39.6, res)).float().expand(4, 3, 3)
    ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    pix = (torch.stack([jj, ii, torch.ones_like(ii)], -1).reshape(-1, 3).float() + torch.tensor([0.5, 0.5, 0.0])) \
        * torch.tensor([res / s, res / s, 1.0])
    depth = 1.5 + torch.rand(4, s * s, 1)
    cam = (pix @ torch.linalg.inv(K[0]).T)[None] * depth  # [4, s*s, 3], OpenCV camera frame
    shift = torch.tensor([0.02, 0.0, 0.0])
    for offset, expected in ((torch.zeros(3), 0.0), (shift, None)):
        world = (cam + offset) @ c2w[:, :3, :3].transpose(1, 2) + c2w[:, None, :3, 3]
        g = torch.zeros(4, s * s, 14)
        g[..., 0:3], g[..., 3] = world, 1.0
        d = pixel_offsets(g.reshape(-1, 14), c2w, K, res)
        assert d.numel() == 4 * s * s
        if expected == 0.0:
            assert float(d.max()) < 1e-3
        else:  # a sideways shift of 0.02 at depth z moves the projection by fx * 0.02 / z pixels
            torch.testing.assert_close(d, (K[0, 0, 0] * 0.02 / depth.reshape(-1)), rtol=1e-4, atol=1e-4)
    g[..., 3] = 0.0  # transparent Gaussians are not counted
    assert pixel_offsets(g.reshape(-1, 14), c2w, K, res).numel() == 0
