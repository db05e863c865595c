"""Plücker ray maps, intrinsics scaling and the model <-> LGM similarity (model/cameras.py)."""

import numpy as np
import pytest
import torch

from data_pipeline import conventions as C
from model import cameras
from model.gaussians import quaternion_to_matrix
from model.rasterizer import render_gaussians
from raycast_oracle import first_hits, normalised_mesh

def test_plucker_rays_hit_the_mesh_where_the_camera_rays_do():
    """Rays rebuilt from the Plücker map hit an asymmetric mesh at the same points as the
    conventions' camera rays (a transposed map, or centres off by half a pixel, would not)."""
    mesh = normalised_mesh("Duck.glb")
    size = 24
    c2w = C.orbit_c2w(17.0, [33.0])[0]
    K = C.intrinsics(C.DEFAULT_FOV_DEG, size)
    plucker = cameras.plucker_rays(torch.tensor(c2w), torch.tensor(K), size, size)
    assert plucker.shape == (6, size, size)
    point, d = (t.numpy().reshape(-1, 3) for t in cameras.plucker_to_rays(plucker))
    # Start well behind the camera on the same line: the first hit is the visible surface.
    from_plucker = first_hits(mesh, point - 10.0 * d, d)
    o_ref, d_ref = (a.reshape(-1, 3) for a in C.camera_rays(c2w, K, size, size))
    reference = first_hits(mesh, o_ref, d_ref)

    hit = ~np.isnan(reference[:, 0])
    assert 0.2 < hit.mean() < 0.9  # the object is in view, not filling it
    np.testing.assert_array_equal(hit, ~np.isnan(from_plucker[:, 0]))
    np.testing.assert_allclose(from_plucker[hit], reference[hit], atol=1e-5)
    # The moment is o x d with o the camera centre.
    m = plucker.movedim(0, -1).reshape(-1, 6)[:, :3].numpy()
    np.testing.assert_allclose(m, np.cross(c2w[:3, 3], d_ref), atol=1e-6)


def test_plucker_x_is_the_column():
    """Moving right along a row turns the ray towards the camera's +x (right) axis."""
    c2w = torch.tensor(C.orbit_c2w(0.0, [0.0])[0])
    K = torch.tensor(C.intrinsics(40.0, 8))
    d = cameras.plucker_rays(c2w, K, 8, 8)[3:]
    right = c2w[:3, 0]
    along_row = torch.einsum("c,chw->hw", right, d)
    assert (along_row[:, 1:] > along_row[:, :-1]).all()
    assert torch.allclose(along_row[3], along_row[4])  # no change down a column


def test_scale_intrinsics_keeps_the_image_plane():
    """A 3D point projects to the same fraction of the image at both sizes (pixel centres +0.5)."""
    K = torch.tensor(C.intrinsics(39.6, 512))
    K64 = cameras.scale_intrinsics(K, 512, 64)
    X = torch.tensor([0.3, -0.2, 2.0], dtype=K.dtype)
    uv512 = (K @ X)[:2] / X[2]
    uv64 = (K64 @ X)[:2] / X[2]
    torch.testing.assert_close(uv64, uv512 * 64 / 512)
    torch.testing.assert_close(K64, torch.tensor(C.intrinsics(39.6, 64)))
    with pytest.raises(ValueError):
        cameras.scale_intrinsics(K, 0, 64)


def test_model_to_lgm_frame():
    """The condition camera (+X, radius 2, +Z up) becomes LGM's front camera (+Z, radius 1.5,
    +Y up); Plücker maps transform as lines under a similarity (m -> s R m, d -> R d)."""
    c2w = torch.tensor(C.orbit_c2w(0.0, [0.0, 90.0, 180.0]), dtype=torch.float64)
    lgm = cameras.model_to_lgm_c2w(c2w)
    torch.testing.assert_close(lgm[0, :3, 3], torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64))
    # OpenCV y points down: world up is -y of the camera, +Y in LGM's frame.
    torch.testing.assert_close(-lgm[0, :3, 1], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    R = torch.tensor(cameras.MODEL_TO_LGM_ROTATION, dtype=torch.float64)
    assert torch.linalg.det(R) == pytest.approx(1.0)
    q = torch.tensor(cameras.MODEL_TO_LGM_QUATERNION, dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(q), R)

    K = torch.tensor(C.intrinsics(39.6, 6)).expand(3, 3, 3)
    p_model = cameras.plucker_rays(c2w, K, 6, 6)
    p_lgm = cameras.plucker_rays(lgm, K, 6, 6)
    s = cameras.MODEL_TO_LGM_SCALE
    torch.testing.assert_close(p_lgm[:, :3], s * torch.einsum("ij,vjhw->vihw", R, p_model[:, :3]))
    torch.testing.assert_close(p_lgm[:, 3:], torch.einsum("ij,vjhw->vihw", R, p_model[:, 3:]))


def test_lgm_gaussians_to_model_frame_render_identically():
    """Anisotropic, rotated Gaussians in LGM's frame seen by LGM-frame cameras render exactly as
    the converted Gaussians seen by the model-frame cameras (positions, scales, rotations)."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    g = torch.cat(
        [
            (torch.rand(n, 3, generator=gen) - 0.5) * 0.6,
            0.2 + 0.7 * torch.rand(n, 1, generator=gen),
            0.01 + 0.05 * torch.rand(n, 3, generator=gen),
            torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
            torch.rand(n, 3, generator=gen),
        ],
        -1,
    ).double()[None]
    c2w_model = torch.tensor(C.orbit_c2w(20.0, [0.0, 130.0]))[None]
    K = torch.tensor(C.intrinsics(39.6, 24)).expand(1, 2, 3, 3)
    in_lgm = render_gaussians(g, cameras.model_to_lgm_c2w(c2w_model), K, 24, 24)
    in_model = render_gaussians(cameras.lgm_to_model_gaussians(g), c2w_model, K, 24, 24)
    assert in_lgm["alpha"].amax() > 0.5
    for key in ("rgb", "alpha"):
        torch.testing.assert_close(in_model[key], in_lgm[key], atol=1e-9, rtol=1e-7)
    # Depth scales with the frame; quaternions stay unit.
    torch.testing.assert_close(
        in_model["depth"] * cameras.MODEL_TO_LGM_SCALE, in_lgm["depth"], atol=1e-9, rtol=1e-7
    )
    torch.testing.assert_close(
        cameras.lgm_to_model_gaussians(g)[..., 7:11].norm(dim=-1), torch.ones(1, n).double()
    )
