#!/usr/bin/env python
"""A small mutation run: break the code on purpose, one behaviour at a time, and see whether the
tests notice (``make mutation``; outside CI: each mutant costs one pytest start, 20-90 s here).

Each mutant replaces ONE exact snippet of a source file (it must occur exactly once, so that a
stale mutant is reported instead of silently doing nothing), runs the tests that should catch
it, and restores the file. A mutant is *killed* when a test fails (or the module no longer
imports), *survives* when every selected test passes. The failing tests are recorded, so the
table says which test kills what.

    python tools/mutation.py                 # every mutant, report on stdout
    python tools/mutation.py --only ouroboros.clean_pass_removed edm.c_out_sign
    python tools/mutation.py --file model/edm.py --report docs/mutation.md

The source is restored after each mutant even on Ctrl-C; a copy of the original is kept in
``.mutation-backup/`` while a mutant is applied, and a run refuses to start while one is there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKUP = REPO / ".mutation-backup"

A1 = "tests/test_algorithm1_composed.py"
A2 = "tests/test_sampler_oracle.py"
GRAD = "tests/test_gradients.py"
ALGOS = "tests/test_algorithms.py"
EDM = "tests/test_edm.py"
LGM = "tests/test_lgm.py"
CONV = "tests/test_conventions.py"
CAMS = "tests/test_cameras.py"

OURO = "model/ouroboros.py"
SAMP = "model/sampling.py"
EDMF = "model/edm.py"
COND = "model/conditioning.py"
LOSS = "model/lgm/loss.py"
CONVF = "common/conventions.py"


_A1 = A1 + "::"
_A2 = A2 + "::"


@dataclass
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    note: str = ""


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- Algorithm 1 (issue 12's list first)
    M("ouroboros.clean_pass_removed", OURO, "if cfg.clean_recon_pass:", "if False:", (A1,)),
    M("ouroboros.clean_pass_at_noisy_sigma", OURO,
      "clean_c_noise = edm.c_noise(sigma.new_full((B,), cfg.edm.sigma_min))", "clean_c_noise = edm.c_noise(sigma)", (A1,)),
    M("ouroboros.clean_pass_at_time_zero", OURO,
      "clean_c_noise = edm.c_noise(sigma.new_full((B,), cfg.edm.sigma_min))", "clean_c_noise = sigma.new_zeros((B,))", (A1,)),
    M("ouroboros.lpips_dropped", OURO, "loss = loss_diffusion + recon_mse + cfg.lpips_weight * recon_lpips",
      "loss = loss_diffusion + recon_mse", (A1,)),
    M("ouroboros.lpips_detached", OURO, "loss = loss_diffusion + recon_mse + cfg.lpips_weight * recon_lpips",
      "loss = loss_diffusion + recon_mse + cfg.lpips_weight * recon_lpips.detach()", (A1,)),
    M("ouroboros.lpips_unweighted", OURO, "loss = loss_diffusion + recon_mse + cfg.lpips_weight * recon_lpips",
      "loss = loss_diffusion + recon_mse + recon_lpips", (A1,)),
    M("ouroboros.dropout_not_applied_to_embedding", OURO,
      "embedding = embedding * (~drop_embedding).to(embedding.dtype)[:, None, None]", "embedding = embedding", (A1,)),
    M("ouroboros.dropout_not_applied_to_latent", OURO,
      "cond_latent = cond_latent * (~drop_latent).to(cond_latent.dtype)[:, None, None, None]", "cond_latent = cond_latent", (A1,)),
    M("ouroboros.dropout_masks_swapped", OURO, "(~drop_embedding).to(embedding.dtype)", "(~drop_latent).to(embedding.dtype)", (A1,)),
    M("ouroboros.lgm_zero_c_noise_noisy_pass", OURO, "self.reconstruct(decoded, c2w, K, edm.c_noise(sigma))",
      "self.reconstruct(decoded, c2w, K, torch.zeros_like(sigma))", (A1,)),
    M("ouroboros.noisy_pass_on_targets", OURO, "self.reconstruct(decoded, c2w, K, edm.c_noise(sigma))",
      "self.reconstruct(images, c2w, K, edm.c_noise(sigma))", (A1,)),
    M("ouroboros.clean_pass_on_predictions", OURO, "self.reconstruct(images, c2w, K, clean_c_noise)",
      "self.reconstruct(decoded, c2w, K, clean_c_noise)", (A1,)),
    M("ouroboros.feedback_ccm_not_detached", OURO, 'return dict(ccm=renders["ccm"].detach(), rgb=rgb)',
      'return dict(ccm=renders["ccm"], rgb=rgb)', (A1,)),
    M("ouroboros.feedback_rgb_not_detached", OURO, 'rgb = renders["rgb"].detach() if', 'rgb = renders["rgb"] if', (A1,)),
    M("ouroboros.second_pass_zero_feedback", OURO, "feedback = self.feedback_maps(renders, x0)",
      "feedback = self.feedback_maps(None, x0)", (A1,)),
    M("ouroboros.first_pass_with_grad", OURO, "with torch.set_grad_enabled(torch.is_grad_enabled() and not self_cond):",
      "with torch.set_grad_enabled(torch.is_grad_enabled()):", (A1,),
      "no effect on the loss or its gradients (the first pass's graph is unused); costs memory"),
    M("ouroboros.diffusion_loss_from_first_pass", OURO,
      "pred_x0 = self.denoise(noisy, sigma, embedding, cond_latent, plucker, feedback)\n",
      "_unused = self.denoise(noisy, sigma, embedding, cond_latent, plucker, feedback)\n", (A1,)),
    M("ouroboros.no_lgm_for_self_cond_without_joint", OURO, "if cfg.joint_training or self_cond:", "if cfg.joint_training:", (A1,)),
    M("ouroboros.c_in_not_applied", OURO, "model_input = torch.cat([edm.c_in(s) * noisy, frames], dim=2)",
      "model_input = torch.cat([noisy, frames], dim=2)", (A1,)),
    # ---------------------------------------------------------------- Algorithm 2
    M("ouroboros.euler_leaves_x_in_place", SAMP, "x = edm.euler_step(x, denoised, sigma, sigmas[i + 1].float())",
      "edm.euler_step(x, denoised, sigma, sigmas[i + 1].float())", (A2,)),
    M("ouroboros.initial_noise_unscaled", OURO, "x = x * edm.initial_noise_scale(cfg.edm.sigma_max)", "x = x", (A2,)),
    M("ouroboros.schedule_rho_1", OURO, "edm.karras_sigmas(num_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho)",
      "edm.karras_sigmas(num_steps, cfg.edm.sigma_min, cfg.edm.sigma_max, 1.0)", (A2,)),
    M("ouroboros.feedback_stale_after_step_0", SAMP, "self.feedback = model.feedback_maps(self.renders, x)",
      "self.feedback = model.feedback_maps(self.renders, x) if step == 0 else self.feedback", (A2,)),
    M("ouroboros.sampler_lgm_at_c_noise_zero", SAMP, "edm.c_noise(sigma).expand(x.shape[0]))",
      "torch.zeros(x.shape[0]))", (A2,)),
    M("ouroboros.use_feedback_ignored", SAMP, "self.feeds_back = use_feedback and model.denoiser.has_feedback",
      "self.feeds_back = model.denoiser.has_feedback", (A2,)),
    M("ouroboros.cfg_halves_swapped", OURO, "uncond, cond = pred.chunk(2)", "cond, uncond = pred.chunk(2)", (A2,)),
    M("ouroboros.cfg_uncond_keeps_embedding", OURO, "torch.cat([torch.zeros_like(embedding), embedding])",
      "torch.cat([embedding, embedding])", (A2,)),
    M("ouroboros.cfg_uncond_keeps_latent", OURO, "torch.cat([torch.zeros_like(cond_latent), cond_latent])",
      "torch.cat([cond_latent, cond_latent])", (A2,)),
    # ---------------------------------------------------------------- EDM
    M("edm.c_in_no_sqrt", EDMF, "return 1.0 / torch.sqrt(sigma**2 + 1.0)", "return 1.0 / (sigma**2 + 1.0)", (EDM,)),
    M("edm.c_out_sign", EDMF, "return -sigma / torch.sqrt(sigma**2 + 1.0)", "return sigma / torch.sqrt(sigma**2 + 1.0)", (EDM,)),
    M("edm.c_skip", EDMF, "return 1.0 / (sigma**2 + 1.0)", "return 1.0 / (sigma**2 + 2.0)", (EDM,)),
    M("edm.c_noise_factor", EDMF, "return 0.25 * torch.log(sigma)", "return 0.5 * torch.log(sigma)", (EDM,)),
    M("edm.loss_weight", EDMF, "return (1.0 + sigma**2) / sigma**2", "return (1.0 + sigma**2) / sigma", (EDM,)),
    M("edm.sigma_std_ignored", EDMF, "torch.exp(p_mean + p_std * normal)", "torch.exp(p_mean + normal)", (EDM,)),
    M("edm.karras_exponent", EDMF, "sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho",
      "sigmas = (max_inv + ramp * (min_inv - max_inv)) ** (rho - 1)", (EDM,)),
    M("edm.initial_noise_is_sigma_max", EDMF, "return math.sqrt(sigma_max**2 + 1.0)", "return sigma_max", (EDM, _A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0"),
      "equivalent in practice: 700 vs 700.0007 (relative 1e-6)"),
    M("edm.add_noise_variance", EDMF, "return x0 + sigma * noise", "return x0 + sigma**2 * noise",
      (EDM, _A1 + "test_unet_sees_c_in_times_x0_plus_sigma_noise")),
    M("edm.denoise_sign", EDMF, "return c_skip(sigma) * noisy + c_out(sigma) * network_output",
      "return c_skip(sigma) * noisy - c_out(sigma) * network_output", (EDM,)),
    M("edm.loss_l1", EDMF, "return (loss_weight(sigma) * (pred_x0 - x0) ** 2).mean()",
      "return (loss_weight(sigma) * (pred_x0 - x0).abs()).mean()", (EDM, _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips")),
    M("edm.euler_derivative", EDMF, "derivative = (x - pred_x0) / sigma", "derivative = (x - pred_x0) / (sigma + 1.0)", (EDM, _A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0")),
    M("edm.euler_no_step", EDMF, "return x + (sigma_next - sigma) * derivative", "return x", (EDM, _A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0")),
    # ---------------------------------------------------------------- conditioning
    M("conditioning.dropout_thresholds", COND, "return r < 2 * prob, (r >= prob) & (r < 3 * prob)",
      "return r < prob, (r >= prob) & (r < 2 * prob)", (ALGOS,)),
    M("conditioning.guidance_reversed", COND, "return torch.linspace(min_guidance, max_guidance, num_frames)",
      "return torch.linspace(max_guidance, min_guidance, num_frames)", (ALGOS, _A2 + "test_classifier_free_guidance_is_composed_per_frame")),
    M("conditioning.cfg_formula", COND, "return uncond + w * (cond - uncond)", "return cond + w * (cond - uncond)", (ALGOS, _A2 + "test_classifier_free_guidance_is_composed_per_frame")),
    M("conditioning.clip_input_mapped_as_signed", COND, "x = x.clamp(0.0, 1.0)", "x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)",
      (ALGOS, "tests/test_svd_loading.py", "tests/test_conditioning.py")),
    M("conditioning.latent_sampled_not_mode", COND, "return vae.encode(augmented).latent_dist.mode()",
      "return vae.encode(augmented).latent_dist.sample()", (ALGOS, "tests/test_svd_loading.py", "tests/test_conditioning.py")),
    M("conditioning.no_noise_augmentation", COND, "augmented = (image + noise_aug_strength * noise)",
      "augmented = (image + 0.0 * noise)", (ALGOS, "tests/test_svd_loading.py", "tests/test_conditioning.py")),
    M("conditioning.time_ids_order", COND, "[cfg.fps, cfg.motion_bucket_id, cfg.noise_aug_strength]",
      "[cfg.motion_bucket_id, cfg.fps, cfg.noise_aug_strength]", (ALGOS, "tests/test_svd_loading.py", "tests/test_conditioning.py")),
    # ---------------------------------------------------------------- LGM loss (Eq. 2)
    M("lgm_loss.alpha_mse_dropped", LOSS, "mse = F.mse_loss(pred_rgb, gt_rgb) + F.mse_loss(pred_alpha, gt_alpha)",
      "mse = F.mse_loss(pred_rgb, gt_rgb)", (LGM, _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips", _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient")),
    M("lgm_loss.lpips_inputs_not_scaled", LOSS, "return net(pred * 2 - 1, target.to(pred.dtype) * 2 - 1).mean()",
      "return net(pred, target.to(pred.dtype)).mean()", ("tests/test_lpips_input.py", LGM, _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips", _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient")),
    M("lgm_loss.total_unweighted", LOSS, "return dict(loss=mse + lpips_weight * lp, mse=mse, lpips=lp)",
      "return dict(loss=mse + lp, mse=mse, lpips=lp)", (LGM, _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips", _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient")),
    M("lgm_loss.lpips_at_weight_zero", LOSS, "if lpips_weight > 0:", "if lpips_weight >= 0:", (LGM, _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips", _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient")),
    M("lgm_loss.no_resize_above_256", LOSS, "if pred.shape[-1] > LPIPS_MAX_SIZE:", "if False:", (LGM, "tests/test_metrics.py")),
    # ---------------------------------------------------------------- conventions (docs/design.md section 2)
    M("conventions.focal_uses_full_fov", CONVF, "f = (resolution / 2.0) / math.tan(math.radians(fov_deg) / 2.0)",
      "f = (resolution / 2.0) / math.tan(math.radians(fov_deg))", (CONV,)),
    M("conventions.down_axis_flipped", CONVF, "down = np.cross(forward, right)", "down = np.cross(right, forward)", (CONV,)),
    M("conventions.azimuth_clockwise", CONVF, "np.cos(e) * np.sin(a), np.sin(e)", "-np.cos(e) * np.sin(a), np.sin(e)", (CONV,)),
    M("conventions.pixel_centres_integer", CONVF, "np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5",
      "np.meshgrid(np.arange(width) + 0.0, np.arange(height) + 0.0", (CONV,)),
    M("conventions.depth_as_ray_distance", CONVF, "x_cam = depth[..., None] * (uv1 @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T)",
      "x_cam = uv1 @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T\n    x_cam = depth[..., None] * x_cam / np.linalg.norm(x_cam, axis=-1, keepdims=True)", (CONV,)),
    M("conventions.ccm_offset", CONVF, "return points + 0.5", "return points + 0.4", (CONV,)),
    M("conventions.normalisation_centre", CONVF, "offset = -scale * (lo + hi) / 2.0", "offset = -scale * lo", (CONV,)),
    M("conventions.frames_stride", CONVF, "return (start + stride * np.arange(num_views)) % num_frames",
      "return np.minimum(start + stride * np.arange(num_views), num_frames - 1)", (CONV,)),
    M("conventions.condition_frame_rotation_sign", CONVF, "c, s = math.cos(-phi), math.sin(-phi)",
      "c, s = math.cos(phi), math.sin(phi)", (CONV,)),
    M("conventions.blender_axes", CONVF, "BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])",
      "BLENDER_TO_OPENCV = np.diag([1.0, 1.0, -1.0, 1.0])", (CONV,)),
]

_STOP = []  # set by SIGINT/SIGTERM: pytest.main swallows KeyboardInterrupt in in-process mode


def _stop(signum, frame):
    _STOP.append(signum)
    raise KeyboardInterrupt


# The test(s) written to kill each mutant (``--targeted``: only these run; cheap enough for a
# loaded 2-core machine, and it verifies the claim "this test kills that mutant").
_A1 = A1 + "::"
_A2 = A2 + "::"
_G = GRAD + "::"
TARGETS = {
    "ouroboros.clean_pass_removed": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",
                                     _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips"),
    "ouroboros.clean_pass_at_noisy_sigma": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",),
    "ouroboros.clean_pass_at_time_zero": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",),
    "ouroboros.lpips_dropped": (_A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips",
                                _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient"),
    "ouroboros.lpips_detached": (_A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient",),
    "ouroboros.lpips_unweighted": (_A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips",
                                   _A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient"),
    "ouroboros.dropout_not_applied_to_embedding": (_A1 + "test_dropped_conditions_reach_the_unet_as_zeros",),
    "ouroboros.dropout_not_applied_to_latent": (_A1 + "test_dropped_conditions_reach_the_unet_as_zeros",),
    "ouroboros.dropout_masks_swapped": (_A1 + "test_dropped_conditions_reach_the_unet_as_zeros",),
    "ouroboros.lgm_zero_c_noise_noisy_pass": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",),
    "ouroboros.noisy_pass_on_targets": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",),
    "ouroboros.clean_pass_on_predictions": (_A1 + "test_reconstruct_sees_noisy_pass_at_c_noise_sigma_and_clean_pass_at_sigma_min",),
    "ouroboros.feedback_ccm_not_detached": (_A1 + "test_feedback_reaches_the_second_pass_detached", _G + "test_per_pass_gradients_at_initialisation"),
    "ouroboros.feedback_rgb_not_detached": (_A1 + "test_feedback_reaches_the_second_pass_detached",),
    "ouroboros.second_pass_zero_feedback": (_A1 + "test_feedback_reaches_the_second_pass_detached",),
    "ouroboros.first_pass_with_grad": (_A1 + "test_feedback_reaches_the_second_pass_detached",),
    "ouroboros.diffusion_loss_from_first_pass": (_A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips",),
    "ouroboros.no_lgm_for_self_cond_without_joint": (_A1 + "test_feedback_reaches_the_second_pass_detached",),
    "ouroboros.euler_leaves_x_in_place": (_A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0",
                                          _A2 + "test_gaussian_posterior_mean_oracle_matches_eulers_closed_form",
                                          _A2 + "test_gaussian_posterior_mean_oracle_samples_the_data_distribution"),
    "ouroboros.initial_noise_unscaled": (_A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0",),
    "ouroboros.schedule_rho_1": (_A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0",),
    "ouroboros.feedback_stale_after_step_0": (_A2 + "test_each_step_sees_the_renders_of_the_previous_steps_x0",),
    "ouroboros.sampler_lgm_at_c_noise_zero": (_A2 + "test_each_step_sees_the_renders_of_the_previous_steps_x0",),
    "ouroboros.use_feedback_ignored": (_A2 + "test_with_and_without_feedback_agree_at_step_0_and_then_differ",),
    "ouroboros.cfg_halves_swapped": (_A2 + "test_classifier_free_guidance_is_composed_per_frame",),
    "ouroboros.cfg_uncond_keeps_embedding": (_A2 + "test_classifier_free_guidance_is_composed_per_frame",),
    "ouroboros.cfg_uncond_keeps_latent": (_A2 + "test_classifier_free_guidance_is_composed_per_frame",),
    "edm.euler_no_step": (_A2 + "test_point_mass_oracle_follows_the_exact_ode_and_ends_at_x0",),
    "edm.add_noise_variance": (EDM + "::test_add_noise_is_x0_plus_sigma_times_noise",
                               _A1 + "test_unet_sees_c_in_times_x0_plus_sigma_noise"),
    "edm.loss_l1": (EDM + "::test_denoising_loss_is_weighted_mse", _A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips"),
    "ouroboros.c_in_not_applied": (_A1 + "test_unet_sees_c_in_times_x0_plus_sigma_noise",),
    "conditioning.clip_input_mapped_as_signed": ("tests/test_conditioning.py",),
    "lgm_loss.lpips_inputs_not_scaled": ("tests/test_lpips_input.py",),
    "lgm_loss.lpips_at_weight_zero": (_A1 + "test_lpips_term_alone_gives_lgm_its_weighted_gradient",),
    "lgm_loss.alpha_mse_dropped": (_A1 + "test_total_loss_is_diffusion_plus_mse_plus_lambda_lpips",),
}

FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (\S+?)(?: - .*)?$", re.M)


def run_tests(tests, timeout, fail_fast=False) -> tuple[str, list[str], float, str]:
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-W", "ignore", "-rfE",
           "-m", "not slow and not blender", *(["-x"] if fail_fast else [])]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.monotonic() - start, ""
    seconds = time.monotonic() - start
    failed = sorted(set(FAILED_RE.findall(proc.stdout)))
    if proc.returncode == 0:
        status = "survived"
    elif proc.returncode in (1, 2) or failed:
        status = "killed"
    else:
        status = f"error (pytest exit {proc.returncode})"
    return status, failed, seconds, proc.stdout[-2000:]


# ----------------------------------------------------------------------------- in-process mode
# One interpreter for the whole run: torch, diffusers and the tests are imported once (each
# pytest start costs ~20 s of CPU here). The mutated source is written to disk (for tests that
# start subprocesses) AND executed into the already imported module; every loaded project
# module that imported names from it (``from model.edm import x``) is re-executed after it, and
# the test modules are imported afresh for each mutant. Originals are re-executed afterwards.
PROJECT = ("common", "model", "data_pipeline", "training", "inference", "eval")


def _module_name(file: str) -> str:
    name = file[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _exec_source(module, source: str) -> None:
    exec(compile(source, module.__file__, "exec"), module.__dict__)


def _dependents(changed: list[str]) -> list[str]:
    """Loaded project modules that import names from a changed one, transitively, in order."""
    order, frontier = [], list(changed)
    while frontier:
        name = frontier.pop(0)
        pattern = re.compile(rf"^\s*from\s+{re.escape(name)}\s+import\b", re.M)
        for other, module in sorted(sys.modules.items()):
            if other in order or other in changed or not other.startswith(PROJECT):
                continue
            path = getattr(module, "__file__", None)
            if path and pattern.search(Path(path).read_text()):
                order.append(other)
                frontier.append(other)
    return order


def _reexec(names: list[str]) -> None:
    for name in names:
        module = sys.modules[name]
        _exec_source(module, Path(module.__file__).read_text())


class _Recorder:
    def __init__(self):
        self.failed = []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid or "collection")


def run_in_process(mutant: Mutant, tests, fail_fast=False) -> tuple[str, list[str], float, str]:
    import importlib

    import pytest

    start = time.monotonic()
    name = _module_name(mutant.file)
    module = importlib.import_module(name)
    chain = [name, *_dependents([name])]
    try:
        _reexec(chain)  # the file on disk is the mutant now
    except Exception as error:  # the mutant does not even import: killed
        return "killed", [f"import: {type(error).__name__}: {error}"], time.monotonic() - start, ""
    for loaded in list(sys.modules):
        if loaded in ("conftest",) or loaded.startswith(("test_", "tiny_helpers", "mesh_oracle", "raycast_oracle")):
            del sys.modules[loaded]
    recorder = _Recorder()
    args = [*tests, "-q", "-p", "no:cacheprovider", "-W", "ignore", "-m", "not slow and not blender",
            "--rootdir", str(REPO), *(["-x"] if fail_fast else [])]  # fmt: skip
    code = pytest.main(args, plugins=[recorder])
    seconds = time.monotonic() - start
    status = "survived" if code == 0 else "killed" if (code in (1, 2) or recorder.failed) else f"error (pytest exit {code})"
    del module
    return status, sorted(set(recorder.failed)), seconds, ""


def apply(mutant: Mutant) -> str | None:
    path = REPO / mutant.file
    text = path.read_text()
    count = text.count(mutant.find)
    if count != 1:
        return f"stale: snippet found {count} times"
    BACKUP.mkdir(exist_ok=True)
    shutil.copy2(path, BACKUP / path.name)
    path.write_text(text.replace(mutant.find, mutant.replace))
    return None


def restore(mutant: Mutant, original: str) -> None:
    path = REPO / mutant.file
    path.write_text(original)
    (BACKUP / path.name).unlink(missing_ok=True)
    if BACKUP.exists() and not any(BACKUP.iterdir()):
        BACKUP.rmdir()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutant names (default: all)")
    parser.add_argument("--file", nargs="*", help="only mutants of these source files")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--report", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--tests", nargs="*", help="run these test files instead of each mutant's own")
    parser.add_argument("--targeted", action="store_true",
                        help="run only the test(s) written to kill each mutant (TARGETS); mutants without one are skipped")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated code")
    parser.add_argument("--in-process", action="store_true",
                        help="one interpreter for all mutants (much less CPU; see run_in_process)")
    parser.add_argument("-x", "--fail-fast", action="store_true",
                        help="stop each mutant's tests at the first failure (faster; records one killer)")
    args = parser.parse_args(argv)
    # a run started in the background ignores SIGINT, and SIGTERM would skip the restore
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    mutants = [m for m in MUTANTS if (not args.only or m.name in args.only) and (not args.file or m.file in args.file)]
    if args.only:  # in the order given
        mutants.sort(key=lambda m: args.only.index(m.name))
    if args.targeted:
        mutants = [Mutant(m.name, m.file, m.find, m.replace, TARGETS[m.name], m.note) for m in mutants if m.name in TARGETS]
    if args.list:
        for m in mutants:
            print(f"{m.name:50s} {m.file}  tests: {' '.join(m.tests)}")
        return 0
    if args.in_process:
        sys.path.insert(0, str(REPO))  # this checkout's packages, not an installed copy
        import model  # noqa: F401

        assert Path(model.__file__).resolve().is_relative_to(REPO), model.__file__
    if BACKUP.exists():
        print(f"{BACKUP} exists: a previous run did not finish; restore the files in it first", file=sys.stderr)
        return 2
    results = []
    if not args.no_baseline:  # the tests must pass on the unmutated code, or nothing is measured
        tests = sorted({t for m in mutants for t in (args.tests or m.tests)})
        if args.in_process:
            baseline = Mutant("baseline", mutants[0].file, "", "", tuple(tests))
            status, failed, seconds, _ = run_in_process(baseline, tests)
        else:
            status, failed, seconds, _ = run_tests(tests, args.timeout)
        print(f"baseline: {status} in {seconds:.0f} s {failed}", flush=True)
        if status != "survived":
            print("the tests fail on the unmutated code: fix that first", file=sys.stderr)
            return 2
    for m in mutants:
        original = (REPO / m.file).read_text()
        problem = apply(m)
        if problem:
            results.append(dict(name=m.name, file=m.file, status=problem, failed=[], seconds=0.0, note=m.note))
            print(f"{m.name}: {problem}", flush=True)
            continue
        try:
            tests = tuple(args.tests) if args.tests else m.tests
            if args.in_process:
                status, failed, seconds, tail = run_in_process(m, tests, args.fail_fast)
            else:
                status, failed, seconds, tail = run_tests(tests, args.timeout, args.fail_fast)
        finally:
            restore(m, original)
            if args.in_process:  # the originals back into the interpreter
                name = _module_name(m.file)
                if name in sys.modules:
                    _reexec([name, *_dependents([name])])
        results.append(dict(name=m.name, file=m.file, status=status, failed=failed, seconds=round(seconds, 1),
                            note=m.note, tests=list(tests)))  # fmt: skip
        print(f"{m.name}: {status} in {seconds:.0f} s  {' '.join(f.split('::')[-1] for f in failed)}", flush=True)
        if _STOP:
            results[-1]["status"] = "interrupted"
            break
        if status.startswith("error") or status == "timeout":
            print(tail, flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    scored = sum(r["status"] in ("killed", "survived") for r in results)
    lines = [f"Mutation score: {killed}/{scored} killed ({100 * killed / max(scored, 1):.0f} %)", "",
             "| mutant | status | killed by | s |", "|---|---|---|---|"]  # fmt: skip
    for r in results:
        by = ", ".join(sorted({f.split("::")[-1] for f in r["failed"]})) or "-"
        status = r["status"] + (f" ({r['note']})" if r["note"] and r["status"] != "killed" else "")
        lines.append(f"| `{r['name']}` | {status} | {by} | {r['seconds']:.0f} |")
    report = "\n".join(lines)
    print(report)
    if args.report:
        args.report.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
