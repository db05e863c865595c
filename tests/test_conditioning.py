"""SVD's image conditioning (model/conditioning.py) against transformers' own CLIP preprocessing."""

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from model.conditioning import clip_image_embedding
from model.config import CLIP_MEAN, CLIP_STD


def test_clip_input_is_what_clips_own_processor_makes_of_the_image():
    """The condition image in [0, 1], already at the encoder's size (so no resize is involved),
    must reach CLIP exactly as ``CLIPImageProcessor`` prepares the same picture.
    Kills: a [-1, 1] -> [0, 1] mapping applied to it, mean/std swapped or not applied."""
    size = 32
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, patch_size=8,
        image_size=size, projection_dim=16)).eval()  # fmt: skip
    seen = []
    real_forward = encoder.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["pixel_values"])
        return real_forward(*args, **kwargs)

    encoder.forward = spy
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = clip_image_embedding(encoder, processor, image)
    assert out.shape == (2, 1, 16)
    pictures = [im.permute(1, 2, 0).numpy() for im in image]  # HWC in [0, 1]
    reference = processor(images=pictures, do_resize=False, do_center_crop=False, do_rescale=False,
                          return_tensors="np")["pixel_values"]  # fmt: skip
    np.testing.assert_allclose(seen[0].numpy(), reference, atol=1e-5)
