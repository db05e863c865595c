"""The contract of docs/design.md section 2, checked by independent computations."""

import math

import numpy as np
import pytest

from common import conventions as cv


def project(points, c2w, K):
    """Independent pinhole projection (world -> pixel coordinates, OpenCV)."""
    w2c = np.linalg.inv(c2w)
    x = points @ w2c[:3, :3].T + w2c[:3, 3]
    uvw = x @ K.T
    return uvw[..., :2] / uvw[..., 2:], x[..., 2]


def test_orbit_geometry_matches_definition():
    elevation, start = 17.0, 300.0
    az = cv.orbit_azimuths(start)
    c2w = cv.orbit_c2w(elevation, az, radius=2.0)
    assert c2w.shape == (16, 4, 4)
    pos = c2w[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 2.0)
    np.testing.assert_allclose(np.degrees(np.arcsin(pos[:, 2] / 2.0)), elevation)
    # azimuth 0 on +X, increasing counter-clockwise seen from +Z
    phi = np.degrees(np.arctan2(pos[:, 1], pos[:, 0])) % 360
    np.testing.assert_allclose(phi, az, atol=1e-9)
    steps = np.diff(np.unwrap(np.radians(phi)))
    np.testing.assert_allclose(np.degrees(steps), 22.5)
    # rotations are proper, OpenCV: the origin projects to the principal point, in front
    K = cv.intrinsics(39.6, 64)
    for m in c2w:
        np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)
        uv, z = project(np.zeros(3), m, K)
        np.testing.assert_allclose(uv, [32, 32], atol=1e-9)
        assert z > 0
        # no roll: image "up" (-y) has a positive world-Z component, image x is horizontal
        assert -m[2, 1] > 0 and abs(m[2, 0]) < 1e-12


def test_world_up_is_image_up_and_right_is_right():
    c2w = cv.look_at_c2w([2.0, 0.0, 0.0])  # at +X looking at the origin
    K = cv.intrinsics(40, 100)
    (u_top, v_top), _ = project(np.array([0.0, 0.0, 0.3]), c2w, K)
    assert v_top < 50  # +Z is up in the image (smaller row)
    (u_y, _), _ = project(np.array([0.0, 0.3, 0.0]), c2w, K)
    assert u_y > 50  # seen from +X, +Y lies to the right


def test_intrinsics_and_fov():
    K = cv.intrinsics(39.6, 512)
    assert K[0, 2] == K[1, 2] == 256
    # the image edge is at half the field of view
    assert math.degrees(math.atan(256 / K[0, 0])) * 2 == pytest.approx(39.6)


def test_pixel_centres_and_rays_hit_projected_points():
    K = cv.intrinsics(39.6, 48)
    c2w = cv.orbit_c2w(10.0, [33.0])[0]
    o, d = cv.camera_rays(c2w, K, 48, 48)
    assert o.shape == d.shape == (48, 48, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0)
    pts = o + 1.7 * d
    uv, _ = project(pts, c2w, K)
    np.testing.assert_allclose(uv, cv.pixel_centers(48, 48), atol=1e-9)
    assert tuple(cv.pixel_centers(3, 5)[2, 4]) == (4.5, 2.5)  # [row, col] -> (x=col, y=row)


def test_unproject_depth_round_trip():
    rng = np.random.default_rng(0)
    K = cv.intrinsics(50, 32)
    c2w = cv.orbit_c2w(-3.0, [250.0])[0]
    depth = rng.uniform(1.0, 3.0, (32, 32))
    world = cv.unproject_depth(depth, K, c2w)
    uv, z = project(world, c2w, K)
    np.testing.assert_allclose(z, depth, rtol=1e-12)
    np.testing.assert_allclose(uv, cv.pixel_centers(32, 32), atol=1e-9)


def test_blender_conversion():
    c2w = cv.look_at_c2w([1.0, -2.0, 0.5])
    bl = cv.opencv_to_blender_c2w(c2w)
    # Blender cameras look along their -z axis, with +y up
    forward = -bl[:3, 2]
    np.testing.assert_allclose(forward, -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3]))
    assert bl[2, 1] > 0
    np.testing.assert_allclose(cv.blender_to_opencv_c2w(bl), c2w)


def test_normalisation():
    scale, offset = cv.normalization_from_bounds([1, 2, 3], [3, 6, 4])
    lo = scale * np.array([1, 2, 3]) + offset
    hi = scale * np.array([3, 6, 4]) + offset
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-12)
    assert max(hi - lo) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cv.normalization_from_bounds([0, 0, 0], [0, 0, 0])


def test_orbit_draws_deterministic_and_in_range():
    draws = [cv.draw_orbit(f"obj{i}", k) for i in range(200) for k in range(2)]
    assert draws[:4] == [cv.draw_orbit(f"obj{i}", k) for i in range(2) for k in range(2)]
    el = np.array([d[0] for d in draws])
    az = np.array([d[1] for d in draws])
    assert el.min() >= -5 and el.max() <= 30 and el.std() > 5
    assert az.min() >= 0 and az.max() < 360
    assert cv.draw_orbit("a", 0) != cv.draw_orbit("a", 1)


def test_ccm_png_round_trip_and_background():
    rng = np.random.default_rng(1)
    ccm = rng.uniform(0, 1, (8, 8, 3))
    alpha = rng.integers(0, 2, (8, 8))
    q = cv.encode_ccm_png(ccm, alpha)
    assert q.dtype == np.uint16
    assert np.all(q[alpha == 0] == 0)
    back = cv.decode_ccm_png(q)
    np.testing.assert_allclose(back[alpha == 1], ccm[alpha == 1], atol=0.5 / 65535 + 1e-7)
    np.testing.assert_allclose(cv.ccm_to_world(cv.world_to_ccm(ccm)), ccm)


def test_training_frames_wrap_every_second_frame():
    assert cv.training_frame_indices(0).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert cv.training_frame_indices(5).tolist() == [5, 7, 9, 11, 13, 15, 1, 3]
    with pytest.raises(ValueError):
        cv.training_frame_indices(16)


def test_keys():
    assert cv.sample_key("abc-1_x", 1) == "abc-1_x_o1"
    assert cv.key_uid("abc-1_x_o1") == "abc-1_x" and cv.key_orbit("abc-1_x_o1") == 1
    with pytest.raises(ValueError):
        cv.key_orbit("abc-1_x")
    assert cv.frame_member("k_o0", 3, "ccm") == "k_o0.03.ccm.png"
    for bad in ["a.b", "a b", ""]:
        with pytest.raises(ValueError):
            cv.sample_key(bad, 0)
    with pytest.raises(ValueError):
        cv.sample_key("a", 2)


def test_condition_frame_puts_condition_view_at_azimuth_zero():
    el, start = 12.0, 123.0
    az = cv.orbit_azimuths(start)[cv.training_frame_indices(3)]
    c2w = cv.orbit_c2w(el, az)
    rel, T = cv.to_condition_frame(c2w)
    # the same as an orbit built directly in the model frame
    np.testing.assert_allclose(rel, cv.orbit_c2w(el, 45.0 * np.arange(8)), atol=1e-12)
    np.testing.assert_allclose(T[:3, :3] @ [0, 0, 1], [0, 0, 1])
    # projections are unchanged when points move with the cameras
    K = cv.intrinsics(39.6, 64)
    p = np.array([0.3, -0.2, 0.1])
    uv_world, _ = project(p, c2w[2], K)
    uv_model, _ = project(T[:3, :3] @ p, rel[2], K)
    np.testing.assert_allclose(uv_world, uv_model, atol=1e-9)
