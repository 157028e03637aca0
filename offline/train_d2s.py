"""Training D2S on labelled images (real, augmented and synthetic).

Loss per batch (several images padded to one tensor, with masks):
  xyz_loss    mean over valid-labelled keypoints of ||xyz_hat - xyz||_2 (metres)
  rel_loss    per image sqrt(mean over its keypoints of (valid - r)^2), i.e. ||valid - r||_2
              normalised by sqrt(#keypoints), averaged over the images; r = reliability(u).
              With ``synthetic_unlabelled="ignored"`` a synthetic image's unlabelled
              keypoints are left out of its mean.
  reproj_loss (last ``reprojection_fraction`` of training) ACE-style robust reprojection
              error of the valid-labelled keypoints, tau * tanh(e / tau) with a threshold
              tau that shrinks from ``reprojection_tau_max_px`` to ``reprojection_tau_min_px``
              over that phase; pixels are divided by the focal length and multiplied by
              the median label depth, so the term is in metres like xyz_loss.

With ``loss_reduction="published"`` the terms are reduced as in the published D2S code
instead: xyz_loss sums over each image's labelled keypoints and rel_loss is ||valid - r||_2
per image without the 1/sqrt(N) (both then averaged over the batch's images), so coordinates
weigh about sqrt(N) times more against reliability than with the normalised terms.

Learning rate (``lr_schedule``): "steps" (Adam at ``lr``, linear warm-up over the first
``warmup_fraction`` from lr/10, then halved at each of ``lr_halving_fractions``: lr, lr/2,
lr/4, lr/8, never annealed); "cosine" (the same warm-up, then a cosine to 0 at the last
step); "onecycle" (ACE's: a cosine rise from lr/25 over ``onecycle_rise_fraction``, then a
cosine fall to lr/25/1e4).

Batches: ``images_per_batch`` images with up to ``max_keypoints_per_image`` keypoints each;
``early_images_per_batch`` / ``early_keypoints_per_image`` replace them for the first
``early_fraction`` of the iterations (more distinct frames, fewer keypoints each, then the
full keypoint count the localizer sees).

Wall-clock budget (``train_minutes``): before training, a few throw-away steps on a copy of
the model measure the step time (with and without the reprojection term, early and full
batches) and one learning-curve point is timed; ``iterations`` is then fixed so that the whole
schedule, its anneal included, fits the budget. The count is stored with the checkpoint, so a
resumed training keeps it.

Head warm-up (``head_warmup_iterations``): before the schedule above, the regression head alone
learns descriptor -> (xyz, u) on shuffled batches of ``head_warmup_batch`` keypoints drawn from
every training image (ACE's recipe: decorrelated samples and large batches make a per-keypoint
regressor converge in minutes), with its own OneCycle to ``head_warmup_lr``. The attention
layers start as the identity (the last linear of each layer's MLP is zero), so the full model
begins from exactly the warmed-up head and the message passing only has to learn a correction.
A step of the head costs a small fraction of a full step (no attention, no per-image padding).

Learning curves (``curve_points``): the model is scored (``offline/learning_curves.py``) on a
few real training frames and on ``validation`` frames before training, every
iterations/curve_points and at the end; written to ``learning_curves.json`` in ``work_dir``.

Resumable: ``work_dir`` holds the last checkpoint (safetensors for model and optimizer
tensors, JSON for the iteration, history, RNG state). Calling ``train_d2s`` again with the
same work_dir continues from it; when it has already reached ``iterations`` it returns at once.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2s_nerf_ros.device import resolve_device
from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet, reliability
from offline.labelled import LabelledImage
from offline.stages import added_field, unhashed_field, write_json_atomic

CHECKPOINT_POINTER = "latest.json"
MIN_DEPTH_M = 0.1  # predictions closer than this (or behind the camera) get no reprojection loss
SYNTHETIC_UNLABELLED = ("unreliable", "ignored")
LR_SCHEDULES = ("steps", "cosine", "onecycle")
LOSS_REDUCTIONS = ("normalised", "published")
# Which keypoints the reprojection term sees. "labelled" (this package's default): the labelled
# ones, as a second, view-consistent pull next to the 3D loss. "unlabelled" (the published D2S
# code): only keypoints without a 3D label, for which it is the only geometric signal (it puts
# them on their viewing ray). "all": both.
REPROJECTION_KEYPOINTS = ("labelled", "unlabelled", "all")
CURVES_NAME = "learning_curves.json"
BUDGET_MARGIN = 0.95  # of train_minutes planned for: step times drift on a shared machine
ONECYCLE_START_DIVISOR = 25.0
ONECYCLE_END_DIVISOR = 1e4


@dataclass
class D2STrainConfig:
    iterations: int = 20000
    images_per_batch: int = 4
    max_keypoints_per_image: int = 1024
    lr: float = 5e-4
    warmup_fraction: float = 0.02
    lr_halving_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    reprojection_fraction: float = 0.2
    reprojection_weight: float = 1.0
    reprojection_tau_max_px: float = 50.0
    reprojection_tau_min_px: float = 1.0
    synthetic_ratio: float = 0.2  # share of each batch drawn from synthetic images (see BuildConfig)
    # What a synthetic image's unlabelled keypoints teach the reliability head. "unreliable" (the
    # paper): reliability target 0, like a real keypoint without a 3D point. "ignored": no
    # reliability loss at all. A render's keypoint is usually unlabelled because the render matched
    # its reference poorly, not because the scene point is unreliable, so "ignored" keeps render
    # quality from teaching the model to distrust descriptors that real queries need.
    # Added after trainings were cached: at "unreliable" (the behaviour before) it stays out of the cache key.
    synthetic_unlabelled: str = added_field("unreliable")
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bfloat16 autocast, CUDA only
    checkpoint_every: int = 1000
    log_every: int = 10
    # Added after trainings were cached; each default is the behaviour before it existed, so at its
    # default a field stays out of the cache key (offline.stages.added_field).
    lr_schedule: str = added_field("steps")             # LR_SCHEDULES
    onecycle_rise_fraction: float = added_field(0.25)
    loss_reduction: str = added_field("normalised")     # LOSS_REDUCTIONS
    early_images_per_batch: int | None = added_field(None)
    early_keypoints_per_image: int | None = added_field(None)
    early_fraction: float = added_field(0.5)
    train_minutes: float | None = added_field(None)     # wall-clock budget: fixes ``iterations`` from the measured step time
    calibration_steps: int = added_field(5)             # per batch kind (the first is a warm-up), for train_minutes
    curve_points: int = unhashed_field(12)              # learning-curve points after the one before training (0: none)
    # Gaussian noise added to each training descriptor, as the expected norm of the noise vector
    # relative to the descriptor's own (then rescaled to its norm): a stand-in for the change of a
    # point's descriptor between viewpoints that 20 mapping frames do not show (0: none).
    descriptor_noise: float = added_field(0.0)
    head_warmup_iterations: int = added_field(0)        # head-only steps before the full model (0: none)
    head_warmup_batch: int = added_field(8192)          # keypoints per head warm-up step
    head_warmup_lr: float = added_field(3e-3)           # the warm-up's OneCycle peak
    reprojection_keypoints: str = added_field("labelled")  # REPROJECTION_KEYPOINTS

    def __post_init__(self) -> None:
        self.lr_halving_fractions = tuple(float(f) for f in self.lr_halving_fractions)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.images_per_batch < 1 or self.max_keypoints_per_image < 1:
            raise ValueError("images_per_batch and max_keypoints_per_image must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_fraction", "reprojection_fraction", "synthetic_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.synthetic_unlabelled not in SYNTHETIC_UNLABELLED:
            raise ValueError(f"synthetic_unlabelled must be one of {', '.join(SYNTHETIC_UNLABELLED)}, "
                             f"got {self.synthetic_unlabelled!r}")
        if not 0 < self.reprojection_tau_min_px <= self.reprojection_tau_max_px:
            raise ValueError("need 0 < reprojection_tau_min_px <= reprojection_tau_max_px")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.reprojection_keypoints not in REPROJECTION_KEYPOINTS:
            raise ValueError(f"reprojection_keypoints must be one of {', '.join(REPROJECTION_KEYPOINTS)}, "
                             f"got {self.reprojection_keypoints!r}")
        if not (math.isfinite(self.reprojection_weight) and self.reprojection_weight >= 0):
            raise ValueError(f"reprojection_weight must be >= 0, got {self.reprojection_weight}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        for name in ("onecycle_rise_fraction", "early_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("early_images_per_batch", "early_keypoints_per_image"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        if self.train_minutes is not None and not (math.isfinite(self.train_minutes) and self.train_minutes > 0):
            raise ValueError(f"train_minutes must be a positive number of minutes, got {self.train_minutes}")
        if not (math.isfinite(self.descriptor_noise) and self.descriptor_noise >= 0):
            raise ValueError(f"descriptor_noise must be >= 0, got {self.descriptor_noise}")
        if self.head_warmup_iterations < 0 or self.head_warmup_batch < 1 or not self.head_warmup_lr > 0:
            raise ValueError("need head_warmup_iterations >= 0, head_warmup_batch >= 1 and head_warmup_lr > 0")
        if self.calibration_steps < 2 or self.curve_points < 0:
            raise ValueError("calibration_steps must be >= 2 and curve_points >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_halving_fractions"] = list(self.lr_halving_fractions)
        return d


@dataclass
class TrainResult:
    model: D2SNet                 # eval mode, on the training device
    history: list[dict[str, float]] = field(default_factory=list)
    iteration: int = 0            # iterations done (may exceed the config's when resumed from a longer run)
    curves: list[dict[str, Any]] = field(default_factory=list)  # learning-curve points (see CURVES_NAME)
    iterations_planned: int = 0   # the schedule's length (from train_minutes when given)
    step_seconds: float | None = None  # the measured step time train_minutes planned with
    head_warmup: dict[str, float] | None = None  # head warm-up summary (iterations, seconds, final losses)


def batch_shape(config: D2STrainConfig, iteration: int | None) -> tuple[int, int]:
    """(images, keypoints per image) of step ``iteration``; None: the full (late) batch."""
    early = iteration is not None and iteration < config.early_fraction * config.iterations
    images = config.early_images_per_batch if early and config.early_images_per_batch else config.images_per_batch
    keypoints = (config.early_keypoints_per_image if early and config.early_keypoints_per_image
                 else config.max_keypoints_per_image)
    return images, keypoints


def iterations_for_budget(budget_s: float, step_s: float, fixed_s: float, margin: float = BUDGET_MARGIN) -> int:
    """How many steps of ``step_s`` seconds (the schedule-weighted mean) fit ``margin`` of
    ``budget_s`` after ``fixed_s`` seconds of other work (packing, calibration, curve points).
    Raises when not even a few steps fit: a schedule of 1 step would anneal nothing."""
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"the measured step time must be positive, got {step_s}")
    iterations = int(math.floor((budget_s * margin - fixed_s) / step_s))
    if iterations < 10:
        raise ValueError(f"a training budget of {budget_s / 60:.2f} min fits only {max(iterations, 0)} steps "
                         f"(a step takes {step_s:.3f} s, the rest {fixed_s:.1f} s): give more minutes")
    return iterations


def onecycle_lr(peak: float, iteration: int, iterations: int, rise_fraction: float) -> float:
    """ACE's OneCycle: a cosine rise from peak/25 over ``rise_fraction``, then a cosine fall to peak/25/1e4."""
    start = peak / ONECYCLE_START_DIVISOR
    end = start / ONECYCLE_END_DIVISOR
    rise = int(round(rise_fraction * iterations))
    if iteration < rise:
        return start + (peak - start) * 0.5 * (1.0 - math.cos(math.pi * iteration / rise))
    progress = min(1.0, (iteration - rise) / max(1, iterations - 1 - rise))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(config: D2STrainConfig, iteration: int) -> float:
    """The learning rate used for step ``iteration`` (0-based); a pure function, so resuming is exact."""
    lr = config.lr
    if config.lr_schedule == "onecycle":
        return onecycle_lr(lr, iteration, config.iterations, config.onecycle_rise_fraction)
    warmup = int(round(config.warmup_fraction * config.iterations))
    if iteration < warmup:
        return lr * (0.1 + 0.9 * iteration / warmup)
    if config.lr_schedule == "cosine":
        progress = min(1.0, (iteration - warmup) / max(1, config.iterations - 1 - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    for fraction in config.lr_halving_fractions:
        if iteration >= fraction * config.iterations:
            lr *= 0.5
    return lr


def reprojection_threshold_px(config: D2STrainConfig, iteration: int) -> float | None:
    """tau for step ``iteration``, or None outside the reprojection phase."""
    start = config.iterations * (1.0 - config.reprojection_fraction)
    if config.reprojection_fraction <= 0 or iteration < start:
        return None
    progress = min(1.0, (iteration - start) / max(1.0, config.iterations - start))
    lo, hi = config.reprojection_tau_min_px, config.reprojection_tau_max_px
    return lo + (hi - lo) * math.sqrt(1.0 - progress)


# ------------------------------------------------------------------------------ packing
@dataclass
class PackedImages:
    """All training keypoints in flat tensors, plus a padded per-image index for sampling."""
    descriptors: torch.Tensor   # (M, D) float32, device
    points3D: torch.Tensor      # (M, 3) float32, device (zeros where invalid)
    valid: torch.Tensor         # (M,) bool, device
    pixels: torch.Tensor        # (M, 2) float32, device, undistorted keypoints
    index: torch.Tensor         # (I, max_n) int64, CPU, -1 = padding
    counts: torch.Tensor        # (I,) int64, CPU
    is_synthetic: torch.Tensor  # (I,) bool, CPU
    intrinsics: torch.Tensor    # (I, 4) fx fy cx cy, device
    T_cam_world: torch.Tensor   # (I, 3, 4) float32, device
    median_depth: float
    fingerprint: str


def pack_images(images: list[LabelledImage], descriptor_dim: int, device: torch.device,
                synthetic_flags: list[bool]) -> PackedImages:
    keep = [i for i, im in enumerate(images) if len(im.keypoints) > 0]
    if not keep:
        raise ValueError("no training image has any keypoint")
    images = [images[i] for i in keep]
    synthetic_flags = [synthetic_flags[i] for i in keep]
    for im in images:
        if im.descriptors.ndim != 2 or im.descriptors.shape[1] != descriptor_dim:
            raise ValueError(
                f"{im.name}: descriptors have shape {im.descriptors.shape}, the model expects dimension {descriptor_dim}")
        if not np.all(np.isfinite(im.descriptors)):
            raise ValueError(f"{im.name}: descriptors contain NaN or inf")
        if not np.all(np.isfinite(im.points3D[im.valid])):
            raise ValueError(f"{im.name}: a valid 3D label is NaN or inf")
    counts = np.array([len(im.keypoints) for im in images], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    max_n = int(counts.max())
    index = np.full((len(images), max_n), -1, dtype=np.int64)
    for i, (o, c) in enumerate(zip(offsets, counts)):
        index[i, :c] = np.arange(o, o + c)

    valid = np.concatenate([im.valid.astype(bool) for im in images])
    if not valid.any():
        raise ValueError("no training keypoint has a valid 3D label")
    points = np.concatenate([np.where(im.valid[:, None], im.points3D, 0.0) for im in images]).astype(np.float32)
    pixels = np.concatenate([im.camera.undistort_points(im.keypoints) for im in images]).astype(np.float32)
    T_cam_world = np.stack([np.linalg.inv(np.asarray(im.T_world_cam, dtype=np.float64))[:3] for im in images])
    intrinsics = np.array([[im.camera.fx, im.camera.fy, im.camera.cx, im.camera.cy] for im in images])

    # Median depth of the valid labels in their own cameras: the scale that turns angular
    # reprojection errors into metres.
    image_of = np.repeat(np.arange(len(images)), counts)
    R, t = T_cam_world[image_of, :, :3], T_cam_world[image_of, :, 3]
    depth = np.einsum("nj,nj->n", R[:, 2], points.astype(np.float64)) + t[:, 2]
    depths = depth[valid & (depth > 0)]
    median_depth = float(np.median(depths)) if len(depths) else 1.0

    h = hashlib.sha256()
    for im, syn in zip(images, synthetic_flags):
        h.update(f"{im.name}|{len(im.keypoints)}|{im.n_valid}|{im.source}|{syn}\n".encode())
    h.update(f"dim={descriptor_dim}".encode())

    return PackedImages(
        descriptors=torch.from_numpy(np.concatenate([im.descriptors for im in images]).astype(np.float32)).to(device),
        points3D=torch.from_numpy(points).to(device),
        valid=torch.from_numpy(valid).to(device),
        pixels=torch.from_numpy(pixels).to(device),
        index=torch.from_numpy(index),
        counts=torch.from_numpy(counts),
        is_synthetic=torch.tensor(synthetic_flags, dtype=torch.bool),
        intrinsics=torch.from_numpy(intrinsics.astype(np.float32)).to(device),
        T_cam_world=torch.from_numpy(T_cam_world.astype(np.float32)).to(device),
        median_depth=median_depth,
        fingerprint=h.hexdigest(),
    )


def noisy_descriptors(descriptors: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``descriptors`` plus isotropic Gaussian noise whose expected norm is ``noise`` times each
    descriptor's norm, rescaled back to that norm (unit descriptors stay on the unit sphere)."""
    if noise <= 0:
        return descriptors
    eps = torch.randn(descriptors.shape, generator=generator).to(descriptors.device, descriptors.dtype)
    norm = descriptors.norm(dim=-1, keepdim=True)
    noisy = descriptors + eps * (noise / math.sqrt(descriptors.shape[-1])) * norm
    return noisy * (norm / noisy.norm(dim=-1, keepdim=True).clamp(min=1e-12))


def synthetic_count(n: int, n_real: int, n_synthetic: int, ratio: float, generator: torch.Generator) -> int:
    """How many of ``n`` draws come from the synthetic pool: ``ratio`` of them in expectation when
    both pools have members (stochastic rounding keeps the share exact for any ``n``), else all
    from the one that does."""
    if n_synthetic and n_real:
        return int(math.floor(n * ratio + float(torch.rand((), generator=generator))))
    return n if n_synthetic else 0


def draw(ids: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` members of ``ids`` drawn uniformly with replacement."""
    return ids[torch.randint(len(ids), (count,), generator=generator)] if count else ids[:0]


@dataclass
class Batch:
    descriptors: torch.Tensor  # (B, K, D)
    mask: torch.Tensor         # (B, K) real keypoint
    points3D: torch.Tensor     # (B, K, 3)
    valid: torch.Tensor        # (B, K) real and labelled
    rel_mask: torch.Tensor     # (B, K) keypoints the reliability loss sees
    pixels: torch.Tensor       # (B, K, 2)
    intrinsics: torch.Tensor   # (B, 4)
    T_cam_world: torch.Tensor  # (B, 3, 4)


def sample_batch(packed: PackedImages, config: D2STrainConfig, generator: torch.Generator,
                 device: torch.device, iteration: int | None = None) -> Batch:
    """A batch of step ``iteration`` (its shape from ``batch_shape``; None: the full batch)."""
    real_ids = torch.nonzero(~packed.is_synthetic).flatten()
    syn_ids = torch.nonzero(packed.is_synthetic).flatten()
    b, max_keypoints = batch_shape(config, iteration)
    n_syn = synthetic_count(b, len(real_ids), len(syn_ids), config.synthetic_ratio, generator)
    chosen = torch.cat([draw(real_ids, b - n_syn, generator), draw(syn_ids, n_syn, generator)])
    k = int(min(max_keypoints, int(packed.counts[chosen].max())))
    index = packed.index[chosen, : int(packed.counts[chosen].max())]
    # Random subset of each image's keypoints: the k smallest random keys, padding keys last.
    keys = torch.rand(index.shape, generator=generator)
    keys[index < 0] = 2.0
    picked = index.gather(1, keys.topk(k, dim=1, largest=False).indices)
    mask = picked >= 0
    flat = picked.clamp(min=0).to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    valid = packed.valid[flat] & mask
    rel_mask = mask
    if config.synthetic_unlabelled == "ignored" and n_syn:
        synthetic_rows = packed.is_synthetic[chosen].to(device)[:, None]
        rel_mask = mask & (valid | ~synthetic_rows)
    chosen = chosen.to(device)
    return Batch(
        descriptors=noisy_descriptors(packed.descriptors[flat], config.descriptor_noise, generator),
        mask=mask,
        points3D=packed.points3D[flat],
        valid=valid,
        rel_mask=rel_mask,
        pixels=packed.pixels[flat],
        intrinsics=packed.intrinsics[chosen],
        T_cam_world=packed.T_cam_world[chosen],
    )


def batch_losses(model: D2SNet, batch: Batch, tau_px: float | None, median_depth: float,
                 reprojection_weight: float, reduction: str = "normalised",
                 reprojection_keypoints: str = "labelled") -> dict[str, torch.Tensor]:
    xyz_hat, u = model(batch.descriptors, batch.mask)
    xyz_hat, u = xyz_hat.float(), u.float()
    r = reliability(u)
    valid = batch.valid.float()
    seen = batch.rel_mask.float()
    published = reduction == "published"
    # Normalised: means over labelled keypoints. Published: sums per image, mean over images.
    n_valid = valid.sum().clamp(min=1.0) if not published else float(valid.shape[0])

    xyz_err = torch.sqrt(((xyz_hat - batch.points3D) ** 2).sum(-1) + 1e-12)
    xyz_loss = (xyz_err * valid).sum() / n_valid
    per_image = ((valid - r) ** 2 * seen).sum(1)
    if not published:
        per_image = per_image / seen.sum(1).clamp(min=1.0)
    # An image none of whose keypoints the loss sees (a synthetic one without labels, "ignored")
    # adds nothing, rather than a sqrt(1e-12) pull.
    has_seen = (seen.sum(1) > 0).float()
    rel_loss = (torch.sqrt(per_image + 1e-12) * has_seen).sum() / has_seen.sum().clamp(min=1.0)

    reproj_loss = torch.zeros((), device=xyz_hat.device)
    if tau_px is not None:
        R, t = batch.T_cam_world[:, :, :3], batch.T_cam_world[:, :, 3]
        p_cam = torch.einsum("bij,bkj->bki", R, xyz_hat) + t[:, None, :]
        z = p_cam[..., 2]
        in_front = z > MIN_DEPTH_M
        f = batch.intrinsics[:, None, :2]
        c = batch.intrinsics[:, None, 2:]
        uv = p_cam[..., :2] / z.clamp(min=MIN_DEPTH_M)[..., None] * f + c
        err_px = torch.sqrt(((uv - batch.pixels) ** 2).sum(-1) + 1e-12)
        robust_px = tau_px * torch.tanh(err_px / tau_px)
        # pixels -> radians (divide by the focal length) -> metres at the median label depth
        robust_m = robust_px / f.mean(-1) * median_depth
        real = batch.mask.float()
        seen_by_term = {"labelled": valid, "unlabelled": real - valid, "all": real}[reprojection_keypoints]
        use = seen_by_term * in_front.float()
        # Normalised: a mean over the keypoints the term sees (for "labelled" that is n_valid).
        # Published: sums per image, mean over images, like the other terms.
        n_seen = n_valid if published else seen_by_term.sum().clamp(min=1.0)
        reproj_loss = reprojection_weight * (robust_m * use).sum() / n_seen

    loss = xyz_loss + rel_loss + reproj_loss
    return {"loss": loss, "xyz_loss": xyz_loss, "rel_loss": rel_loss, "reproj_loss": reproj_loss}


# ------------------------------------------------------------------------------ head warm-up
@dataclass
class KeypointPool:
    """Flat indices of the packed keypoints, split by source, for shuffled per-keypoint batches."""
    real: torch.Tensor        # (R,) int64, CPU
    synthetic: torch.Tensor   # (S,) int64, CPU
    is_synthetic: torch.Tensor  # (M,) bool, device: the keypoint comes from a synthetic image


def keypoint_pool(packed: PackedImages) -> KeypointPool:
    per_keypoint = torch.repeat_interleave(packed.is_synthetic, packed.counts)
    return KeypointPool(real=torch.nonzero(~per_keypoint).flatten(), synthetic=torch.nonzero(per_keypoint).flatten(),
                        is_synthetic=per_keypoint.to(packed.descriptors.device))


def sample_keypoints(pool: KeypointPool, config: D2STrainConfig, generator: torch.Generator) -> torch.Tensor:
    """``head_warmup_batch`` flat keypoint indices, ``synthetic_ratio`` of them (in expectation)
    from synthetic images when there are any, drawn with replacement."""
    n = config.head_warmup_batch
    n_syn = synthetic_count(n, len(pool.real), len(pool.synthetic), config.synthetic_ratio, generator)
    return torch.cat([draw(pool.real, n - n_syn, generator), draw(pool.synthetic, n_syn, generator)])


def head_losses(model: D2SNet, packed: PackedImages, pool: KeypointPool, flat: torch.Tensor,
                descriptors: torch.Tensor, synthetic_unlabelled: str) -> dict[str, torch.Tensor]:
    """The normalised xyz and reliability losses of the ``flat`` keypoints (on the packed tensors'
    device), given their ``descriptors``, through the head alone."""
    xyz_hat, u = model.regress(descriptors)
    valid = packed.valid[flat].float()
    seen = torch.ones_like(valid)
    if synthetic_unlabelled == "ignored":
        seen = (packed.valid[flat] | ~pool.is_synthetic[flat]).float()
    xyz_err = torch.sqrt(((xyz_hat.float() - packed.points3D[flat]) ** 2).sum(-1) + 1e-12)
    xyz_loss = (xyz_err * valid).sum() / valid.sum().clamp(min=1.0)
    rel_loss = torch.sqrt(((valid - reliability(u.float())) ** 2 * seen).sum() / seen.sum().clamp(min=1.0) + 1e-12)
    return {"loss": xyz_loss + rel_loss, "xyz_loss": xyz_loss, "rel_loss": rel_loss}


def zero_attention_residuals(model: D2SNet) -> None:
    """Make every attention layer the identity (x + 0), so a warmed-up head is the whole model."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp[-1].weight.zero_()
            layer.mlp[-1].bias.zero_()


def head_parameters(model: D2SNet) -> list[torch.nn.Parameter]:
    return [*model.head.parameters(), *model.head_out.parameters()]


def head_step(model: D2SNet, optimizer: torch.optim.Optimizer, packed: PackedImages, pool: KeypointPool,
              config: D2STrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One head warm-up step: a shuffled keypoint batch (descriptor noise included) through the head alone."""
    flat = sample_keypoints(pool, config, generator).to(packed.descriptors.device)
    descriptors = noisy_descriptors(packed.descriptors[flat], config.descriptor_noise, generator)
    losses = head_losses(model, packed, pool, flat, descriptors, config.synthetic_unlabelled)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses


def head_warmup(model: D2SNet, packed: PackedImages, config: D2STrainConfig, generator: torch.Generator,
                iterations: int, progress: bool = False) -> dict[str, float]:
    """Train ``model.head`` / ``model.head_out`` alone for ``iterations`` shuffled keypoint batches."""
    from offline.progress import progress_bar

    pool = keypoint_pool(packed)
    optimizer = torch.optim.Adam(head_parameters(model), lr=config.head_warmup_lr)
    model.train()
    t0 = time.perf_counter()
    tail: list[dict[str, float]] = []
    bar = progress_bar(total=iterations, enabled=progress, desc="D2S head warm-up", unit="it")
    try:
        for iteration in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = onecycle_lr(config.head_warmup_lr, iteration, iterations, config.onecycle_rise_fraction)
            losses = head_step(model, optimizer, packed, pool, config, generator)
            if iteration >= iterations - max(1, iterations // 20):
                tail.append({k: float(v.detach()) for k, v in losses.items()})
            bar.update(1)
    finally:
        bar.close()
    summary = {"iterations": iterations, "seconds": time.perf_counter() - t0, "batch": config.head_warmup_batch}
    for key in ("xyz_loss", "rel_loss"):
        summary[f"final_{key}"] = float(np.mean([t[key] for t in tail])) if tail else float("nan")
    return summary


def measure_head_step_seconds(model: D2SNet, packed: PackedImages, config: D2STrainConfig, steps: int = 4) -> float:
    """Seconds per head warm-up step, from throw-away steps on a copy of the model."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(head_parameters(probe), lr=config.head_warmup_lr)
    pool = keypoint_pool(packed)
    generator = torch.Generator().manual_seed(config.seed + 104729)
    times = []
    for _ in range(max(2, steps)):
        t0 = time.perf_counter()
        head_step(probe, optimizer, packed, pool, config, generator)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


# ------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(work_dir: Path, model: D2SNet, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from d2s_nerf_ros.map_bundle import save_safetensors_file

    name = f"ckpt-{state['iteration']:09d}"
    tmp = work_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value.detach().cpu().contiguous()
               for pid, entries in opt["state"].items() for key, value in entries.items()}
    save_safetensors_file(tensors, tmp / "optimizer.safetensors")
    state = dict(state, param_groups=opt["param_groups"])
    (tmp / "state.json").write_text(json.dumps(state))
    final = work_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer_tmp = work_dir / (CHECKPOINT_POINTER + ".tmp")
    pointer_tmp.write_text(json.dumps({"checkpoint": name}))
    os.replace(pointer_tmp, work_dir / CHECKPOINT_POINTER)
    for old in work_dir.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(work_dir: Path, model: D2SNet, optimizer: torch.optim.Optimizer, device: torch.device,
                     model_config: D2SConfig, data_fingerprint: str) -> dict[str, Any] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pointer = work_dir / CHECKPOINT_POINTER
    if not pointer.is_file():
        return None
    try:
        ckpt = work_dir / json.loads(pointer.read_text())["checkpoint"]
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the training checkpoint in {work_dir} is unreadable ({e}); delete {work_dir} to start over") from e
    # Check what the checkpoint is before loading anything into the model.
    if state.get("model_config") != model_config.to_dict():
        raise ValueError(
            f"{work_dir} holds a checkpoint of another model config ({state.get('model_config')}); "
            f"use another work_dir or delete this one")
    if state.get("data_fingerprint") != data_fingerprint:
        raise ValueError(
            f"{work_dir} holds a checkpoint trained on other data; use another work_dir or delete this one")
    try:
        weights = load_file(str(ckpt / "model.safetensors"), device=str(device))
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"), device="cpu")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ValueError(f"the training checkpoint {ckpt} is unreadable ({e}); delete {work_dir} to start over") from e
    model.load_state_dict(weights)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        pid, name = key.split(".", 1)
        # Adam keeps 'step' on the CPU, its moments beside the parameters.
        opt_state.setdefault(int(pid), {})[name] = value if name == "step" else value.to(device)
    groups = state.pop("param_groups")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


def _generator_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def _set_generator_state(gen: torch.Generator, encoded: str) -> None:
    gen.set_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


# ------------------------------------------------------------------------------ training
def _coordinate_frame(points: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    labelled = points[valid]
    center = labelled.median(dim=0).values
    scale = float((labelled - center).norm(dim=1).median())
    return center, max(scale, 1e-3)


def _training_step(model: D2SNet, optimizer: torch.optim.Optimizer, batch: Batch, tau_px: float | None,
                   median_depth: float, config: D2STrainConfig, device: torch.device,
                   use_amp: bool) -> dict[str, torch.Tensor]:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        losses = batch_losses(model, batch, tau_px, median_depth, config.reprojection_weight, config.loss_reduction,
                              config.reprojection_keypoints)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return losses


def measure_step_seconds(model: D2SNet, packed: PackedImages, config: D2STrainConfig, device: torch.device,
                         use_amp: bool) -> float:
    """Schedule-weighted seconds per step, from throw-away steps on a copy of the model (the
    training itself, its RNG stream included, stays exactly that of a fixed iteration count).
    Each batch kind (early / full, with / without the reprojection term) runs
    ``calibration_steps`` times; the first of each is a warm-up and is not counted."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(probe.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 7919)
    early = bool(config.early_images_per_batch or config.early_keypoints_per_image) and config.early_fraction > 0
    rf = config.reprojection_fraction
    kinds = []  # (iteration standing for the kind, tau, weight in the schedule)
    for is_early, phase_weight in ((True, config.early_fraction), (False, 1.0 - config.early_fraction)) if early \
            else ((False, 1.0),):
        stand_in = 0 if is_early else None
        # The reprojection phase is the last fraction: it falls within the full-batch phase.
        reproj_share = 0.0 if is_early else (min(rf, phase_weight) / phase_weight if phase_weight > 0 else 0.0)
        kinds.append((stand_in, None, phase_weight * (1.0 - reproj_share)))
        if reproj_share > 0:
            kinds.append((stand_in, config.reprojection_tau_max_px, phase_weight * reproj_share))
    planning = dataclasses.replace(config, iterations=max(1, config.calibration_steps))
    seconds = 0.0
    for stand_in, tau, weight in kinds:
        times = []
        for _ in range(config.calibration_steps):
            t0 = time.perf_counter()
            batch = sample_batch(packed, planning, generator, device, stand_in)
            _training_step(probe, optimizer, batch, tau, packed.median_depth, config, device, use_amp)
            times.append(time.perf_counter() - t0)
        seconds += weight * float(np.median(times[1:]))
    return seconds


def train_d2s(
    real: list[LabelledImage],
    config: D2STrainConfig,
    model_config: D2SConfig,
    work_dir: Path | str,
    synthetic: list[LabelledImage] | None = None,
    progress: bool = True,
    validation: list[LabelledImage] | None = None,
) -> TrainResult:
    """Train D2S on ``real`` (mapping and augmented images) plus optional ``synthetic`` ones.

    Each batch draws ``synthetic_ratio`` of its images from ``synthetic`` when there are any.
    ``validation``: labelled frames disjoint from the training and scoring frames, for the
    learning curves (which also score a few real training frames).
    """
    from offline.progress import progress_bar

    from offline.learning_curves import score_images, train_probe

    t_begin = time.perf_counter()
    if not real:
        raise ValueError("train_d2s needs at least one real labelled image")
    synthetic = list(synthetic or [])
    validation = list(validation or [])
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"

    packed = pack_images(list(real) + synthetic, model_config.descriptor_dim, device,
                         [False] * len(real) + [True] * len(synthetic))
    if not bool((~packed.is_synthetic).any()):
        raise ValueError("every real labelled image is empty (no keypoints)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = D2SNet(model_config)
    if config.head_warmup_iterations:
        zero_attention_residuals(model)
    model.set_coordinate_frame(*_coordinate_frame(packed.points3D.cpu(), packed.valid.cpu()))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    start, seconds_before, history, curves, step_seconds = 0, 0.0, [], [], None
    warmup_summary: dict[str, float] | None = None
    state = _load_checkpoint(work_dir, model, optimizer, device, model_config, packed.fingerprint)
    if state is not None:
        start, seconds_before, history = state["iteration"], state["seconds"], state["history"]
        curves = state.get("curves", [])
        warmup_summary = state.get("head_warmup")
        step_seconds = state.get("step_seconds")
        _set_generator_state(generator, state["generator"])
        if config.train_minutes is not None and state.get("iterations_planned"):
            # The schedule a wall-clock budget fixed is kept: resuming must not re-plan it.
            config = dataclasses.replace(config, iterations=int(state["iterations_planned"]),
                                         curve_points=int(state.get("curve_points", config.curve_points)))

    probe = train_probe(real)

    def curve_point(iteration: int, elapsed: float, **marks: Any) -> None:
        if config.curve_points == 0:
            return
        curves.append({"iteration": iteration, "seconds": elapsed, **marks,
                       "lr": learning_rate(config, max(0, iteration - 1)) if iteration else learning_rate(config, 0),
                       "train": score_images(model, probe, device),
                       "validation": score_images(model, validation, device) if validation else None})
        write_json_atomic(work_dir / CURVES_NAME, {"curves": curves, "iterations_planned": config.iterations,
                                                   "n_validation_frames": len(validation),
                                                   "train_probe": [im.name for im in probe],
                                                   "validation_frames": [im.name for im in validation]})

    if state is None:
        if config.train_minutes is not None and config.curve_points:
            # Lazy imports and first calls (poselib, kernels) would make the first point look several
            # times as costly as the later ones (measured: ~10 s vs ~2 s) and cost training steps.
            score_images(model, probe[:1], device)
        t0 = time.perf_counter()
        curve_point(0, 0.0)
        curve_s = time.perf_counter() - t0
        if config.train_minutes is not None:
            step_seconds = measure_step_seconds(model, packed, config, device, use_amp)
            # The curves may take at most a tenth of the budget: fewer points rather than fewer steps.
            affordable = int(0.1 * 60.0 * config.train_minutes / max(curve_s, 1e-6))
            if config.curve_points and affordable < config.curve_points:
                config = dataclasses.replace(config, curve_points=max(1, affordable))
            fixed_s = (time.perf_counter() - t_begin) + config.curve_points * curve_s
            if config.head_warmup_iterations:
                fixed_s += config.head_warmup_iterations * measure_head_step_seconds(model, packed, config)
            config = dataclasses.replace(config, iterations=iterations_for_budget(
                60.0 * config.train_minutes, step_seconds, fixed_s))
            if curves:
                curves[0]["lr"] = learning_rate(config, 0)
        if config.head_warmup_iterations:
            warmup_summary = head_warmup(model, packed, config, generator, config.head_warmup_iterations, progress)
            curve_point(0, time.perf_counter() - t_begin, after_head_warmup=True)
        seconds_before = time.perf_counter() - t_begin  # planning is part of the training's time
    curve_every = max(1, config.iterations // config.curve_points) if config.curve_points else 0

    def checkpoint(iteration: int, seconds: float) -> None:
        _save_checkpoint(work_dir, model, optimizer, {
            "iteration": iteration, "seconds": seconds, "history": history, "curves": curves,
            "iterations_planned": config.iterations, "step_seconds": step_seconds, "curve_points": config.curve_points,
            "generator": _generator_state(generator), "model_config": model_config.to_dict(),
            "data_fingerprint": packed.fingerprint, "train_config": config.to_dict(), "head_warmup": warmup_summary,
        })

    def result(iteration: int) -> TrainResult:
        return TrainResult(model=model.eval(), history=history, iteration=iteration, curves=curves,
                           iterations_planned=config.iterations, step_seconds=step_seconds,
                           head_warmup=warmup_summary)

    if state is None and config.head_warmup_iterations:
        checkpoint(0, seconds_before)  # an interrupted run resumes after the warm-up, not before it
    if start >= config.iterations:
        return result(start)

    model.train()
    t0 = time.perf_counter()
    window: dict[str, torch.Tensor] = {}
    window_n = 0
    bar = progress_bar(total=config.iterations, initial=start, enabled=progress, desc="train D2S", unit="it")
    completed = start
    try:
        for iteration in range(start, config.iterations):
            lr = learning_rate(config, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sample_batch(packed, config, generator, device, iteration)
            losses = _training_step(model, optimizer, batch, reprojection_threshold_px(config, iteration),
                                    packed.median_depth, config, device, use_amp)
            completed = iteration + 1

            for key, value in losses.items():
                window[key] = window.get(key, 0.0) + value.detach()
            window_n += 1
            if completed % config.log_every == 0 or completed == config.iterations:
                entry = {"iteration": completed, **{k: float(v) / window_n for k, v in window.items()},
                         "lr": lr, "seconds": seconds_before + time.perf_counter() - t0}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", xyz=f"{entry['xyz_loss']:.3f}",
                                rel=f"{entry['rel_loss']:.3f}")
                window, window_n = {}, 0
            if curve_every and (completed % curve_every == 0 or completed == config.iterations):
                curve_point(completed, seconds_before + time.perf_counter() - t0)
            bar.update(1)
            if completed % config.checkpoint_every == 0 and completed != config.iterations:
                checkpoint(completed, seconds_before + time.perf_counter() - t0)
    except KeyboardInterrupt:
        # Keep what was learned: the next call resumes from here.
        checkpoint(completed, seconds_before + time.perf_counter() - t0)
        raise
    finally:
        bar.close()
    checkpoint(completed, seconds_before + time.perf_counter() - t0)
    return result(completed)
