"""The 3DGS .ply file (model/gaussians_ply.py) against files written independently with
plyfile in the INRIA layout (graphdeco-inria/gaussian-splatting's save_ply) and LGM's."""

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement, PlyListProperty

from model.gaussians import SH_C0
from model.gaussians_ply import load_ply, save_ply
from tests.test_gaussians import random_gaussians

INRIA = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *(f"f_rest_{i}" for i in range(45)),
         "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip
LGM = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
       "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip


def _write(path, names, fill, extra_elements=(), text=False, dtype="f4"):
    rec = np.zeros(len(next(iter(fill.values()))), dtype=[(n, dtype) for n in names])
    for k, v in fill.items():
        rec[k] = v
    PlyData([PlyElement.describe(rec, "vertex"), *extra_elements], text=text).write(str(path))


def _pre_activation(g):
    """What INRIA's save_ply stores for activated Gaussians ``g`` [N, 14] (float64 numpy)."""
    g = g.double().numpy()
    return {"x": g[:, 0], "y": g[:, 1], "z": g[:, 2], "opacity": np.log(g[:, 3] / (1 - g[:, 3])),
            **{f"scale_{i}": np.log(g[:, 4 + i]) for i in range(3)},
            **{f"rot_{i}": g[:, 7 + i] for i in range(4)},
            **{f"f_dc_{i}": (g[:, 11 + i] - 0.5) / SH_C0 for i in range(3)}}  # fmt: skip


def test_ours_round_trips_and_is_the_inria_sh3_layout_for_plyfile(tmp_path):
    g = random_gaussians(257)
    save_ply(g, tmp_path / "g.ply")
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed
    torch.testing.assert_close(load_ply(tmp_path / "g.ply"), g, atol=2e-5, rtol=1e-5)
    ply = PlyData.read(str(tmp_path / "g.ply"))  # as INRIA's load_ply and LGM's reader read it
    assert [e.name for e in ply.elements] == ["vertex"] and ply.byte_order == "<"
    v = ply["vertex"]
    assert [p.name for p in v.properties] == INRIA
    assert all(p.val_dtype in ("f4", "float32") for p in v.properties)
    want = _pre_activation(g)
    for name, values in want.items():
        np.testing.assert_allclose(v[name], values, rtol=1e-5, atol=1e-5, err_msg=name)
    # INRIA's loader reshapes f_rest to [N, 3, (max_sh_degree + 1)^2 - 1] with degree 3
    extra = np.stack([v[f"f_rest_{i}"] for i in range(45)], 1).reshape(-1, 3, 15)
    assert extra.shape == (257, 3, 15) and not extra.any()


def test_reads_an_inria_file_written_by_plyfile_keeping_dc_and_saying_sh_was_dropped(tmp_path):
    g = random_gaussians(40, seed=3)
    fill = _pre_activation(g) | {"nx": np.ones(40)}
    fill["f_rest_7"] = np.full(40, 0.3)
    _write(tmp_path / "inria.ply", INRIA, fill)
    with pytest.warns(UserWarning, match=r"inria\.ply: SH bands 1\.\.3 .*dropped"):
        back = load_ply(tmp_path / "inria.ply")
    torch.testing.assert_close(back, g, atol=2e-5, rtol=1e-5)


def test_reads_lgm_and_ascii_files(tmp_path):
    fill = {n: np.zeros(2) for n in LGM} | {"x": [0.1, -0.2], "opacity": [0.0, 2.0], "rot_0": [2.0, 2.0]}
    fill |= {f"scale_{i}": np.log([0.05, 0.05]) for i in range(3)}
    for text in (False, True):
        _write(tmp_path / "lgm.ply", LGM, fill, text=text)
        g = load_ply(tmp_path / "lgm.ply")
        torch.testing.assert_close(g[:, 0], torch.tensor([0.1, -0.2]))
        torch.testing.assert_close(g[:, 3], torch.sigmoid(torch.tensor([0.0, 2.0])))
        torch.testing.assert_close(g[:, 4:7], torch.full((2, 3), 0.05))
        torch.testing.assert_close(g[:, 7:11], torch.tensor([[1.0, 0, 0, 0]] * 2))  # normalised
        torch.testing.assert_close(g[:, 11:], torch.full((2, 3), 0.5))


def _faces():
    faces = np.array([([0, 1, 2],)], dtype=[("vertex_indices", "i4", (3,))])
    return PlyElement.describe(faces, "face")


@pytest.mark.parametrize("case, message", [
    ("garbage", "not a readable .ply"),
    ("missing", r"missing properties \['opacity'"),
    ("double", "'x' is float64|'x' is f8|'x' is double"),
    ("element", r"exactly one 'vertex' element.*'face'"),
    ("unknown", r"unknown properties \['red'\]"),
    ("rest", "f_rest_\\* properties is no SH degree"),
    ("truncated", "not a readable .ply"),
])  # fmt: skip
def test_bad_files_give_errors_naming_the_file(tmp_path, case, message):
    path = tmp_path / "bad.ply"
    fill = {n: np.zeros(3) for n in LGM}
    if case == "garbage":
        path.write_bytes(b"hello")
    elif case == "missing":
        _write(path, [n for n in LGM if n != "opacity"], {"x": np.zeros(3)})
    elif case == "double":
        _write(path, LGM, fill, dtype="f8")
    elif case == "element":
        _write(path, LGM, fill, extra_elements=[_faces()])
    elif case == "unknown":
        _write(path, [*LGM, "red"], fill)
    elif case == "rest":
        _write(path, [*LGM, "f_rest_0", "f_rest_1"], fill)
    elif case == "truncated":
        save_ply(random_gaussians(10), path)
        path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"bad.ply.*({message})"):
        load_ply(path)


def test_list_properties_are_refused(tmp_path):
    rec = np.array([(0.0, [1.0, 2.0])] * 2, dtype=[("x", "f4"), ("y", "O")])
    rec["y"] = [np.array([1.0, 2.0], "f4")] * 2
    el = PlyElement.describe(rec, "vertex", val_types={"y": "f4"}, len_types={"y": "u1"})
    assert isinstance(el.properties[1], PlyListProperty)
    PlyData([el]).write(str(tmp_path / "list.ply"))
    with pytest.raises(ValueError, match=r"list\.ply: property 'y' is a list"):
        load_ply(tmp_path / "list.ply")
