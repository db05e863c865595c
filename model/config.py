"""Configuration of the Ouroboros3D model: one dataclass, two presets (``tiny``, ``full``).

``full`` is the paper's model (section 3, 4.1, appendix A): the SVD img2vid components
(diffusers' default ``UNetSpatioTemporalConditionModel`` and ``AutoencoderKLTemporalDecoder``
configs, CLIP ViT-H/14 image encoder with a 1024-d projection), LGM ``big``, 512 px, 8 views.
``tiny`` has the same structure with a few million parameters, for CPU tests and demos.

Table 2's ablations are two switches: ``joint_training`` (LGM fine-tuned with Eq. 2 inside
the training step) and ``feedback`` (``"none"``, ``"ccm"`` or ``"ccm_rgb"``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write_text
from model import edm

FEEDBACK_MODES = ("none", "ccm", "ccm_rgb")

# OpenAI CLIP normalisation, as in SVD's feature_extractor/preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class EDMConfig:
    """Appendix A.1 and SVD's scheduler_config.json."""

    p_mean: float = edm.P_MEAN
    p_std: float = edm.P_STD
    sigma_min: float = edm.SIGMA_MIN
    sigma_max: float = edm.SIGMA_MAX
    rho: float = edm.RHO
    num_steps: int = 25


@dataclass
class ConditioningConfig:
    """SVD's image conditioning (StableVideoDiffusionPipeline defaults) and CFG settings.

    ``fps`` is the value fed to the UNet (the pipeline feeds ``fps - 1``, 7 - 1 = 6).
    ``cond_drop_prob``: InstructPix2Pix-style dropout for classifier-free guidance: with
    probability p each the CLIP embedding alone, the image latent alone, or both are dropped.
    """

    fps: int = 6
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    cond_drop_prob: float = 0.05
    min_guidance: float = 1.0
    max_guidance: float = 3.0


@dataclass
class OuroborosConfig:
    """Everything needed to build an :class:`model.ouroboros.Ouroboros3D`.

    Component configs (``unet``, ``vae``, ``image_encoder``, ``feature_extractor``) are keyword
    arguments of the diffusers / transformers classes; ignored when ``svd_path`` is set (the
    pretrained components bring their own, and a built model's config records those:
    ``model.svd.component_configs``).
    """

    name: str
    resolution: int
    num_views: int = 8
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    image_encoder: dict = field(default_factory=dict)
    feature_extractor: dict = field(default_factory=dict)
    camera_hidden_channels: int = 320
    adapter_channels: tuple = (320, 640, 1280, 1280)
    adapter_res_blocks: int = 3
    lgm_preset: str = "big"
    lgm_resolution: int = 256
    lgm_input_views: tuple = (0, 2, 4, 6)
    feedback: str = "ccm_rgb"
    joint_training: bool = True
    self_cond_prob: float = 0.5
    lpips_weight: float = 1.0
    allow_random_lpips: bool = False  # train Eq. 2 against a RANDOM VGG trunk when the real one is missing
    clean_recon_pass: bool = True
    background: float = 1.0
    edm: EDMConfig = field(default_factory=EDMConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    svd_path: str | None = None
    svd_variant: str | None = None
    lgm_path: str | None = None

    def __post_init__(self):
        if isinstance(self.edm, dict):
            self.edm = EDMConfig(**self.edm)
        if isinstance(self.conditioning, dict):
            self.conditioning = ConditioningConfig(**self.conditioning)
        self.adapter_channels = tuple(self.adapter_channels)
        self.lgm_input_views = tuple(self.lgm_input_views)
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback must be one of {FEEDBACK_MODES}, got {self.feedback!r}")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE's factor 8")
        if any(v >= self.num_views for v in self.lgm_input_views):
            raise ValueError(f"lgm_input_views {self.lgm_input_views} outside 0..{self.num_views - 1}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob {self.self_cond_prob} not in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OuroborosConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Ouroboros3D config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON atomically (temp + rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "OuroborosConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read an Ouroboros3D config ({err})") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def _full() -> OuroborosConfig:
    return OuroborosConfig(
        name="full",
        resolution=512,
        unet={},  # diffusers' defaults = SVD img2vid's UNet (1.52B parameters)
        vae=dict(  # SVD img2vid's vae/config.json
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
            scaling_factor=0.18215,
        ),
        image_encoder=dict(  # CLIP ViT-H/14 vision tower with a 1024-d projection
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
            hidden_act="gelu",
        ),
        feature_extractor=dict(
            size={"shortest_edge": 224},
            crop_size={"height": 224, "width": 224},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        camera_hidden_channels=320,
        adapter_channels=(320, 640, 1280, 1280),
        lgm_preset="big",
        lgm_resolution=256,
    )


def _tiny() -> OuroborosConfig:
    channels = (32, 64, 64, 64)
    return OuroborosConfig(
        name="tiny",
        resolution=64,
        unet=dict(
            block_out_channels=channels,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24,
            layers_per_block=1,
            cross_attention_dim=32,
            num_attention_heads=(2, 4, 4, 4),
            num_frames=8,
        ),
        vae=dict(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
        ),
        image_encoder=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            image_size=32,
            projection_dim=32,
            hidden_act="gelu",
        ),
        feature_extractor=dict(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        camera_hidden_channels=32,
        adapter_channels=channels,
        lgm_preset="tiny",
        lgm_resolution=32,
    )


PRESETS = {"tiny": _tiny, "full": _full}


def with_latent_channels(config: OuroborosConfig, channels: int) -> OuroborosConfig:
    """``config`` with a ``channels``-channel latent: the autoencoder's ``latent_channels``, the
    UNet's ``out_channels`` (the denoised latent) and ``in_channels`` (SVD concatenates the noisy
    latent and the conditioning image's latent: twice as many)."""
    if channels < 1:
        raise ValueError(f"latent channels must be positive, got {channels}")
    return dataclasses.replace(config, vae={**config.vae, "latent_channels": channels},
                               unet={**config.unet, "in_channels": 2 * channels, "out_channels": channels})


def preset(name: str, **overrides) -> OuroborosConfig:
    """A fresh preset config, ``"tiny"`` or ``"full"``, with keyword overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)
