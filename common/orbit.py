"""The one orbit type, from the renderer to the training batch (docs/interfaces.md, "Values from
shard to network")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import conventions as C


@dataclass
class OrbitRender:
    """One orbit of one object as arrays: what :func:`render_object` returns, what a shard sample
    encodes (``shards.encode_sample``) and decodes to (``shards.decode_sample``), and what the
    training loader and the benchmark turn into model views (``common.training_views.to_training_views``).
    F = 16 frames unless fewer were rendered (``RenderSettings.frames``) or decoded."""

    key: str  # <uid>_o<k> (conventions.sample_key)
    rgba: np.ndarray  # uint8 [F, H, W, 4], straight alpha
    ccm: np.ndarray | None  # float32 [F, H, W, 3] in [0, 1], 0 where alpha == 0; None: not decoded
    c2w: np.ndarray  # float32 [F, 4, 4] OpenCV axes, world = normalised object frame
    K: np.ndarray  # float32 [F, 3, 3] pixels
    meta: dict  # the sample's <key>.json (docs/design.md section 3)

    @property
    def orbit(self) -> int:
        return C.key_orbit(self.key)
