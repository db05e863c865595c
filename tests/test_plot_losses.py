"""tools/plot_losses.py: the running mean and the picture of runs' losses.jsonl."""

import json

import numpy as np
import pytest
from PIL import Image

from tools.plot_losses import main, running_mean


def test_running_mean_against_a_direct_loop():
    values = np.random.default_rng(0).normal(size=50)
    want = [values[max(0, i - 6): i + 1].mean() for i in range(50)]
    np.testing.assert_allclose(running_mean(values, 7), want)


def test_picture_of_two_runs_and_missing_inputs_are_named(tmp_path):
    for name, n in (("a", 30), ("b", 12)):
        (tmp_path / name).mkdir()
        rows = [dict(step=i + 1, loss=1.0 / (i + 1), psnr=10.0 + i) for i in range(n)]
        (tmp_path / name / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    main(["--run", f"a={tmp_path / 'a'}", "--run", f"b={tmp_path / 'b'}", "--key", "loss", "--key", "a:psnr",
          "--smooth", "5", "--output", str(out)])
    width, height = Image.open(out).size
    assert width > 1.5 * height  # two panels side by side
    with pytest.raises(SystemExit, match="no column 'nope'"):
        main(["--run", f"b={tmp_path / 'b'}", "--key", "b:nope", "--output", str(out)])
    with pytest.raises(SystemExit, match="no losses.jsonl"):
        main(["--run", f"c={tmp_path / 'c'}", "--output", str(out)])
