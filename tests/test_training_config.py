"""Training YAML: ``--set`` assignments, the objective switch, errors that name the file and key."""


import pytest

from training.config import apply_overrides, load_config, preset_names
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


@pytest.mark.parametrize("assignment, message", [
    ("autoencoder.augment=hue", "autoencoder.augment must be one of"),
    ("autoencoder.init=xavier", "autoencoder.init must be one of"),
    ("optim.schedule=linear", "optim.schedule must be one of"),
])
def test_bad_recipe_keys_are_errors_naming_the_file(assignment, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config("tiny_autoencoder", [assignment])
    assert "tiny_autoencoder.yaml" in str(err.value)


OBJECTIVES = {"tiny_lgm": "reconstruction", "tiny_autoencoder": "autoencoder", "tiny_autoencoder_colour": "autoencoder"}


@pytest.mark.parametrize("name", preset_names())
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.objective == OBJECTIVES.get(name, "algorithm1")


def test_colour_recipe_config_is_the_documented_run():
    """The four keys of the colour recipe (docs/training.md; BENCHMARKS.md's 26.5 dB run:
    ``--latent-channels 32 --augment view --init linear-path --chroma-weight 10 --steps 20000
    --batch 1``, lr 2e-3 cosine to 5 %, no weight decay) and nothing else apart from the demo's."""
    colour, demo = load_config("tiny_autoencoder_colour"), load_config("tiny_autoencoder")
    assert (colour.model.latent_channels, colour.autoencoder.augment, colour.autoencoder.init,
            colour.autoencoder.loss.chroma_weight, colour.max_steps) == (32, "view", "linear-path", 10.0, 20000)
    assert (colour.optim.total_batch, colour.optim.lr, colour.optim.schedule, colour.optim.min_lr_ratio,
            colour.optim.weight_decay, colour.autoencoder.loss.kl_weight) == (1, 2e-3, "cosine", 0.05, 0.0, 1e-6)
    assert colour.optim == demo.optim and colour.data == demo.data
    assert (demo.model.latent_channels, demo.autoencoder.augment, demo.autoencoder.init) == (None, "none", "default")


def test_max_steps_flag_is_shorthand_for_the_config_key():
    from training.main import parse_args

    args = parse_args(["--config", "tiny", "--data", "d", "--output", "o", "--max-steps", "7"])
    assert load_config(args.config, args.assignments).max_steps == 7
    args = parse_args(["--config", "tiny", "--data", "d", "--output", "o", "--max-steps", "0"])
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        load_config(args.config, args.assignments)


def test_lr_schedule_warms_up_then_holds_or_follows_the_cosine():
    """``lr_factor``: linear warmup, then constant (the paper) or the cosine from 1 to the floor
    (the autoencoder's recipe: ``m + (1 - m) (1 + cos(pi t)) / 2``), evaluated by hand here."""
    from training.engine import lr_factor

    assert [lr_factor(s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, warmup_steps=4) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 1000, schedule="cosine", min_lr_ratio=0.05) for s in (0, 250, 500, 1000, 1200)]
    assert cos == pytest.approx([1.0, 0.05 + 0.95 * (1 + 0.5**0.5) / 2, 0.525, 0.05, 0.05])
    warm = [lr_factor(s, 110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0) for s in (9, 10, 60, 110)]
    assert warm == pytest.approx([1.0, 1.0, 0.5, 0.0])
