"""inference.app: the browser app, served for real on a free loopback port by the tests.

A tiny untrained Ouroboros3D (tests/tiny_helpers.py: 32 px, 4 views, 2 steps) saved with
``save_pretrained`` and served by ``python -m inference.app`` (which loads it with
``from_pretrained``); ``gradio_client`` drives the named endpoint ``/generate`` against the CLI
``python -m inference.image_to_3d`` and with bad inputs; Debian's chromium + chromium-driver, driven
by Selenium, load the page, upload an example, run it and look at the 3D viewer's canvas.
"""

import hashlib
import json
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from data_paths import REPO
from PIL import Image

from inference import app as app_mod
from tools.app_browser import app_env, chromium, free_port, generate_in_page, serve

pytest.importorskip("gradio_client", reason="the app's tests need the `app` extra (gradio, gradio_client)")

STEPS = 2
SERVER_START_S = 240


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny model, 2 denoising steps by default, written by ``save_pretrained``."""
    import dataclasses

    from tiny_helpers import tiny_model

    model = tiny_model(seed=0)
    model.config = dataclasses.replace(model.config, edm=dataclasses.replace(model.config.edm, num_steps=STEPS))
    path = tmp_path_factory.mktemp("app_ckpt") / "export"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``python -m inference.app`` on a free loopback port (``tools.app_browser.serve``); its URL,
    work folder and process."""
    work = tmp_path_factory.mktemp("app_work")
    try:
        with serve(["--checkpoint", str(checkpoint), "--work-dir", str(work), "--max-queue", "4"],
                   work.parent / "server.log", SERVER_START_S) as (url, proc):
            yield dict(url=url, work=work, proc=proc)
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture
def client(server, tmp_path):
    from gradio_client import Client

    c = Client(server["url"], verbose=False, download_files=str(tmp_path / "downloads"))
    yield c
    c.close()


def _disc(size=96, centre=(40, 52), radius=22) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    rgba = np.zeros((size, size, 4), np.float32)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 0.8, 0.3, 0.1
    rgba[..., 3] = np.clip(radius + 0.5 - np.hypot(yy - centre[0], xx - centre[1]), 0, 1)
    return rgba


def _save(path, arr, mode="RGBA") -> Path:
    Image.fromarray((arr * 255 + 0.5).astype(np.uint8), mode).save(path)
    return path


def _generate(client, image, seed=0, randomize=False, steps=STEPS, fill=0.7, guidance=(1.0, 3.0),
              feedback=True, elevation=0.0, orbit_frames=4, mesh=True, submit=False):  # fmt: skip
    from gradio_client import handle_file

    args = (handle_file(str(image)), fill, seed, randomize, steps, guidance[0], guidance[1], feedback, elevation,
            orbit_frames, mesh)  # fmt: skip
    if submit:
        return client.submit(*args, api_name="/generate")
    return client.predict(*args, api_name="/generate")


def _claiming(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header (IHDR, CRC fixed) claims ``width`` x ``height``."""
    _save(path, _disc(8, (4, 4), 3))
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def _by_name(files) -> dict[str, Path]:
    return {Path(f).name: Path(f) for f in files}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ helpers, no server
def test_viewer_frame_is_the_input_camera_upright():
    """World +Z (up) becomes -y (up on screen in OpenCV axes), the input camera's direction +X
    becomes -z (towards the viewer); rotations turn with the centres."""
    from model.gaussians import quaternion_to_matrix

    g = torch.zeros(3, 14)
    g[:, 0:3] = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    g[:, 7:11] = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    g[:, 11:14] = torch.rand(3, 3)
    out = app_mod.gaussians_for_viewer(g)
    assert torch.allclose(out[:, 0:3], torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    R = torch.tensor(app_mod.WORLD_TO_INPUT_CAMERA, dtype=torch.float32)
    assert torch.allclose(quaternion_to_matrix(out[:, 7:11]), R @ quaternion_to_matrix(g[:, 7:11]), atol=1e-5)
    assert torch.equal(out[:, 3:7], g[:, 3:7]) and torch.equal(out[:, 11:], g[:, 11:])


def test_preview_shows_transparency_on_a_checkerboard_and_the_step_picture_layout():
    prepared = np.zeros((32, 32, 4), np.float32)
    prepared[8:24, 8:24] = (1.0, 0.0, 0.0, 1.0)
    img = app_mod.preview_image(prepared)
    assert img.shape == (256, 256, 3)
    assert tuple(img[128, 128]) == (255, 0, 0)
    corner = img[:64, :64].reshape(-1, 3)
    assert {tuple(c) for c in corner} == {(204, 204, 204), (153, 153, 153)}  # both squares show

    views = torch.rand(4, 3, 32, 32)
    renders = dict(rgb=torch.zeros(4, 3, 32, 32), ccm=torch.ones(4, 3, 32, 32))
    pic = app_mod.step_picture(views, renders, tile=64)
    assert pic.shape == (3 * 64 + 8, 4 * 64, 3)
    assert pic[64 + 4 :][:64].max() == 0 and pic[-64:].min() == 255  # RGB row, then CCM row
    grey = app_mod.step_picture(views, None, tile=64)
    assert (grey[-64:] == 128).all()


# ------------------------------------------------------------------ the served app
def test_checkpoint_missing_or_corrupt_is_refused_before_serving(checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt_export"
    shutil.copytree(checkpoint, corrupt)
    weights = sorted((corrupt / "unet").glob("*.safetensors"))
    assert weights
    weights[0].write_bytes(weights[0].read_bytes()[:100])  # truncated
    for folder in (tmp_path / "no_such_export", corrupt):
        port = free_port()
        res = subprocess.run([sys.executable, "-m", "inference.app", "--checkpoint", str(folder), "--port", str(port)],
                             cwd=REPO, capture_output=True, text=True, timeout=300, env=app_env())  # fmt: skip
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"checkpoint folder {folder}" in res.stderr
        assert "Running on" not in res.stdout + res.stderr
        with socket.socket() as sock:  # nothing listens on the port
            assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_api_returns_the_cli_files_and_streams_each_step(server, client, checkpoint, tmp_path):
    image = _save(tmp_path / "disc.png", _disc())
    job = _generate(client, image, seed=7, submit=True)
    final = job.result(timeout=300)
    outputs = job.outputs()
    seed_used, _, _, gallery, video, splat, downloads, summary = final
    assert seed_used == 7
    # one streamed update per denoising step (the step picture: views, RGB and CCM feedback), then the result
    steps = [o for o in outputs if isinstance(o[2], str) and o[2].startswith("Step ")]
    assert [o[2].split()[1] for o in steps] == [f"{i + 1}/{STEPS}" for i in range(STEPS)]
    for o in steps:
        pic = np.asarray(Image.open(o[1]))
        assert pic.shape == (3 * app_mod.TILE + 8, 4 * app_mod.TILE, 3)
        assert pic[-app_mod.TILE :].std() > 1.0  # the CCM renders of the feedback, not the grey stand-in
    assert len(gallery) == 4 and Path(video).suffix == ".mp4" and Path(splat).suffix == ".ply"

    files = _by_name(downloads)
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "inference.image_to_3d", "--image", str(image), "--checkpoint",
                          str(checkpoint), "--output", str(out), "--seed", "7", "--steps", str(STEPS),
                          "--guidance", "1", "3", "--orbit-frames", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=app_env())  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    cli_files = sorted(p.name for p in out.iterdir())
    assert cli_files and set(cli_files) <= set(files)
    for name in cli_files:
        assert _sha(files[name]) == _sha(out / name), f"{name} differs from the CLI's"
    assert _sha(video) == _sha(out / "orbit.mp4")

    archive = [f for n, f in files.items() if n.endswith(".zip")]
    assert len(archive) == 1
    with zipfile.ZipFile(archive[0]) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        assert zf.read("views.png") == (out / "views.png").read_bytes()
    assert set(cli_files) <= names and f"steps/step_{STEPS - 1:03d}.png" in names
    assert manifest["seed"] == 7 and manifest["settings"]["steps"] == STEPS
    assert manifest["settings"]["guidance"] == [1.0, 3.0]
    assert manifest["checkpoint"]["sha256"] == app_mod.hash_folder(checkpoint)
    assert manifest["checkpoint"]["path"] == str(checkpoint.resolve())
    from importlib.metadata import version

    assert manifest["versions"]["gradio"] == version("gradio") and manifest["versions"]["torch"] == version("torch")
    assert manifest["timings_s"]["total_s"] > 0 and "first_step_s" in manifest["timings_s"]
    assert "Seed 7" in summary


@pytest.mark.slow
def test_seed_randomized_is_returned_and_reproduces_the_views(server, client, tmp_path):
    image = _save(tmp_path / "disc.png", _disc())
    first = _generate(client, image, randomize=True, mesh=False)
    seed = first[0]
    assert isinstance(seed, int) and seed >= 0
    again = _generate(client, image, seed=seed, mesh=False)
    other = _generate(client, image, seed=seed + 1, mesh=False)
    assert again[0] == seed
    views = [_by_name(r[6])["views.png"] for r in (first, again, other)]
    assert _sha(views[0]) == _sha(views[1])  # same seed, same checkpoint: the same bytes
    assert _sha(views[0]) != _sha(views[2])  # and the seed matters


@pytest.mark.slow
def test_one_generation_at_a_time(server, tmp_path):
    """Two sessions click at once: both are served, and their runs (start to files written, the
    manifests' Unix times) do not overlap."""
    from gradio_client import Client

    image = _save(tmp_path / "disc.png", _disc())
    clients = [Client(server["url"], verbose=False, download_files=str(tmp_path / f"d{i}")) for i in range(2)]
    try:
        jobs = [_generate(c, image, seed=i, mesh=False, submit=True) for i, c in enumerate(clients)]
        spans = []
        for job in jobs:
            (archive,) = [f for f in job.result(timeout=300)[6] if f.endswith(".zip")]
            with zipfile.ZipFile(archive) as zf:
                manifest = json.loads(zf.read("manifest.json"))
            spans.append((manifest["started_at"], manifest["finished_at"]))
        (s0, e0), (s1, e1) = sorted(spans)
        assert s0 < e0 <= s1 < e1, spans
    finally:
        for c in clients:
            c.close()


@pytest.mark.slow
def test_bad_inputs_get_clear_messages_and_the_server_keeps_serving(server, client, tmp_path):
    from gradio_client.exceptions import AppError

    rng = np.random.default_rng(0)
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    clear = _save(tmp_path / "clear.png", np.zeros((64, 64, 4), np.float32))
    photo = _save(tmp_path / "photo.png", rng.uniform(0, 1, (64, 64, 3)), "RGB")
    cases = {
        text: "notes.png: cannot read the image",
        empty: "empty.png: cannot read the image",
        clear: "clear.png: no object found (the alpha mask is empty)",
        photo: "photo.png: RGB image without a plain background",
        # PNGs whose headers claim 81 and 1600 megapixels: refused before they are decoded
        _claiming(tmp_path / "huge.png", 9000, 9000): "huge.png: the image is 9000x9000 pixels, more than",
        _claiming(tmp_path / "bomb.png", 40000, 40000): "bomb.png: the image is too large to read safely",
    }
    for path, message in cases.items():
        with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _generate(client, path, steps=1, mesh=False)
        assert server["proc"].poll() is None
    with pytest.raises(AppError, match="0.05 is less than minimum value 0.1"):  # the slider checks it
        _generate(client, _save(tmp_path / "ok.png", _disc()), fill=0.05, steps=1)

    # a large picture is downscaled, with a note, and runs
    big = np.zeros((2600, 3000, 4), np.float32)
    big[1000:1600, 1200:2000] = (0.2, 0.5, 0.9, 1.0)
    result = _generate(client, _save(tmp_path / "big.png", big), steps=1, mesh=False)
    assert "downscaled to 2048x1775" in result[7]
    assert _by_name(result[6])["views.png"].is_file()
    # and the next ordinary request works
    result = _generate(client, tmp_path / "ok.png", steps=1, mesh=False)
    assert "views.png" in _by_name(result[6])


@pytest.mark.slow
def test_browser_uploads_runs_and_shows_the_3d(server, tmp_path):
    pytest.importorskip("selenium", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    example = app_mod.example_images()[1]
    before = set(server["work"].iterdir())
    try:
        driver = chromium()
    except RuntimeError as err:
        pytest.skip(str(err))
    try:
        generate_in_page(driver, server["url"], example)
        assert "Seed 0" in driver.find_element(By.ID, "summary").text
        assert "Step 2/2" in driver.find_element(By.ID, "step_caption").text
        assert "no mesh.glb" not in driver.find_element(By.ID, "summary").text
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        sessions = set(server["work"].iterdir()) - before
        assert len(sessions) == 1 and list(next(iter(sessions)).glob("run-*/views.png"))
        driver.get("about:blank")  # the session ends: its folder goes
        WebDriverWait(driver, 60, poll_frequency=1).until(lambda d: not next(iter(sessions)).exists())
    finally:
        driver.quit()
