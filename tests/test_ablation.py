"""eval.ablation's grouping of a row's runs over training seeds."""

import pytest

from eval.ablation import over_seeds, row_name


def test_row_name_strips_only_a_seed_suffix():
    assert row_name("joint_ccm_rgb_s1") == "joint_ccm_rgb"
    assert row_name("joint_s12") == "joint"
    assert row_name("two_stage") == "two_stage"  # "_stage" is not a seed
    assert row_name("joint_sx") == "joint_sx"
    assert row_name("_s1") == "_s1"


def test_over_seeds_means_and_spread_per_split_and_row():
    def run(split, name, psnr, mv=20.0):
        return dict(split=split, run=name, psnr=psnr, mv_psnr=mv, ssim=0.5, lpips=0.2)

    table = [run("seen", "joint_s0", 18.0, 19.0), run("seen", "joint_s1", 20.0, 21.0), run("seen", "two_stage", 17.0),
             run("held-out", "joint_s0", 15.0), run("held-out", "joint_s1", 16.5)]
    rows = {(r["split"], r["row"]): r for r in over_seeds(table)}
    assert list(rows) == [("seen", "joint"), ("seen", "two_stage"), ("held-out", "joint")]
    seen = rows[("seen", "joint")]
    assert seen["seeds"] == 2 and seen["psnr"] == pytest.approx(19.0) and seen["mv_psnr"] == pytest.approx(20.0)
    assert seen["psnr_range"] == "18.00 – 20.00"
    assert rows[("seen", "two_stage")]["seeds"] == 1
    assert rows[("held-out", "joint")]["psnr"] == pytest.approx(15.75)
