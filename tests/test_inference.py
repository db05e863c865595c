"""inference.image_to_3d: input preparation (RGBA, RGB on a plain background, refusals) and the CLI
end to end on the tiny checkpoint."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from inference import image_to_3d as i23
from data_paths import REPO


def _disc_rgba(size=96, centre=(30, 60), radius=14):
    """A red disc with a soft edge on a transparent canvas, off-centre."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d = np.hypot(yy - centre[0], xx - centre[1])
    alpha = np.clip(radius + 0.5 - d, 0, 1)
    rgba = np.zeros((size, size, 4), np.float32)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 0.8, 0.1, 0.1, alpha
    return rgba


def _save(path, arr, mode):
    Image.fromarray((arr * 255 + 0.5).astype(np.uint8), mode).save(path)
    return path


def test_rgba_input_keeps_its_alpha(tmp_path):
    src = _disc_rgba()
    rgba = i23.load_rgba(_save(tmp_path / "a.png", src, "RGBA"))
    assert np.abs(rgba[..., 3] - src[..., 3]).max() < 1 / 255 + 1e-6


def test_rgb_on_white_gets_alpha_from_the_background(tmp_path):
    src = _disc_rgba()
    rgb = src[..., :3] * src[..., 3:] + (1 - src[..., 3:])  # over white
    rng = np.random.default_rng(0)
    rgb = np.clip(rgb + rng.normal(0, 0.01, rgb.shape), 0, 1)  # mild sensor noise
    rgba = i23.load_rgba(_save(tmp_path / "w.png", rgb, "RGB"))
    inside, outside = src[..., 3] == 1, src[..., 3] == 0
    assert rgba[..., 3][inside].min() == 1.0
    assert rgba[..., 3][outside].max() == 0.0
    assert np.abs(i23.estimate_background(rgb) - 1.0).max() < 0.02


def test_rgb_photo_without_plain_background_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    photo = np.stack([xx, yy, 0.5 + 0.3 * np.sin(9 * xx * yy)], -1) + rng.normal(0, 0.05, (64, 64, 3))
    path = _save(tmp_path / "photo.png", np.clip(photo, 0, 1), "RGB")
    with pytest.raises(i23.InputImageError, match=r"photo\.png: RGB image without a plain background"):
        i23.load_rgba(path)


def test_recentre_centres_and_scales_like_training_renders():
    out = i23.recentre(_disc_rgba(), size=64, fill=0.7)
    assert out.shape == (64, 64, 4)
    ys, xs = np.nonzero(out[..., 3] > 0.5)
    assert abs((ys.min() + ys.max() + 1) / 2 - 32) <= 1 and abs((xs.min() + xs.max() + 1) / 2 - 32) <= 1
    assert (ys.max() + 1 - ys.min()) == pytest.approx(0.7 * 64, abs=2)
    with pytest.raises(i23.InputImageError, match="alpha mask is empty"):
        i23.recentre(np.zeros((8, 8, 4), np.float32), 64, 0.7)


def test_view_cameras_follow_conventions():
    from common.conventions import DEFAULT_RADIUS, look_at_c2w, spherical_to_position

    c2w, K = i23.view_cameras(8, elevation=10.0, resolution=64)
    assert c2w.shape == (1, 8, 4, 4) and K.shape == (1, 8, 3, 3)
    ref = look_at_c2w(spherical_to_position(10.0, 90.0, DEFAULT_RADIUS))
    assert np.allclose(c2w[0, 2].numpy(), ref, atol=1e-6)
    pos0 = c2w[0, 0, :3, 3].numpy()
    assert pos0[0] > 0 and abs(pos0[1]) < 1e-6  # condition camera on +X
    assert float(K[0, 0, 0, 2]) == 32.0


def test_cli_refuses_photo_with_a_clear_message(tmp_path):
    rng = np.random.default_rng(2)
    path = _save(tmp_path / "photo.png", rng.uniform(0, 1, (48, 48, 3)), "RGB")
    res = subprocess.run(
        [sys.executable, "-m", "inference.image_to_3d", "--image", str(path), "--checkpoint",
         str(tmp_path), "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "without a plain background" in res.stderr and "RGBA" in res.stderr
    assert not (tmp_path / "out").exists()


def _read_mp4(path):
    """Decoded frames [F, H, W, 3] uint8 of a video, with imageio-ffmpeg."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader])


def _run_cli(image, checkpoint, out):
    return subprocess.run(
        [sys.executable, "-m", "inference.image_to_3d", "--image", str(image), "--checkpoint",
         str(checkpoint), "--output", str(out), "--steps", "1", "--orbit-frames", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_end_to_end_rgba_and_rgb_on_white(tiny_checkpoint, tmp_path):
    from model.gaussians_ply import load_ply

    src = _disc_rgba(128, (50, 70), 30)
    inputs = {
        "rgba": _save(tmp_path / "in_rgba.png", src, "RGBA"),
        "white": _save(tmp_path / "in_white.png",
                       src[..., :3] * src[..., 3:] + (1 - src[..., 3:]), "RGB"),  # fmt: skip
    }
    for name, image in inputs.items():
        out = tmp_path / name
        res = _run_cli(image, tiny_checkpoint, out)
        assert res.returncode == 0, res.stderr[-3000:]
        views = np.asarray(Image.open(out / "views.png"))
        res_px = np.asarray(Image.open(out / "input.png")).shape[0]
        assert views.shape == (2 * res_px, 4 * res_px, 3)
        g = load_ply(out / "gaussians.ply")
        assert g.ndim == 2 and g.shape[1] == 14 and torch.isfinite(g).all()
        assert _read_mp4(out / "orbit.mp4").shape == (4, res_px, res_px, 3)
        # a barely trained model's Gaussians may be too faint for a surface: then it says so
        assert (out / "mesh.glb").is_file() or "warning: no mesh.glb" in res.stderr
    # The background estimated from the white picture gives the same condition image as RGBA.
    prepared = [np.asarray(Image.open(tmp_path / n / "input.png"), float) for n in inputs]
    assert np.abs(prepared[0] - prepared[1]).mean() < 3.0


def test_orbit_video_of_gaussians_round_trips(tmp_path):
    """A red Gaussian at +X and a blue one at -X: the orbit sees red in front first, then blue."""
    g = torch.zeros(1, 2, 14)
    g[0, :, 0] = torch.tensor([0.3, -0.3])
    g[0, :, 3] = 0.95  # opacity
    g[0, :, 4:7] = 0.12  # scale
    g[0, :, 7] = 1.0  # identity rotation (w)
    g[0, 0, 11:14] = torch.tensor([1.0, 0.0, 0.0])
    g[0, 1, 11:14] = torch.tensor([0.0, 0.0, 1.0])
    frames = i23.render_orbit(g, elevation=0.0, resolution=32, frames=4, background=1.0)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    centre = frames[:, 12:20, 12:20].reshape(4, -1, 3).mean(1)
    assert centre[0, 0] > centre[0, 2] + 50  # azimuth 0: camera on +X sees the red one
    assert centre[2, 2] > centre[2, 0] + 50  # azimuth 180: the blue one
    i23.write_mp4(tmp_path / "orbit.mp4", frames, fps=4)
    back = _read_mp4(tmp_path / "orbit.mp4")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12  # lossy, but the same video
    assert not list(tmp_path.glob(".orbit*"))  # no temporary left behind


def test_cli_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    path = _save(tmp_path / "disc.png", _disc_rgba(), "RGBA")
    res = subprocess.run(
        [sys.executable, "-m", "inference.image_to_3d", "--image", str(path), "--checkpoint",
         str(tmp_path / "nothing"), "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "nothing" in res.stderr and "ouroboros_config.json" in res.stderr
