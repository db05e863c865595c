"""The Gaussian rasterizer (model/rasterizer): analytic footprints, gradients, occlusion, and the
camera model checked against trimesh ray casting on a real mesh."""

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage
from raycast_oracle import first_hits, normalised_mesh, one_torch_thread

from common import conventions as C
from model.rasterizer import render_gaussians
from model.rasterizer.torch_reference import LOW_PASS, render_view, render_views


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_torch_thread()


def gaussians(xyz, opacity, scale, rgb, rotation=None, dtype=torch.float64):
    """[1, N, 14] from per-Gaussian lists."""
    xyz = torch.as_tensor(xyz, dtype=dtype).reshape(-1, 3)
    n = xyz.shape[0]
    if rotation is None:
        rotation = torch.tensor([1.0, 0, 0, 0], dtype=dtype).expand(n, 4)
    cols = [
        xyz,
        torch.as_tensor(opacity, dtype=dtype).reshape(n, 1),
        torch.as_tensor(scale, dtype=dtype).reshape(n, 3),
        torch.as_tensor(rotation, dtype=dtype).reshape(n, 4),
        torch.as_tensor(rgb, dtype=dtype).reshape(n, 3),
    ]
    return torch.cat(cols, -1)[None]


def front_camera(size, fov=40.0, radius=2.0, dtype=torch.float64):
    """[1, 1, 4, 4] camera on +X looking at the origin, and its K [1, 1, 3, 3]."""
    c2w = torch.tensor(C.look_at_c2w([radius, 0.0, 0.0]), dtype=dtype)[None, None]
    K = torch.tensor(C.intrinsics(fov, size), dtype=dtype)[None, None]
    return c2w, K


def test_isotropic_gaussian_renders_its_analytic_footprint():
    """A centred isotropic Gaussian (std s at distance D) is a 2D Gaussian of variance
    (f s / D)^2 + 0.3 px^2 at the image centre, peak = its opacity."""
    size, s, D, opacity = 33, 0.05, 2.0, 0.8  # odd size: a pixel centre sits on the axis
    c2w, K = front_camera(size, radius=D)
    out = render_gaussians(gaussians([0, 0, 0], opacity, [s] * 3, [1.0, 0.0, 0.0]), c2w, K,
                           size, size, background=0.0)  # fmt: skip
    f = K[0, 0, 0, 0].item()
    var = (f * s / D) ** 2 + LOW_PASS
    v, u = np.mgrid[0:size, 0:size] + 0.5
    r2 = (u - size / 2) ** 2 + (v - size / 2) ** 2
    expected = opacity * np.exp(-0.5 * r2 / var)
    expected[expected < 1 / 255] = 0.0
    alpha = out["alpha"][0, 0, 0].numpy()
    np.testing.assert_allclose(alpha, expected, atol=1e-12)
    assert alpha.max() == pytest.approx(opacity)
    # The radius where alpha falls to exp(-1/2) of its peak is the projected std.
    row = alpha[size // 2]
    radius = np.interp(-opacity * math.exp(-0.5), -row[size // 2 :], np.arange(size - size // 2))
    assert radius == pytest.approx(math.sqrt(var), rel=0.05)
    np.testing.assert_allclose(out["rgb"][0, 0, 0].numpy(), alpha, atol=1e-12)  # red over black
    np.testing.assert_allclose(out["depth"][0, 0, 0].numpy()[alpha > 0], D)


def test_rotated_anisotropic_gaussian_matches_a_numerical_ewa_reference():
    """Off-centre, rotated, anisotropic: alpha equals o exp(-0.5 d^T S^-1 d) with
    S = J Sigma J^T + 0.3 I, J the finite-difference Jacobian of the pinhole projection."""
    size, opacity = 40, 0.9
    c2w = C.orbit_c2w(25.0, [40.0])[0]
    K = C.intrinsics(35.0, size)
    mean = np.array([0.15, -0.1, 0.2])
    scale = np.array([0.12, 0.03, 0.06])
    quat = np.array([0.8, 0.3, -0.4, 0.33])
    quat /= np.linalg.norm(quat)
    w, x, y, z = quat
    R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                  [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                  [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])  # fmt: skip
    sigma = R @ np.diag(scale**2) @ R.T
    w2c = np.linalg.inv(c2w)

    def project(p):
        q = K @ (w2c[:3, :3] @ p + w2c[:3, 3])
        return q[:2] / q[2]

    h = 1e-6
    J = np.stack([(project(mean + h * e) - project(mean - h * e)) / (2 * h) for e in np.eye(3)], 1)
    S = J @ sigma @ J.T + LOW_PASS * np.eye(2)
    v, u = np.mgrid[0:size, 0:size] + 0.5
    d = np.stack([u, v], -1) - project(mean)
    expected = opacity * np.exp(-0.5 * np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(S), d))
    expected[expected < 1 / 255] = 0.0

    g = gaussians(mean, opacity, scale, [0.2, 0.4, 0.6], quat)
    out = render_gaussians(g, torch.tensor(c2w)[None, None], torch.tensor(K)[None, None], size, size)
    np.testing.assert_allclose(out["alpha"][0, 0, 0].numpy(), expected, atol=1e-6)
    assert (expected > 0.5).sum() >= 10 and np.linalg.cond(S) > 3  # a real, elongated footprint


def test_front_gaussian_occludes_back_one_whatever_the_input_order():
    size = 17
    c2w, K = front_camera(size)
    front = ([0.3, 0, 0], 0.8, [0.1] * 3, [1.0, 0, 0])
    back = ([-0.3, 0, 0], 1.0, [0.1] * 3, [0, 0, 1.0])
    for pair in ((front, back), (back, front)):
        g = torch.cat([gaussians(*p) for p in pair], 1)
        out = render_gaussians(g, c2w, K, size, size, background=0.0)
        centre = out["rgb"][0, 0, :, size // 2, size // 2]
        # the back one's alpha clamps at 0.999 and it gets the 0.2 of light the front one leaves
        torch.testing.assert_close(centre, torch.tensor([0.8, 0, 0.2 * 0.999], dtype=centre.dtype))
        assert out["depth"][0, 0, 0, size // 2, size // 2] == pytest.approx(
            (0.8 * 1.7 + 0.1998 * 2.3) / (0.8 + 0.1998)
        )


def test_compositing_stops_before_transmittance_falls_to_1e_4_as_gsplat():
    """An opaque front Gaussian (alpha clamped at 0.999, T = 1e-3 after it): the one behind would
    take T to 1e-6, so gsplat's kernel drops it (and stops); so does the reference."""
    size = 17
    c2w, K = front_camera(size)
    front = gaussians([0.3, 0, 0], 1.0, [0.1] * 3, [1.0, 0, 0])
    back = gaussians([-0.3, 0, 0], 1.0, [0.1] * 3, [0, 0, 1.0])
    out = render_gaussians(torch.cat([back, front], 1), c2w, K, size, size, background=0.0)
    c = size // 2
    torch.testing.assert_close(out["rgb"][0, 0, :, c, c], torch.tensor([0.999, 0, 0], dtype=torch.float64))
    assert out["alpha"][0, 0, 0, c, c] == pytest.approx(0.999)
    assert out["depth"][0, 0, 0, c, c] == pytest.approx(1.7)


def test_gaussians_behind_the_camera_are_skipped():
    size = 9
    c2w, K = front_camera(size)
    g = gaussians([3.0, 0, 0], 1.0, [0.5] * 3, [1.0, 0, 0])  # behind the camera at x = 2
    g.requires_grad_(True)
    out = render_gaussians(g, c2w, K, size, size, background=0.25)
    assert out["alpha"].abs().max() == 0
    torch.testing.assert_close(out["rgb"], torch.full_like(out["rgb"], 0.25))
    out["rgb"].sum().backward()  # an empty view is still differentiable (zero gradient)
    assert torch.equal(g.grad, torch.zeros_like(g))


def test_tiles_do_not_change_the_image():
    """Culling per tile loses nothing: tiny tiles give the single-tile image."""
    gen = torch.Generator().manual_seed(1)
    n, size = 200, 24
    g = gaussians(
        (torch.rand(n, 3, generator=gen) - 0.5) * 0.8, torch.rand(n, generator=gen),
        0.01 + 0.06 * torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen),
        torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
    )[0]  # fmt: skip
    c2w, K = front_camera(size)
    bg = torch.tensor([0.2, 0.5, 1.0], dtype=g.dtype)
    whole = render_view(g, c2w[0, 0], K[0, 0], size, size, bg, tile_size=size)
    tiled = render_view(g, c2w[0, 0], K[0, 0], size, size, bg, tile_size=5)
    for key in whole:
        torch.testing.assert_close(tiled[key], whole[key], atol=1e-12, rtol=0)


def dense_reference(g, c2w, K, size, background):
    """One view composited per pixel over ALL its Gaussians, no tiles, no chunks: every centre
    projected with the exact pinhole Jacobian (the scene stays well inside the view, so the
    rasterizer's 1.3 x fov clamp is inactive), alphas ``min(0.999, o exp(-0.5 d^T S^-1 d))``
    dropped below 1/255, sorted by depth, stopped before T would fall to 1e-4.

    Args:
        g: [N, 14].  c2w: [4, 4].  K: [3, 3].  background: [3].
    Returns:
        (dict of [C, size, size] as render_view, kept [P, N] bool, alpha [P, N])
    """
    w2c = torch.linalg.inv(c2w)
    cam = g[:, 0:3] @ w2c[:3, :3].T + w2c[:3, 3]
    g, cam = g[cam[:, 2] > 0.01], cam[cam[:, 2] > 0.01]
    order = torch.argsort(cam[:, 2], stable=True)
    g, cam = g[order], cam[order]
    x, y, z = cam.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * x / z**2, zero, fy / z, -fy * y / z**2], -1).reshape(-1, 2, 3)
    w, qx, qy, qz = torch.nn.functional.normalize(g[:, 7:11], dim=-1).unbind(-1)
    R = torch.stack([1 - 2 * (qy**2 + qz**2), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy),
                     2 * (qx * qy + w * qz), 1 - 2 * (qx**2 + qz**2), 2 * (qy * qz - w * qx),
                     2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx**2 + qy**2)], -1).reshape(-1, 3, 3)
    M = w2c[:3, :3] @ R * g[:, None, 4:7]
    S = J @ M @ M.transpose(1, 2) @ J.transpose(1, 2) + LOW_PASS * torch.eye(2, dtype=g.dtype)
    centre = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    v, u = torch.meshgrid(torch.arange(size, dtype=g.dtype) + 0.5, torch.arange(size, dtype=g.dtype) + 0.5, indexing="ij")
    d = torch.stack([u, v], -1).reshape(-1, 1, 2) - centre  # [P, N, 2]
    maha = torch.einsum("pni,nij,pnj->pn", d, torch.linalg.inv(S), d)
    alpha = torch.clamp(g[:, 3] * torch.exp(-0.5 * maha), max=0.999)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], 1), 1)
    kept = (T[:, 1:] > 1e-4).detach()
    alpha_kept = alpha * kept
    weights = alpha_kept * torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha_kept], 1), 1)[:, :-1]
    acc = weights @ torch.cat([g[:, 11:14], z[:, None], g[:, 0:3] + 0.5], 1)  # [P, 7]
    opacity = weights.sum(1, keepdim=True)
    out = dict(rgb=acc[:, 0:3] + (1 - opacity) * background, alpha=opacity,
               depth=acc[:, 3:4] / opacity.clamp(min=1e-10), ccm=acc[:, 4:7])
    return {k: t.T.reshape(-1, size, size) for k, t in out.items()}, kept, alpha


def test_chunked_tiles_match_a_dense_per_pixel_reference():
    """Tiles, padded chunks (three budgets: the default, small chunks, one tile each), and all
    cameras of a batch in one pass give a dense, tile-free per-pixel compositing's images and
    gradients, on a scene where the early stop and the 0.999 clamp are reached (21 px: the
    last tile row and column are partial)."""
    gen = torch.Generator().manual_seed(3)
    B, n, size = 2, 40, 21
    g = torch.cat([gaussians(
        (torch.rand(n, 3, generator=gen) - 0.5) * 0.6, 0.3 + 0.7 * torch.rand(n, generator=gen),
        0.03 + 0.1 * torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen),
        torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
    ) for _ in range(B)])  # fmt: skip
    g[:, 0, 0:4] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # opaque at the origin: the centre pixel clamps
    c2w = torch.stack([torch.tensor(C.orbit_c2w(e, [a, a + 100.0, a + 230.0])) for e, a in ((10.0, 5.0), (25.0, 60.0))])
    K = torch.tensor(C.intrinsics(39.6, size)).expand(B, 3, 3, 3)
    bg = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    probe = {k: torch.randn(B, 3, c, size, size, generator=gen, dtype=torch.float64)
             for k, c in (("rgb", 3), ("alpha", 1), ("depth", 1), ("ccm", 3))}  # fmt: skip

    def grad_of(out, leaf):
        return torch.autograd.grad(sum((out[k] * probe[k]).sum() for k in probe), leaf)[0]

    leaf = g.clone().requires_grad_(True)
    ref = {k: torch.empty(B, 3, *probe[k].shape[2:], dtype=torch.float64) for k in probe}
    ref_grad = torch.zeros_like(g)
    stops = clamps = 0
    for b in range(B):
        for v in range(3):
            gb = leaf[b].detach().clone().requires_grad_(True)
            out, kept, alpha = dense_reference(gb, c2w[b, v], K[b, v], size, bg)
            for k in out:
                ref[k][b, v] = out[k].detach()
            ref_grad[b] += torch.autograd.grad(sum((out[k] * probe[k][b, v]).sum() for k in out), gb)[0]
            stops += int(((alpha > 0) & ~kept).any(1).sum())
            clamps += int((alpha == 0.999).sum())
    assert stops > 10 and clamps > 0  # the early stop and the clamp are exercised
    for budget in (None, 2048, 1):
        kwargs = {} if budget is None else dict(budget=budget)
        out = render_views(leaf, c2w, K, size, size, bg, **kwargs)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-12, rtol=0, msg=f"{k}, budget {budget}")
        torch.testing.assert_close(grad_of(out, leaf), ref_grad, atol=1e-10, rtol=1e-8)


def test_gradients_match_finite_differences():
    """torch.autograd.gradcheck (float64) through projection, EWA covariance and compositing."""
    size = 8
    c2w = torch.tensor(C.orbit_c2w(15.0, [20.0])[None], dtype=torch.float64)
    K = torch.tensor(C.intrinsics(30.0, size), dtype=torch.float64)[None, None]
    rot = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, -0.3, 0.1], [0.9, -0.1, 0.4, 0.3]]), dim=-1)
    g0 = gaussians([[0.05, 0.02, 0.0], [-0.1, -0.05, 0.08]], [0.7, 0.6],
                   [[0.12, 0.06, 0.09], [0.1, 0.15, 0.05]], [[0.9, 0.2, 0.1], [0.1, 0.3, 0.8]],
                   rot).requires_grad_(True)  # fmt: skip

    def fn(g):
        out = render_gaussians(g, c2w, K, size, size, background=0.5)
        return out["rgb"], out["alpha"], out["depth"], out["ccm"]

    assert torch.autograd.gradcheck(fn, (g0,), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_ccm_of_surface_gaussians_matches_ray_casting():
    """Small Gaussians on a real mesh's surface: the rendered CCM and mask agree with trimesh
    ray casting through the same pixels (the rasterizer uses the data's camera model)."""
    mesh = normalised_mesh("Duck.glb")
    points, _ = trimesh.sample.sample_surface(mesh, 30000, seed=0)
    n, size = len(points), 40
    g = gaussians(points, [1.0] * n, [[0.006] * 3] * n, [[0.5] * 3] * n, dtype=torch.float32)
    c2w = C.orbit_c2w(20.0, [60.0])[0]
    K = C.intrinsics(C.DEFAULT_FOV_DEG, size)
    out = render_gaussians(g, torch.tensor(c2w)[None, None], torch.tensor(K)[None, None],
                           size, size, background=1.0)  # fmt: skip
    alpha = out["alpha"][0, 0, 0].numpy()
    ccm = out["ccm"][0, 0].permute(1, 2, 0).numpy()

    o, d = (a.reshape(-1, 3) for a in C.camera_rays(c2w, K, size, size))
    hits = first_hits(mesh, o, d).reshape(size, size, 3)
    hit = ~np.isnan(hits[..., 0])
    mask = alpha > 0.5
    # Splats spread by their footprint (std ~0.6 px with the 0.3 px^2 low-pass) and pile up at
    # the silhouette: the mask covers every hit pixel and at most 2 px more.
    assert 0.2 < hit.mean() < 0.8
    assert (hit & ~mask).sum() <= 0.01 * hit.sum()
    assert not (mask & ~ndimage.binary_dilation(hit, iterations=2)).any()
    interior = ndimage.binary_erosion(hit, iterations=2)
    assert interior.sum() > 0.4 * hit.sum()
    err = np.linalg.norm(ccm[interior] / alpha[interior, None] - C.world_to_ccm(hits[interior]), axis=-1)
    # Opaque splats are ordered by their centres' depth, so at each pixel the splat nearest the
    # camera within ~1 px wins: the CCM is exact up to about one pixel's width on the surface.
    # (A transposed, flipped or half-pixel-shifted camera model gives errors of many pixels.)
    pixel = 2.0 / K[0, 0]  # one pixel's width at the object's distance
    assert np.median(err) < 1.5 * pixel, np.median(err) / pixel
    assert np.mean(err < 3 * pixel) > 0.75
    assert ccm[alpha < 0.01].max(initial=0) < 0.01  # composited over 0: empty pixels are 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat needs CUDA")
def test_gsplat_matches_torch_reference():
    gen = torch.Generator().manual_seed(2)
    n, size = 500, 48
    g = gaussians(
        (torch.rand(n, 3, generator=gen) - 0.5) * 0.8, torch.rand(n, generator=gen),
        0.01 + 0.05 * torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen),
        torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1), torch.float32,
    )  # fmt: skip
    c2w = torch.tensor(C.orbit_c2w(10.0, [0.0, 100.0]), dtype=torch.float32)[None]
    K = torch.tensor(C.intrinsics(39.6, size), dtype=torch.float32).expand(1, 2, 3, 3)
    ref = render_gaussians(g, c2w, K, size, size, backend="torch")
    cuda = render_gaussians(g.cuda(), c2w.cuda(), K.cuda(), size, size, backend="gsplat")
    for key in ref:
        torch.testing.assert_close(cuda[key].cpu(), ref[key], atol=2e-3, rtol=1e-3)
