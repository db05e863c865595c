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
