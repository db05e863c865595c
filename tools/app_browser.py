"""The browser app driven for real: served on a free loopback port, opened in a headless Chromium.

Used by tests/test_app.py (its browser test) and, as a command, to retake the README's picture of
the app after a retrain (docs/app.md)::

    python tools/app_browser.py --output docs/images/app.png            # the shipped stages
    python tools/app_browser.py --checkpoint outputs/demo/train/export --output app.png

It starts ``python -m inference.app`` (the checkpoint's own denoising steps), uploads one of the
app's example images, presses Generate, waits for the views, the video and both 3D viewers to be
drawn, and saves a screenshot of the page. Needs Debian's ``chromium`` and ``chromium-driver``
(``.ci/run`` installs them) and the ``test`` extra (selenium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WINDOW = (1400, 2300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_env() -> dict:
    """One OpenMP thread, no analytics, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip


@contextmanager
def serve(app_args: list[str], log_path: Path, start_timeout_s: float = 240) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m inference.app <app_args> --port <free>`` until the block ends: (URL, process).

    Raises:
        RuntimeError: the app exited before serving, or did not serve in ``start_timeout_s``
            (with the end of its log, ``log_path``).
    """
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "inference.app", *app_args, "--port", str(port)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=app_env())  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the app exited {proc.returncode} before serving:\n{log.read()[-4000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not serve {url} within {start_timeout_s} s (log: {log_path})")
                time.sleep(1)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def chromium():
    """A headless Chromium through Selenium, WebGL through SwiftShader (no GPU needed).

    Raises:
        RuntimeError: Debian's chromium / chromium-driver or selenium are missing (what to install).
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise RuntimeError("selenium is not installed (the `test` extra)") from err
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        raise RuntimeError("Debian's chromium and chromium-driver are not installed (.ci/run installs them: "
                           "apt-get install -y chromium chromium-driver)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def canvas_is_drawn(png: bytes) -> bool:
    """A viewer's canvas shows something: not one flat colour, many distinct colours."""
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return img.std() > 5.0 and len(np.unique(img.reshape(-1, 3).astype(np.uint8), axis=0)) > 50


def generate_in_page(driver, url: str, image: str, timeout_s: float = 180) -> None:
    """Open the app, upload ``image``, press Generate and wait until the views, the video and both
    3D viewers (Gaussians, mesh) are shown and drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_page_load_timeout(120)
    driver.get(url)
    wait = WebDriverWait(driver, timeout_s, poll_frequency=0.5)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    upload.send_keys(image)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gaussians canvas")
               and d.find_elements(By.CSS_SELECTOR, "#video video")
               and len(d.find_elements(By.CSS_SELECTOR, "#views img")) >= 4)  # fmt: skip
    # the viewers draw a few frames after loading, WebGL through SwiftShader; the mesh viewer is
    # set by the event chained after the run
    for viewer in ("#gaussians canvas", "#mesh canvas"):
        canvas = WebDriverWait(driver, 60, poll_frequency=1).until(lambda d: d.find_element(By.CSS_SELECTOR, viewer))
        WebDriverWait(driver, 60, poll_frequency=1).until(lambda d: canvas_is_drawn(canvas.screenshot_as_png))
    time.sleep(2)


def main(argv=None) -> None:
    from inference.app import example_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="tiny", help="what the app serves (default: the shipped stages)")
    p.add_argument("--example", type=int, default=1, help="which of the app's example images to upload")
    p.add_argument("--output", type=Path, required=True, help="the screenshot (PNG)")
    args = p.parse_args(argv)
    examples = example_images()
    if not 0 <= args.example < len(examples):
        raise SystemExit(f"--example {args.example}: the app has {len(examples)} examples")
    with tempfile.TemporaryDirectory() as tmp_dir:
        work, log = Path(tmp_dir) / "work", Path(tmp_dir) / "app.log"
        with serve(["--checkpoint", args.checkpoint, "--work-dir", str(work)], log) as (url, _):
            driver = chromium()
            try:
                print(f"{url}: generating from {Path(examples[args.example]).name} ...", flush=True)
                generate_in_page(driver, url, examples[args.example], timeout_s=600)
                args.output.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.output.with_name(args.output.name + ".tmp.png")
                driver.save_screenshot(str(tmp))
                os.replace(tmp, args.output)
            finally:
                driver.quit()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
