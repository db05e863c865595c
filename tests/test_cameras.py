"""Plücker ray maps, intrinsics scaling and the model <-> LGM similarity (model/cameras.py)."""

import numpy as np
import pytest
import torch

from common import conventions as C
from model import cameras
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


def lgm_provider_poses(c2w_world: np.ndarray, radius: float) -> np.ndarray:
    """The camera normalisation of 3DTopia/LGM ``core/provider_objaverse.py``, step by step, on
    OpenCV cameras in a +Z-up (Blender) world: to OpenGL world and camera axes, cameras scaled
    to LGM's radius 1.5, then ``T = [I | (0, 0, 1.5)] inv(c2w_0)`` applied to every pose.

    Returns:
        [V, 4, 4] OpenGL-axes camera-to-world in LGM's frame.
    """
    poses = []
    for c2w in c2w_world.astype(np.float64):
        c2w = c2w.copy()
        c2w[1] *= -1
        c2w[[1, 2]] = c2w[[2, 1]]  # world: +Z up -> +Y up
        c2w[:3, 1:3] *= -1  # camera: OpenCV -> OpenGL
        c2w[:3, 3] *= 1.5 / radius
        poses.append(c2w)
    poses = np.stack(poses)
    transform = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.5], [0, 0, 0, 1.0]]) @ np.linalg.inv(poses[0])
    return transform[None] @ poses


@pytest.mark.parametrize("elevation, radius", [(-5.0, 2.0), (0.0, 2.0), (20.0, 2.0), (30.0, 2.6)])
def test_model_to_lgm_frame_is_lgms_own_camera_normalisation(elevation, radius):
    """Real orbit cameras (every 2nd frame of an orbit, condition frame first): our LGM-frame
    cameras, in OpenGL axes, equal LGM's own normalisation of the same cameras, computed in
    world coordinates before the condition frame rotation; the first camera is at
    [I | (0, 0, 1.5)] whatever its elevation."""
    world = C.orbit_c2w(elevation, C.orbit_azimuths(37.0)[::2][:4], radius)
    model, _ = C.to_condition_frame(world)
    c2w = torch.tensor(model, dtype=torch.float64)[None]
    ours = cameras.model_to_lgm_c2w(c2w, c2w[:, 0])[0].numpy()
    ours[:, :3, 1:3] *= -1  # OpenCV -> OpenGL camera axes, to compare with LGM's
    np.testing.assert_allclose(ours, lgm_provider_poses(world, radius), atol=1e-12)
    np.testing.assert_allclose(ours[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1.5], [0, 0, 0, 1]], atol=1e-12)


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
    reference = c2w_model[:, 0]
    in_lgm = render_gaussians(g, cameras.model_to_lgm_c2w(c2w_model, reference), K, 24, 24)
    in_model = render_gaussians(cameras.lgm_to_model_gaussians(g, reference), c2w_model, K, 24, 24)
    assert in_lgm["alpha"].amax() > 0.5
    for key in ("rgb", "alpha"):
        torch.testing.assert_close(in_model[key], in_lgm[key], atol=1e-9, rtol=1e-7)
    # Depth scales with the frame; quaternions stay unit.
    torch.testing.assert_close(
        in_model["depth"] * cameras.model_to_lgm_scale(reference), in_lgm["depth"], atol=1e-9, rtol=1e-7
    )
    torch.testing.assert_close(
        cameras.lgm_to_model_gaussians(g, reference)[..., 7:11].norm(dim=-1), torch.ones(1, n).double()
    )
