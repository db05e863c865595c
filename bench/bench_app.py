"""The browser app's latency and memory: time from the click to the first streamed step and to
all outputs, and the server's peak memory during runs.

    python bench/bench_app.py [--checkpoint DIR] [--runs 3] [--browser] [--screenshot PNG]

Without ``--checkpoint`` it serves the demo's tiny architecture (``model.config.preset("tiny")``:
64 px, 8 views, LGM tiny, CCM + RGB feedback, 25 steps), untrained, written with
``save_pretrained``: the same computation as the demo's export (outputs/demo/train/export), whose
weights only change the pictures. The server is ``python -m inference.app`` on a free loopback
port; each run is the endpoint ``/generate`` through ``gradio_client`` with the page's defaults
(the checkpoint's steps and guidance, feedback on, 60 orbit frames, the mesh), measured from the
request (the click) to the first streamed step and to the last output. ``--browser`` adds one run
in headless Chromium (Selenium): click to the first "Step 1/" caption and to the 3D viewer's
canvas. Peak memory: the server process's VmHWM (/proc), before and after the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--browser", action="store_true")
    p.add_argument("--screenshot", type=Path, default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_app-"))
    ckpt = args.checkpoint
    if ckpt is None:
        import torch

        from model.config import preset
        from model.ouroboros import Ouroboros3D

        torch.manual_seed(0)
        ckpt = tmp / "tiny_export"
        Ouroboros3D.from_config(preset("tiny")).save_pretrained(ckpt)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), GRADIO_ANALYTICS_ENABLED="False")
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "inference.app", "--checkpoint", str(ckpt), "--port", str(port),
                               "--work-dir", str(tmp / "work")], cwd=REPO, env=env,
                              stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if server.poll() is not None:
                print((tmp / "server.log").read_text()[-3000:])
                return 1
            time.sleep(0.5)
    results = dict(checkpoint=str(ckpt), serve_s=round(time.perf_counter() - start, 1),
                   idle_rss_peak_mb=round(vm_hwm_mb(server.pid)), runs=[])  # fmt: skip
    from gradio_client import Client, handle_file

    from inference.app import example_images

    image = example_images()[1]
    client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    defaults = {prm["parameter_name"]: prm["parameter_default"] for prm in info}
    try:
        for run in range(args.runs):
            t0 = time.perf_counter()
            job = client.submit(handle_file(image), defaults["fill"], run, False, defaults["steps"],
                                defaults["guidance_min"], defaults["guidance_max"], True, 0.0,
                                defaults["orbit_frames"], True, api_name="/generate")  # fmt: skip
            first = None
            while not job.done():
                if first is None and job.outputs():
                    first = time.perf_counter() - t0
                time.sleep(0.02)
            final = job.result()
            total = time.perf_counter() - t0
            (archive,) = [f for f in final[6] if f.endswith(".zip")]
            with zipfile.ZipFile(archive) as zf:
                server_timings = json.loads(zf.read("manifest.json"))["timings_s"]
            results["runs"].append(dict(seed=run, steps=defaults["steps"], first_step_s=round(first or total, 2),
                                        all_outputs_s=round(total, 2), server_s=server_timings))  # fmt: skip
            print(json.dumps(results["runs"][-1]), flush=True)
        if args.browser:
            results["browser"] = browser_run(url, image, args.screenshot)
            print(json.dumps(results["browser"]), flush=True)
        results["peak_rss_mb"] = round(vm_hwm_mb(server.pid))
    finally:
        client.close()
        server.terminate()
        server.wait(30)
    print(json.dumps(results, indent=1))
    return 0


def browser_run(url: str, image: str, screenshot: Path | None) -> dict:
    import shutil

    import numpy as np
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2300",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 600, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]")).send_keys(image)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        t0 = time.perf_counter()
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "Step 1/" in d.find_element(By.ID, "step_caption").text)
        first = time.perf_counter() - t0
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gaussians canvas")
                   and d.find_elements(By.CSS_SELECTOR, "#video video")
                   and d.find_elements(By.CSS_SELECTOR, "#mesh canvas")
                   and "Seed" in d.find_element(By.ID, "summary").text)  # fmt: skip
        total = time.perf_counter() - t0
        if screenshot is not None:
            import io

            from PIL import Image

            for viewer in ("#gaussians canvas", "#mesh canvas"):
                canvas = driver.find_element(By.CSS_SELECTOR, viewer)
                WebDriverWait(driver, 60, poll_frequency=1).until(
                    lambda d: np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).std() > 5)
            time.sleep(3)
            driver.save_screenshot(str(screenshot))
        return dict(click_to_first_step_s=round(first, 2), click_to_outputs_s=round(total, 2))
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
