"""Per-model gradient norms and clipping (training/engine.py), on plain parameters: the same
DeepSpeed accessors (safe_get_full_grad / safe_set_full_grad) read and write ``p.grad`` there."""

import pytest
import torch

from training.engine import clip_per_model, group_grad_norms


def _groups():
    big = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    small = [torch.nn.Parameter(torch.zeros(4))]
    big[0].grad = torch.tensor([6.0, 0.0, 0.0])
    big[1].grad = torch.tensor([[0.0, 8.0], [0.0, 0.0]])  # group norm 10
    small[0].grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # group norm 0.5
    return {"lgm": big, "denoiser": small}


def test_group_norms_are_the_l2_norms_of_each_group():
    norms = group_grad_norms(_groups())
    assert norms == pytest.approx({"lgm": 10.0, "denoiser": 0.5})


def test_per_model_clipping_leaves_the_small_group_alone():
    groups = _groups()
    clip_per_model(groups, group_grad_norms(groups), max_norm=1.0)
    after = group_grad_norms(groups)
    assert after["lgm"] == pytest.approx(1.0, rel=1e-5)
    assert after["denoiser"] == pytest.approx(0.5)  # a global clip would have made it 0.05
    assert groups["lgm"][0].grad[0] == pytest.approx(0.6, rel=1e-5)  # direction kept


def test_per_model_clipping_respects_the_loss_scale():
    """fp16 gradients carry the loss scale: the threshold scales with it."""
    groups = _groups()
    for p in groups["lgm"] + groups["denoiser"]:
        p.grad *= 1024.0
    clip_per_model(groups, group_grad_norms(groups), max_norm=1.0, loss_scale=1024.0)
    after = group_grad_norms(groups)
    assert after["lgm"] / 1024.0 == pytest.approx(1.0, rel=1e-5)
    assert after["denoiser"] / 1024.0 == pytest.approx(0.5)
