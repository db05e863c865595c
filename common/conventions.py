"""The project's conventions (docs/design.md sections 2 and 3): defined here once, imported everywhere.

Numpy only, so that render workers can use it without importing torch.

World
    Objects are normalised so that their axis-aligned bounding box is centred at the origin
    and its longest side is 1 (``[-0.5, 0.5]^3``); +Z is up.
Cameras
    ``c2w``: 4x4 camera-to-world with **OpenCV** axes (x right, y down, z forward).
    ``K = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]`` in pixels; pixel ``(row v, column u)`` has
    its centre at ``(u + 0.5, v + 0.5)``; x is the column, y the row.
Orbit
    16 frames, azimuth increasing counter-clockwise seen from +Z in steps of 22.5 degrees
    from a random start, azimuth 0 on +X; one elevation ``asin(z / r)`` per orbit drawn from
    ``[-5, 30]`` degrees; camera looks at the origin with world +Z up (no roll).
CCM
    The world point ``p`` of the visible surface mapped to ``p + 0.5``.
"""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np

NUM_FRAMES = 16
NUM_ORBITS = 2
AZIMUTH_STEP_DEG = 360.0 / NUM_FRAMES  # 22.5
ELEVATION_RANGE_DEG = (-5.0, 30.0)
DEFAULT_RADIUS = 2.0
DEFAULT_FOV_DEG = 39.6
DEFAULT_RESOLUTION = 512
WORLD_UP = np.array([0.0, 0.0, 1.0])

# Training view selection (docs/design.md section 4): the condition frame s, then every 2nd frame.
TRAIN_NUM_VIEWS = 8
TRAIN_FRAME_STRIDE = 2

# Blender's camera looks along -z with +y up; OpenCV's along +z with +y down.
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])

CCM_PNG_MAX = 65535
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# ----------------------------------------------------------------------------- world
def normalization_from_bounds(bounds_min, bounds_max) -> tuple[float, np.ndarray]:
    """Scale and offset that map a bounding box into ``[-0.5, 0.5]^3``.

    ``p_normalised = scale * p + offset``: the box is centred at the origin and its
    longest side becomes 1.

    Args:
        bounds_min, bounds_max: [3] corners of the axis-aligned bounding box.
    Returns:
        (scale, offset[3])
    """
    lo = np.asarray(bounds_min, dtype=np.float64)
    hi = np.asarray(bounds_max, dtype=np.float64)
    extent = float(np.max(hi - lo))
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError(f"degenerate bounding box {lo.tolist()} .. {hi.tolist()}")
    scale = 1.0 / extent
    offset = -scale * (lo + hi) / 2.0
    return scale, offset


# ----------------------------------------------------------------------------- cameras
def intrinsics(fov_deg: float, resolution: int) -> np.ndarray:
    """Pinhole intrinsics for a square image with one field of view for x and y.

    Returns:
        K [3, 3] in pixels, principal point at the image centre (W/2, H/2).
    """
    f = (resolution / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    c = resolution / 2.0
    return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])


def look_at_c2w(eye, target=(0.0, 0.0, 0.0), up=WORLD_UP) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes) of a camera at ``eye`` looking at ``target``.

    x (right) = forward x up, y (down) = forward x right, z = forward: no roll w.r.t. ``up``.

    Returns:
        c2w [4, 4]
    """
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    norm = np.linalg.norm(right)
    if norm < 1e-8:
        raise ValueError("camera looks straight along the up axis: roll is undefined")
    right /= norm
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def spherical_to_position(elevation_deg, azimuth_deg, radius) -> np.ndarray:
    """Camera position for an elevation (``asin(z / r)``) and an azimuth (0 on +X, CCW from +Z).

    Returns:
        [..., 3]
    """
    e = np.radians(np.asarray(elevation_deg, dtype=np.float64))
    a = np.radians(np.asarray(azimuth_deg, dtype=np.float64))
    return radius * np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1)


def orbit_azimuths(azimuth_start_deg: float, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Azimuths (degrees, in [0, 360)) of an orbit: start + 22.5 * i."""
    return np.mod(azimuth_start_deg + AZIMUTH_STEP_DEG * np.arange(num_frames), 360.0)


def orbit_c2w(elevation_deg: float, azimuths_deg, radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """Camera-to-world poses (OpenCV) of one orbit looking at the origin.

    Returns:
        c2w [F, 4, 4]
    """
    return np.stack(
        [look_at_c2w(spherical_to_position(elevation_deg, a, radius)) for a in azimuths_deg]
    )


def orbit_seed(uid: str, orbit_index: int) -> int:
    """A seed derived from the object id and orbit, stable across machines and runs."""
    digest = hashlib.sha256(f"{uid}/orbit{orbit_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_orbit(uid: str, orbit_index: int) -> tuple[float, float]:
    """The orbit's random draws: (elevation in [-5, 30], azimuth start in [0, 360)) degrees."""
    rng = np.random.default_rng(orbit_seed(uid, orbit_index))
    elevation = float(rng.uniform(*ELEVATION_RANGE_DEG))
    azimuth_start = float(rng.uniform(0.0, 360.0))
    return elevation, azimuth_start


def blender_to_opencv_c2w(c2w_blender) -> np.ndarray:
    """Blender camera-to-world (-z forward, +y up) to OpenCV axes. The one place it is done.

    Args:
        c2w_blender: [..., 4, 4]
    """
    return np.asarray(c2w_blender, dtype=np.float64) @ BLENDER_TO_OPENCV


def opencv_to_blender_c2w(c2w_opencv) -> np.ndarray:
    """Inverse of :func:`blender_to_opencv_c2w` (the flip is its own inverse)."""
    return np.asarray(c2w_opencv, dtype=np.float64) @ BLENDER_TO_OPENCV


# ----------------------------------------------------------------------------- model frame
def condition_frame_transform(c2w_condition) -> np.ndarray:
    """World-to-model-frame transform: the rotation about +Z that puts the condition camera at
    azimuth 0.

    The model sees cameras relative to the condition view in one way only: the world is
    rotated about its up axis (+Z) so that the condition camera lies in the XZ half-plane
    x > 0 (azimuth 0). Elevation, radius, scale and +Z up are unchanged, so the object stays
    in [-0.5, 0.5]^3 up to that rotation and the CCM of a point ``p`` in the model frame is
    ``R p + 0.5``. At inference the target cameras are then ``orbit_c2w(e, [0, 45, ...])``
    for an assumed condition elevation ``e``.

    Args:
        c2w_condition: [4, 4] OpenCV camera-to-world of the condition view.
    Returns:
        T [4, 4] (a rotation), to apply as ``T @ c2w`` to cameras and ``T[:3, :3] @ p`` to points.
    """
    x, y = np.asarray(c2w_condition, dtype=np.float64)[:2, 3]
    if math.hypot(x, y) < 1e-9:
        raise ValueError("condition camera lies on the up axis: its azimuth is undefined")
    phi = math.atan2(y, x)
    c, s = math.cos(-phi), math.sin(-phi)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    return T


def to_condition_frame(c2w) -> tuple[np.ndarray, np.ndarray]:
    """Express a view set in the model frame of its first (condition) view.

    Args:
        c2w: [V, 4, 4] OpenCV camera-to-world, view 0 is the condition.
    Returns:
        (T @ c2w [V, 4, 4], T [4, 4]) with T from :func:`condition_frame_transform`.
    """
    T = condition_frame_transform(c2w[0])
    return T @ np.asarray(c2w, dtype=np.float64), T


# ----------------------------------------------------------------------------- pixels & rays
def pixel_centers(height: int, width: int) -> np.ndarray:
    """Pixel centres ``(u + 0.5, v + 0.5)``: x from the column index, y from the row index.

    Returns:
        [H, W, 2] float64, ``out[v, u] = (u + 0.5, v + 0.5)``
    """
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    return np.stack([u, v], -1)


def camera_rays(c2w, K, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space rays through the pixel centres.

    Args:
        c2w: [4, 4] OpenCV camera-to-world.  K: [3, 3].
    Returns:
        origins [H, W, 3], unit directions [H, W, 3]
    """
    c2w = np.asarray(c2w, dtype=np.float64)
    uv1 = np.concatenate([pixel_centers(height, width), np.ones((height, width, 1))], -1)
    d_cam = uv1 @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T
    d_world = d_cam @ c2w[:3, :3].T
    d_world /= np.linalg.norm(d_world, axis=-1, keepdims=True)
    origins = np.broadcast_to(c2w[:3, 3], d_world.shape).copy()
    return origins, d_world


def unproject_depth(depth, K, c2w) -> np.ndarray:
    """World points from a z-depth map: ``X_cam = d K^-1 (u+0.5, v+0.5, 1)^T``, ``X = c2w X_cam``.

    Args:
        depth: [H, W] z-depth (distance along the optical axis, not along the ray).
        K: [3, 3].  c2w: [4, 4] OpenCV.
    Returns:
        [H, W, 3] world points.
    """
    depth = np.asarray(depth, dtype=np.float64)
    h, w = depth.shape
    uv1 = np.concatenate([pixel_centers(h, w), np.ones((h, w, 1))], -1)
    x_cam = depth[..., None] * (uv1 @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T)
    c2w = np.asarray(c2w, dtype=np.float64)
    return x_cam @ c2w[:3, :3].T + c2w[:3, 3]


# ----------------------------------------------------------------------------- CCM
def world_to_ccm(points):
    """Canonical coordinate map value of a (normalised) world point: ``p + 0.5``."""
    return points + 0.5


def ccm_to_world(ccm):
    """Inverse of :func:`world_to_ccm`."""
    return ccm - 0.5


def encode_ccm_png(ccm, alpha) -> np.ndarray:
    """CCM to the shard's 16-bit PNG values: ``round(ccm * 65535)``, 0 where alpha == 0.

    Args:
        ccm: [H, W, 3] float in [0, 1] (clipped).  alpha: [H, W] any dtype, 0 = background.
    Returns:
        [H, W, 3] uint16
    """
    q = np.round(np.clip(np.nan_to_num(ccm), 0.0, 1.0) * CCM_PNG_MAX).astype(np.uint16)
    q[np.asarray(alpha) == 0] = 0
    return q


def decode_ccm_png(values) -> np.ndarray:
    """Shard 16-bit PNG values to a CCM in [0, 1]. Returns float32 [H, W, 3]."""
    return np.asarray(values, dtype=np.float32) / CCM_PNG_MAX


# ----------------------------------------------------------------------------- samples
def sample_key(uid: str, orbit_index: int) -> str:
    """WebDataset key of one (object, orbit) sample: ``<uid>_o<k>`` (no dots allowed)."""
    if not _KEY_RE.match(uid):
        raise ValueError(f"uid {uid!r} may hold only letters, digits, '_' and '-'")
    if orbit_index not in range(NUM_ORBITS):
        raise ValueError(f"orbit index {orbit_index} not in 0..{NUM_ORBITS - 1}")
    return f"{uid}_o{orbit_index}"


def _split_key(key: str) -> tuple[str, int]:
    uid, sep, orbit = key.rpartition("_o")
    if not sep or not orbit.isdigit():
        raise ValueError(f"{key!r} is not a sample key <uid>_o<k>")
    return uid, int(orbit)


def key_uid(key: str) -> str:
    """The uid of a sample key ``<uid>_o<k>`` (inverse of :func:`sample_key`)."""
    return _split_key(key)[0]


def key_orbit(key: str) -> int:
    """The orbit index k of a sample key ``<uid>_o<k>`` (inverse of :func:`sample_key`)."""
    return _split_key(key)[1]


def frame_member(key: str, frame: int, kind: str) -> str:
    """Shard member name of one frame, kind ``rgba`` or ``ccm``: ``<key>.<ii>.<kind>.png``."""
    if kind not in ("rgba", "ccm"):
        raise ValueError(f"unknown frame kind {kind!r}")
    return f"{key}.{frame:02d}.{kind}.png"


def training_frame_indices(
    start: int,
    num_views: int = TRAIN_NUM_VIEWS,
    stride: int = TRAIN_FRAME_STRIDE,
    num_frames: int = NUM_FRAMES,
) -> np.ndarray:
    """Frames used for training: ``s, s+2, ..., s+14 (mod 16)``; frame ``s`` is the condition.

    Returns:
        [num_views] int64
    """
    if not 0 <= start < num_frames:
        raise ValueError(f"start frame {start} not in 0..{num_frames - 1}")
    return (start + stride * np.arange(num_views)) % num_frames
