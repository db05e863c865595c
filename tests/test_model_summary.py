"""Parameter counts of the presets, built on the meta device (model/__main__.py)."""

import pytest

from model.__main__ import build_on_meta, main, parameter_counts
from model.lgm.time_embedding import is_time_embedding_key


def table3_adapter_parameters(channels=(320, 640, 1280, 1280), blocks=3, unshuffled=192) -> int:
    """Independent count of one Table 3 adapter: 3x3 conv 192 -> 320, then per scale a 1x1
    conv where channels change and ``blocks`` residual blocks (3x3 conv + 1x1 conv, biases)."""
    total = unshuffled * channels[0] * 9 + channels[0]
    prev = channels[0]
    for c in channels:
        if c != prev:
            total += prev * c + c
        total += blocks * (c * c * 9 + c + c * c + c)
        prev = c
    return total


@pytest.fixture(scope="module")
def full_model():
    model = build_on_meta("full")
    assert all(p.is_meta for p in model.parameters())
    return model


@pytest.fixture(scope="module")
def full_counts(full_model):
    return parameter_counts(full_model)


def test_full_preset_counts(full_counts):
    c = full_counts
    assert c["unet"] == 1_524_623_082  # SVD img2vid UNet, ~1.52 B
    assert c["lgm"] > 415_042_848  # LGM big plus its new time embedding
    adapters = c["ccm_adapter"] + c["rgb_adapter"]
    assert c["ccm_adapter"] == c["rgb_adapter"] == table3_adapter_parameters()
    assert adapters == pytest.approx(0.23e9, rel=0.01)  # "two adapters together about 0.23 B"
    assert c["image_encoder"] == 632_076_800  # CLIP ViT-H/14 vision tower + 1024-d projection
    assert c["vae"] == pytest.approx(97.7e6, rel=0.002)
    assert c["camera_embedding"] == 6 * 320 + 320 + 320 * 320 + 320
    frozen = c["vae"] + c["image_encoder"]
    assert c["trainable"] == c["total"] - frozen


def test_lgm_big_official_part(full_model):
    """Without the new zero-initialised time embedding, LGM big has the official 415,042,848."""
    official = sum(p.numel() for n, p in full_model.lgm.named_parameters() if not is_time_embedding_key(n))
    assert official == 415_042_848


def test_tiny_preset_is_small_and_cli_prints(capsys):
    assert main(["summary", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "lgm" in out and "trainable" in out
    counts = parameter_counts(build_on_meta("tiny"))
    assert 1e6 < counts["total"] < 10e6
    no_fb = parameter_counts(build_on_meta("tiny", feedback="none"))
    assert no_fb["ccm_adapter"] == no_fb["rgb_adapter"] == 0
