"""SVD layout round trip (model/svd.py): save tiny parts in the hub layout, load them back."""

import json

import pytest
import torch

from model.config import preset
from model.svd import SUBFOLDERS, build_svd_components, load_svd_components, save_svd_components


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    return build_svd_components(preset("tiny"))


def test_round_trip_fp32(tiny_parts, tmp_path):
    save_svd_components(tiny_parts, tmp_path)
    for sub in (*SUBFOLDERS, "scheduler"):
        assert (tmp_path / sub).is_dir()
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableVideoDiffusionPipeline"
    loaded = load_svd_components(tmp_path)
    for name in ("unet", "vae", "image_encoder"):
        ref, got = _state(getattr(tiny_parts, name)), _state(getattr(loaded, name))
        assert ref.keys() == got.keys()
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=f"{name}.{key}")
    assert loaded.feature_extractor.crop_size == tiny_parts.feature_extractor.crop_size


def test_round_trip_fp16_variant(tiny_parts, tmp_path):
    half = build_svd_components(preset("tiny"))
    for name in ("unet", "vae", "image_encoder"):
        getattr(half, name).load_state_dict(getattr(tiny_parts, name).state_dict())
        getattr(half, name).half()
    save_svd_components(half, tmp_path, variant="fp16")
    assert list((tmp_path / "unet").glob("*.fp16.safetensors"))
    loaded = load_svd_components(tmp_path, variant="fp16", dtype=torch.float16)
    assert next(loaded.unet.parameters()).dtype == torch.float16
    ref = tiny_parts.unet.state_dict()
    for key, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value.float(), ref[key].half().float(), rtol=0, atol=0, msg=key)
    with pytest.raises(OSError, match="unet"):  # no plain (non-variant) weights were written
        load_svd_components(tmp_path)


def test_missing_subfolder_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="vae"):
        load_svd_components(tmp_path)
