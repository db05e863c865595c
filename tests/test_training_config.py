"""Training YAML: ``--set`` assignments, the objective switch, errors that name the file and key."""

from pathlib import Path

import pytest

from training.config import apply_overrides, load_config
from data_paths import REPO

TINY = REPO / "training" / "configs" / "tiny.yaml"


def test_set_assignments_reach_nested_keys_with_yaml_values():
    cfg = load_config(TINY, ["model.overrides.svd_path=runs/ae/svd", "optim.lr=3e-4",
                             "model.overrides.joint_training=false", "objective=reconstruction"])
    assert cfg.model.overrides["svd_path"] == "runs/ae/svd"
    assert cfg.model.overrides["joint_training"] is False
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.objective == "reconstruction"
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("assignment, message", [
    ("optim.no_such_key=1", "no_such_key"),
    ("objective=denoise", "objective must be one of"),
    ("optim.lr", "expected key.path=value"),
    ("seed.inner=1", "seed is not a mapping"),
])
def test_bad_assignments_are_errors_naming_the_file(assignment, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(TINY, [assignment])
    assert "tiny.yaml" in str(err.value)


@pytest.mark.parametrize("name", ["tiny", "tiny_diffusion", "tiny_lgm", "tiny_joint", "full"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "training" / "configs" / f"{name}.yaml")
    assert cfg.objective == ("reconstruction" if name == "tiny_lgm" else "algorithm1")
