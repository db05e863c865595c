"""Gaussian layout and rotation maths (model/gaussians.py)."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from model.gaussians import covariance_3d, matrix_to_quaternion, quaternion_multiply, quaternion_to_matrix


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


