"""LGM's input tensor from posed views (3DTopia/LGM ``core/provider_objaverse.py``): images
resized (bilinear) to the input size and ImageNet-normalised, concatenated with the Plücker
rays of each view expressed in LGM's frame of the first view: 3 + 6 = 9 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.cameras import geometry_dtype, model_to_lgm_c2w, plucker_rays, scale_intrinsics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_inputs(images: torch.Tensor, c2w_model: torch.Tensor, K: torch.Tensor, size: int) -> torch.Tensor:
    """Build LGM's 9-channel input for 4 views.

    Args:
        images: [B, V, 3, H, W] RGB in [0, 1] over LGM's white background, square.
        c2w_model: [B, V, 4, 4] OpenCV camera-to-world in the MODEL frame; view 0 defines LGM's
            frame (``cameras.model_to_lgm_c2w``), as LGM's first input view does.
        K: [B, V, 3, 3] in pixels of the H x W images.
        size: LGM's input resolution (256 for the official models).
    Returns:
        [B, V, 9, size, size] float32 (float64 for float64 inputs): normalised RGB, then
        ``(o x d, d)`` in LGM's frame. Resize, normalisation and camera maths run in float32
        whatever the images' dtype; the caller casts the result to LGM's dtype.
    """
    B, V, C, H, W = images.shape
    if C != 3 or H != W:
        raise ValueError(f"images: expected square RGB [B, V, 3, H, H], got {tuple(images.shape)}")
    if c2w_model.shape != (B, V, 4, 4) or K.shape != (B, V, 3, 3):
        raise ValueError(f"cameras: expected c2w [{B}, {V}, 4, 4] and K [{B}, {V}, 3, 3], "
                         f"got {tuple(c2w_model.shape)} and {tuple(K.shape)}")  # fmt: skip
    dtype = geometry_dtype(images.dtype)
    rgb = F.interpolate(
        images.reshape(B * V, 3, H, W).to(dtype), size=(size, size), mode="bilinear", align_corners=False
    )
    mean = rgb.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = rgb.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((rgb - mean) / std).reshape(B, V, 3, size, size)
    c2w = model_to_lgm_c2w(c2w_model.to(dtype), c2w_model[:, 0].to(dtype))
    rays = plucker_rays(c2w, scale_intrinsics(K.to(dtype), H, size), size, size)
    return torch.cat([rgb, rays], 2)
