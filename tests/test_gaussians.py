"""Gaussian layout, rotation maths and the 3DGS .ply file (model/gaussians.py)."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from model.gaussians import (
    PLY_PROPERTIES, SH_C0, covariance_3d, load_ply, matrix_to_quaternion, quaternion_multiply,
    quaternion_to_matrix, save_ply,
)  # fmt: skip


def random_gaussians(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randn(n, 3, generator=gen),
            0.01 + 0.98 * torch.rand(n, 1, generator=gen),
            0.001 + 0.2 * torch.rand(n, 3, generator=gen),
            torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
            torch.rand(n, 3, generator=gen),
        ],
        -1,
    )


def test_quaternions_match_scipy():
    q = torch.nn.functional.normalize(torch.randn(50, 4, dtype=torch.float64), dim=-1)
    r = Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy())  # scipy is (x, y, z, w)
    np.testing.assert_allclose(quaternion_to_matrix(q).numpy(), r.as_matrix(), atol=1e-12)
    q2 = torch.nn.functional.normalize(torch.randn(50, 4, dtype=torch.float64), dim=-1)
    r2 = Rotation.from_quat(q2[:, [1, 2, 3, 0]].numpy())
    np.testing.assert_allclose(
        quaternion_to_matrix(quaternion_multiply(q, q2)).numpy(), (r * r2).as_matrix(), atol=1e-12
    )
    # Normalised along the 4 components: a scaled quaternion is the same rotation.
    np.testing.assert_allclose(quaternion_to_matrix(3 * q).numpy(), r.as_matrix(), atol=1e-12)


def test_matrix_to_quaternion_matches_scipy_on_every_branch():
    """Random rotations and the 180-degree turns about x, y, z (where w = 0 and a single x, y or
    z branch is the only well-conditioned one)."""
    q = torch.nn.functional.normalize(torch.randn(200, 4, dtype=torch.float64), dim=-1)
    turns = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.float64)
    q = torch.cat([q, turns])
    got = matrix_to_quaternion(torch.from_numpy(Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix()))
    sign = torch.sign((got * q).sum(-1, keepdim=True))  # q and -q are the same rotation
    torch.testing.assert_close(got * sign, q, atol=1e-12, rtol=0)


def test_covariance_is_r_s2_rt():
    g = random_gaussians(20).double()
    cov = covariance_3d(g[:, 4:7], g[:, 7:11])
    R = Rotation.from_quat(g[:, [8, 9, 10, 7]].numpy()).as_matrix()
    expected = R @ np.einsum("ni,ij->nij", g[:, 4:7].numpy() ** 2, np.eye(3)) @ R.transpose(0, 2, 1)
    np.testing.assert_allclose(cov.numpy(), expected, atol=1e-12)


def test_ply_round_trip(tmp_path):
    g = random_gaussians(257)
    save_ply(g, tmp_path / "g.ply")
    back = load_ply(tmp_path / "g.ply")
    assert back.shape == g.shape and back.dtype == torch.float32
    torch.testing.assert_close(back, g, atol=2e-5, rtol=1e-5)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_ply_header_and_raw_values_are_what_viewers_expect(tmp_path):
    """3DGS viewers read x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3 as float32,
    opacity as a logit, scales as logs and colour as SH DC coefficients."""
    g = random_gaussians(5)
    save_ply(g, tmp_path / "g.ply")
    raw = (tmp_path / "g.ply").read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode("ascii").splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 5"]
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    assert lines[3:] == [f"property float {n}" for n in names]
    assert list(PLY_PROPERTIES) == names
    rec = np.frombuffer(body, dtype=[(n, "<f4") for n in names])
    assert len(rec) == 5
    gd = g.double().numpy()
    np.testing.assert_allclose(rec["opacity"], np.log(gd[:, 3] / (1 - gd[:, 3])), rtol=1e-5)
    np.testing.assert_allclose(rec["scale_1"], np.log(gd[:, 5]), rtol=1e-5)
    np.testing.assert_allclose(rec["f_dc_2"], (gd[:, 13] - 0.5) / SH_C0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec["rot_0"], gd[:, 7], rtol=1e-5)  # w first, as 3DGS stores it


def test_load_ply_written_by_another_tool(tmp_path):
    """A file laid out like LGM's own export (no normals, properties in its order) loads."""
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
    rec = np.zeros(2, dtype=[(n, "<f4") for n in names])
    rec["x"] = [0.1, -0.2]
    rec["opacity"] = [0.0, 2.0]
    rec["scale_0"] = rec["scale_1"] = rec["scale_2"] = np.log(0.05)
    rec["rot_0"] = 2.0  # unnormalised identity
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 2\n"
    header += "".join(f"property float {n}\n" for n in names) + "end_header\n"
    (tmp_path / "lgm.ply").write_bytes(header.encode() + rec.tobytes())
    g = load_ply(tmp_path / "lgm.ply")
    torch.testing.assert_close(g[:, 3], torch.sigmoid(torch.tensor([0.0, 2.0])))
    torch.testing.assert_close(g[:, 7:11], torch.tensor([[1.0, 0, 0, 0]] * 2))
    torch.testing.assert_close(g[:, 11:], torch.full((2, 3), 0.5))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello", "not a .ply"),
        (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n", "format"),
        (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n", "missing"),
    ],
)
def test_bad_ply_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.ply"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"bad.ply.*{message}"):
        load_ply(path)


def test_truncated_ply(tmp_path):
    save_ply(random_gaussians(10), tmp_path / "g.ply")
    data = (tmp_path / "g.ply").read_bytes()
    (tmp_path / "g.ply").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="truncated"):
        load_ply(tmp_path / "g.ply")
