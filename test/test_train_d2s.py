"""D2S training (overfit, schedules, resumability, losses) and the augmentation bank."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.features import make_extractor
from d2s_nerf_ros.geometry import invert_pose, make_pose, matrix_from_rotvec, project_points
from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet
from offline.augment import AugmentConfig, augment_images
from offline.labelled import LabelledImage
from offline.train_d2s import (
    CURVES_NAME, D2STrainConfig, batch_losses, head_warmup, iterations_for_budget, keypoint_pool, learning_rate,
    noisy_descriptors, pack_images, reprojection_threshold_px, sample_batch, sample_keypoints, train_d2s,
    zero_attention_residuals,
)

torch.set_num_threads(1)  # the machine is shared: one thread trains faster than two contended ones

CAMERA = CameraIntrinsics(640, 480, 500.0, 500.0, 320.0, 240.0)


def random_pose(rng: np.random.Generator) -> np.ndarray:
    return make_pose(matrix_from_rotvec(rng.normal(scale=0.3, size=3)), rng.normal(scale=1.0, size=3))


def geometric_image(rng: np.random.Generator, name: str, n: int, dim: int, valid_fraction: float = 0.7,
                    camera: CameraIntrinsics = CAMERA, source: str = "real") -> LabelledImage:
    """Random descriptors; valid keypoints are exact projections of their 3D labels."""
    T_world_cam = random_pose(rng)
    pixels = rng.uniform([0, 0], [camera.width - 1, camera.height - 1], size=(n, 2))
    depth = rng.uniform(1.0, 4.0, size=n)
    rays = np.column_stack([(pixels[:, 0] - camera.cx) / camera.fx, (pixels[:, 1] - camera.cy) / camera.fy,
                            np.ones(n)])
    points_cam = rays * depth[:, None]
    points = points_cam @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
    valid = rng.random(n) < valid_fraction
    points[~valid] = np.nan  # undefined where invalid: training must not care
    descriptors = rng.normal(size=(n, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return LabelledImage(name, pixels.astype(np.float32), descriptors, points.astype(np.float32), valid,
                         camera, T_world_cam, source)


SMALL = dict(n_layers=2, head_dims=(256, 256))


# ------------------------------------------------------------------------------ schedules
def test_learning_rate_schedule_hand_computed():
    config = D2STrainConfig(iterations=1000, lr=5e-4, warmup_fraction=0.02)
    expected = {0: 5e-5, 10: 5e-4 * (0.1 + 0.9 * 0.5), 20: 5e-4, 249: 5e-4, 250: 2.5e-4,
                499: 2.5e-4, 500: 1.25e-4, 750: 6.25e-5, 999: 6.25e-5}
    for iteration, lr in expected.items():
        assert learning_rate(config, iteration) == pytest.approx(lr), iteration


def test_cosine_and_onecycle_schedules_anneal_fully():
    cosine = D2STrainConfig(iterations=1001, lr=2e-3, warmup_fraction=0.0, lr_schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(2e-3)
    assert learning_rate(cosine, 500) == pytest.approx(1e-3)  # half-way down the cosine
    assert learning_rate(cosine, 1000) == pytest.approx(0.0, abs=1e-12)  # the last step: fully annealed
    one = D2STrainConfig(iterations=1001, lr=3e-3, lr_schedule="onecycle", onecycle_rise_fraction=0.25)
    assert learning_rate(one, 0) == pytest.approx(3e-3 / 25)
    assert learning_rate(one, 125) == pytest.approx((3e-3 / 25 + 3e-3) / 2)
    assert learning_rate(one, 250) == pytest.approx(3e-3)
    assert learning_rate(one, 1000) == pytest.approx(3e-3 / 25 / 1e4)
    lrs = [learning_rate(one, i) for i in range(250, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone anneal after the peak
    with pytest.raises(ValueError, match="lr_schedule"):
        D2STrainConfig(lr_schedule="linear")


def test_wall_clock_plan_fits_the_budget_with_its_anneal():
    budget_s, step_s, fixed_s = 600.0, 0.37, 25.0
    n = iterations_for_budget(budget_s, step_s, fixed_s)
    assert n == math.floor((0.95 * budget_s - fixed_s) / step_s)
    # The whole schedule, anneal included, ends inside the budget at the measured step time, and
    # one more step's worth of margin is left for drift.
    assert fixed_s + n * step_s <= budget_s - step_s
    config = D2STrainConfig(iterations=n, lr=2e-3, lr_schedule="cosine")
    assert learning_rate(config, n - 1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="fits only"):
        iterations_for_budget(3.0, 0.5, 2.0)
    with pytest.raises(ValueError):
        iterations_for_budget(60.0, 0.0, 1.0)


def test_reprojection_threshold_shrinks_over_the_last_fifth():
    config = D2STrainConfig(iterations=1000, reprojection_fraction=0.2,
                            reprojection_tau_max_px=50.0, reprojection_tau_min_px=1.0)
    assert reprojection_threshold_px(config, 799) is None
    assert reprojection_threshold_px(config, 800) == pytest.approx(50.0)
    assert reprojection_threshold_px(config, 900) == pytest.approx(1.0 + 49.0 * math.sqrt(0.5))
    assert reprojection_threshold_px(config, 999) == pytest.approx(1.0 + 49.0 * math.sqrt(1 / 200))
    assert reprojection_threshold_px(D2STrainConfig(iterations=10, reprojection_fraction=0.0), 9) is None


# ------------------------------------------------------------------------------ losses and batches
def test_losses_match_an_independent_computation():
    rng = np.random.default_rng(1)
    images = [geometric_image(rng, f"im{i}", 60 + 20 * i, 32) for i in range(2)]
    torch.manual_seed(0)
    model = D2SNet(D2SConfig(32, **SMALL))
    # Predictions near the labels' centre, so that most are in front of both cameras.
    labelled = np.concatenate([im.points3D[im.valid] for im in images])
    model.set_coordinate_frame(torch.from_numpy(np.median(labelled, axis=0)), 0.3)
    config = D2STrainConfig(iterations=10, images_per_batch=2, max_keypoints_per_image=1000, device="cpu")
    packed = pack_images(images, 32, torch.device("cpu"), [False, False])
    batch = sample_batch(packed, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    tau = 7.0
    with torch.no_grad():
        losses = batch_losses(model, batch, tau, median_depth=2.0, reprojection_weight=0.5)
        xyz, u = model(batch.descriptors, batch.mask)
    # Independent evaluation: per image with numpy and cv2.projectPoints.
    xyz_terms, rel_terms, reproj_terms, n_valid = [], [], [], 0
    for b in range(2):
        m = batch.mask[b].numpy()
        # identify the image of this row by its intrinsics-free data: its descriptors
        image = next(im for im in images if len(im.keypoints) == m.sum())
        order = [int(np.flatnonzero((image.descriptors == d).all(1))[0]) for d in batch.descriptors[b][m].numpy()]
        pred = xyz[b][m].numpy().astype(np.float64)
        r = 1.0 / (1.0 + 100.0 * np.abs(u[b][m].numpy()))
        valid = image.valid[order]
        xyz_terms += list(np.linalg.norm(pred[valid] - image.points3D[order][valid], axis=1))
        rel_terms.append(np.sqrt(np.mean((valid.astype(float) - r) ** 2)))
        T_cam_world = invert_pose(image.T_world_cam)
        rvec, _ = cv2.Rodrigues(T_cam_world[:3, :3])
        uv, _ = cv2.projectPoints(pred[valid], rvec, T_cam_world[:3, 3], CAMERA.K, None)
        z = (pred[valid] @ T_cam_world[:3, :3].T + T_cam_world[:3, 3])[:, 2]
        err = np.linalg.norm(uv.reshape(-1, 2) - image.keypoints[order][valid], axis=1)
        robust = np.where(z > 0.1, tau * np.tanh(err / tau), 0.0)
        reproj_terms += list(robust / CAMERA.fx * 2.0)
        n_valid += int(valid.sum())
    assert losses["xyz_loss"].item() == pytest.approx(np.sum(xyz_terms) / n_valid, rel=1e-4)
    assert losses["rel_loss"].item() == pytest.approx(np.mean(rel_terms), rel=1e-4)
    assert losses["reproj_loss"].item() == pytest.approx(0.5 * np.sum(reproj_terms) / n_valid, rel=1e-4)
    assert losses["reproj_loss"].item() > 0
    assert losses["loss"].item() == pytest.approx(
        losses["xyz_loss"].item() + losses["rel_loss"].item() + losses["reproj_loss"].item(), rel=1e-5)


def test_reprojection_term_sees_the_keypoints_it_is_told_to():
    # The published D2S code applies the reprojection term to keypoints *without* a 3D label;
    # this package's default applies it to the labelled ones. Checked against per-keypoint
    # projections with cv2, for each choice and for both reductions.
    rng = np.random.default_rng(11)
    images = [geometric_image(rng, f"u{i}", 80 + 10 * i, 32, valid_fraction=0.5) for i in range(2)]
    torch.manual_seed(0)
    model = D2SNet(D2SConfig(32, **SMALL)).eval()
    labelled = np.concatenate([im.points3D[im.valid] for im in images])
    model.set_coordinate_frame(torch.from_numpy(np.median(labelled, axis=0)), 0.3)
    config = D2STrainConfig(iterations=10, images_per_batch=2, max_keypoints_per_image=1000, device="cpu")
    packed = pack_images(images, 32, torch.device("cpu"), [False, False])
    batch = sample_batch(packed, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    tau = 5000.0  # wide enough that tanh does not saturate, so that each keypoint's error counts
    with torch.no_grad():
        xyz, _ = model(batch.descriptors, batch.mask)
        got = {(which, red): batch_losses(model, batch, tau, 2.0, 2.0, reduction=red,
                                          reprojection_keypoints=which)["reproj_loss"].item()
               for which in ("labelled", "unlabelled", "all") for red in ("normalised", "published")}
    terms = {"labelled": [], "unlabelled": []}   # per image: robust errors in metres
    for b in range(2):
        m = batch.mask[b].numpy()
        image = next(im for im in images if len(im.keypoints) == m.sum())
        order = [int(np.flatnonzero((image.descriptors == d).all(1))[0]) for d in batch.descriptors[b][m].numpy()]
        pred = xyz[b][m].numpy().astype(np.float64)
        T_cam_world = invert_pose(image.T_world_cam)
        rvec, _ = cv2.Rodrigues(T_cam_world[:3, :3])
        uv, _ = cv2.projectPoints(pred, rvec, T_cam_world[:3, 3], CAMERA.K, None)
        z = (pred @ T_cam_world[:3, :3].T + T_cam_world[:3, 3])[:, 2]
        err = np.linalg.norm(uv.reshape(-1, 2) - image.keypoints[order], axis=1)
        metres = np.where(z > 0.1, tau * np.tanh(err / tau), 0.0) / CAMERA.fx * 2.0
        valid = image.valid[order]
        terms["labelled"].append(metres[valid])
        terms["unlabelled"].append(metres[~valid])
    terms["all"] = [np.concatenate(pair) for pair in zip(terms["labelled"], terms["unlabelled"])]
    n_labelled = sum(len(t) for t in terms["labelled"])
    assert 0 < n_labelled < int(batch.mask.sum())
    for which in ("labelled", "unlabelled", "all"):
        per_image = terms[which]
        # normalised: a mean over the keypoints seen (the labelled count for "labelled", as before)
        assert got[(which, "normalised")] == pytest.approx(
            2.0 * sum(t.sum() for t in per_image) / sum(len(t) for t in per_image), rel=1e-4)
        # published: per-image sums, mean over the images
        assert got[(which, "published")] == pytest.approx(2.0 * np.mean([t.sum() for t in per_image]), rel=1e-4)
    assert got[("unlabelled", "normalised")] != pytest.approx(got[("labelled", "normalised")], rel=1e-3)
    with pytest.raises(ValueError, match="reprojection_keypoints"):
        D2STrainConfig(reprojection_keypoints="some")
    with pytest.raises(ValueError, match="reprojection_weight"):
        D2STrainConfig(reprojection_weight=-1.0)


def test_batches_subsample_keypoints_and_mix_synthetic_images():
    rng = np.random.default_rng(2)
    real = [geometric_image(rng, f"r{i}", 300, 16) for i in range(3)]
    syn_camera = CameraIntrinsics(640, 480, 400.0, 400.0, 320.0, 240.0)
    synthetic = [geometric_image(rng, f"s{i}", 50, 16, camera=syn_camera, source="synthetic") for i in range(3)]
    packed = pack_images(real + synthetic, 16, torch.device("cpu"), [False] * 3 + [True] * 3)
    config = D2STrainConfig(iterations=10, images_per_batch=4, max_keypoints_per_image=128, synthetic_ratio=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = sample_batch(packed, config, gen, torch.device("cpu"))
        assert batch.descriptors.shape == (4, 128, 16)
        fx = batch.intrinsics[:, 0]
        assert int((fx == 400.0).sum()) == 2  # 4 x 0.5 synthetic, exactly
        counts = batch.mask.sum(1)
        assert torch.equal(counts[fx == 500.0], torch.full((2,), 128))   # real: capped at 128
        assert torch.equal(counts[fx == 400.0], torch.full((2,), 50))    # synthetic: all 50
        # Sampled rows are distinct keypoints of one image.
        for b in range(4):
            rows = batch.descriptors[b][batch.mask[b]]
            assert len(torch.unique(rows, dim=0)) == len(rows)


def test_early_batches_have_more_images_with_fewer_keypoints():
    rng = np.random.default_rng(5)
    packed = pack_images([geometric_image(rng, f"r{i}", 300, 16) for i in range(6)], 16, torch.device("cpu"), [False] * 6)
    config = D2STrainConfig(iterations=100, images_per_batch=2, max_keypoints_per_image=256,
                            early_images_per_batch=6, early_keypoints_per_image=64, early_fraction=0.5)
    gen = torch.Generator().manual_seed(0)
    assert sample_batch(packed, config, gen, torch.device("cpu"), 0).descriptors.shape == (6, 64, 16)
    assert sample_batch(packed, config, gen, torch.device("cpu"), 49).descriptors.shape == (6, 64, 16)
    assert sample_batch(packed, config, gen, torch.device("cpu"), 50).descriptors.shape == (2, 256, 16)
    assert sample_batch(packed, config, gen, torch.device("cpu")).descriptors.shape == (2, 256, 16)


def test_published_reduction_sums_per_image():
    rng = np.random.default_rng(6)
    images = [geometric_image(rng, f"r{i}", 100, 16) for i in range(3)]
    packed = pack_images(images, 16, torch.device("cpu"), [False] * 3)
    config = D2STrainConfig(iterations=10, images_per_batch=3, max_keypoints_per_image=100)
    batch = sample_batch(packed, config, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.manual_seed(0)
    model = D2SNet(D2SConfig(16, **SMALL)).eval()
    with torch.no_grad():
        norm = batch_losses(model, batch, None, 2.0, 1.0)
        pub = batch_losses(model, batch, None, 2.0, 1.0, reduction="published")
        xyz, u = model(batch.descriptors, batch.mask)
    from d2s_nerf_ros.models.d2s import reliability

    valid = batch.valid.float()
    err = (xyz - batch.points3D).norm(dim=-1)
    assert float(pub["xyz_loss"]) == pytest.approx(float((err * valid).sum() / 3), rel=1e-5)
    assert float(pub["xyz_loss"]) == pytest.approx(float(norm["xyz_loss"]) * float(valid.sum()) / 3, rel=1e-5)
    per_image = torch.sqrt(((valid - reliability(u)) ** 2 * batch.mask.float()).sum(1))
    assert float(pub["rel_loss"]) == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert float(pub["rel_loss"]) == pytest.approx(float(norm["rel_loss"]) * 10.0, rel=1e-4)  # sqrt(100 keypoints)


def test_ignored_synthetic_unlabelled_keypoints_leave_the_reliability_loss():
    rng = np.random.default_rng(5)
    real = [geometric_image(rng, "r0", 80, 16, valid_fraction=0.5)]
    syn_camera = CameraIntrinsics(640, 480, 400.0, 400.0, 320.0, 240.0)  # tells the rows apart
    synthetic = [geometric_image(rng, "s0", 80, 16, valid_fraction=0.25, camera=syn_camera, source="synthetic")]
    packed = pack_images(real + synthetic, 16, torch.device("cpu"), [False, True])
    torch.manual_seed(0)
    model = D2SNet(D2SConfig(16, **SMALL))
    rel = {}
    for mode in ("unreliable", "ignored"):
        config = D2STrainConfig(iterations=10, images_per_batch=2, max_keypoints_per_image=200,
                                synthetic_ratio=0.5, synthetic_unlabelled=mode)
        gen = torch.Generator().manual_seed(3)
        while True:  # a batch with one real and one synthetic image
            batch = sample_batch(packed, config, gen, torch.device("cpu"))
            is_syn = batch.intrinsics[:, 0] == 400.0
            if int(is_syn.sum()) == 1:
                break
        with torch.no_grad():
            rel[mode] = batch_losses(model, batch, None, 2.0, 1.0)["rel_loss"].item()
            _, u = model(batch.descriptors, batch.mask)
        r = (1.0 / (1.0 + 100.0 * u.abs())).numpy()
        v = batch.valid.numpy().astype(float)
        terms = []
        for b in range(2):
            seen = batch.mask[b].numpy().copy()
            if mode == "ignored" and is_syn[b]:
                seen &= batch.valid[b].numpy()          # the render's unlabelled keypoints say nothing
                assert seen.sum() < batch.mask[b].sum()
            else:
                assert torch.equal(batch.rel_mask[b], batch.mask[b])
            terms.append(np.sqrt(np.mean((v[b][seen] - r[b][seen]) ** 2)))
        assert rel[mode] == pytest.approx(np.mean(terms), rel=1e-4)
    assert rel["unreliable"] != pytest.approx(rel["ignored"], rel=1e-3)
    with pytest.raises(ValueError, match="synthetic_unlabelled"):
        D2STrainConfig(synthetic_unlabelled="dropped")


def test_bad_training_input(tmp_path):
    rng = np.random.default_rng(3)
    image = geometric_image(rng, "a", 20, 16)
    config = D2STrainConfig(iterations=2, device="cpu")
    with pytest.raises(ValueError, match="at least one real"):
        train_d2s([], config, D2SConfig(16), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="dimension 32"):
        train_d2s([image], config, D2SConfig(32), tmp_path / "b", progress=False)
    no_labels = geometric_image(rng, "b", 20, 16, valid_fraction=0.0)
    with pytest.raises(ValueError, match="no training keypoint has a valid"):
        train_d2s([no_labels], config, D2SConfig(16), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="reprojection_fraction"):
        D2STrainConfig(reprojection_fraction=1.5)


# ------------------------------------------------------------------------------ training
@pytest.mark.builds  # trains a D2S model: minutes on 2 cores
def test_overfits_a_tiny_labelled_set(tmp_path):
    rng = np.random.default_rng(0)
    images = [geometric_image(rng, f"im{i}", 200, 64) for i in range(2)]
    config = D2STrainConfig(iterations=400, images_per_batch=2, max_keypoints_per_image=256, lr=1e-3,
                            device="cpu", log_every=20, checkpoint_every=10_000)
    result = train_d2s(images, config, D2SConfig(64, **SMALL), tmp_path, progress=False)
    assert result.iteration == 400 and not result.model.training
    for im in images:
        xyz, r = result.model.predict(torch.from_numpy(im.descriptors))
        err = np.linalg.norm(xyz.numpy() - im.points3D, axis=1)[im.valid]
        # Labels span metres (a constant guess is ~1 m off); the fit must be at the cm level.
        assert np.median(err) < 0.08, np.median(err)
        r = r.numpy()
        assert np.median(r[im.valid]) > 0.8 and np.median(r[~im.valid]) < 0.2
        assert np.quantile(r[im.valid], 0.05) > np.quantile(r[~im.valid], 0.95)
    h = result.history
    assert [e["iteration"] for e in h] == list(range(20, 401, 20))
    assert h[-1]["xyz_loss"] < 0.2 * h[0]["xyz_loss"]
    # The robust reprojection term is on in the last 20 % only.
    assert all(e["reproj_loss"] == 0.0 for e in h if e["iteration"] <= 320)
    assert all(e["reproj_loss"] > 0.0 for e in h if e["iteration"] > 320)
    assert h[-1]["lr"] == pytest.approx(1e-3 / 8)


def test_learning_curves_of_a_tiny_training(tmp_path):
    rng = np.random.default_rng(7)
    images = [geometric_image(rng, f"im{i}", 200, 64) for i in range(2)]
    validation = [geometric_image(rng, f"val{i}", 200, 64) for i in range(2)]
    config = D2STrainConfig(iterations=300, images_per_batch=2, max_keypoints_per_image=256, lr=1e-3,
                            lr_schedule="cosine", device="cpu", log_every=50, checkpoint_every=10_000, curve_points=3)
    result = train_d2s(images, config, D2SConfig(64, **SMALL), tmp_path, progress=False, validation=validation)
    doc = json.loads((tmp_path / CURVES_NAME).read_text())
    assert doc["curves"] == result.curves
    assert [c["iteration"] for c in doc["curves"]] == [0, 100, 200, 300]
    assert doc["validation_frames"] == ["val0", "val1"] and doc["train_probe"] == ["im0", "im1"]
    first, last = doc["curves"][0], doc["curves"][-1]
    for point in (first, last):
        for part in ("train", "validation"):
            assert point[part]["n_images"] == 2 and point[part]["n_labelled"] > 200
    # It fits its training frames (cm-level labels, poses recovered) ...
    assert last["train"]["median_error_m"] < 0.2 * first["train"]["median_error_m"]
    assert last["train"]["reliable_within_10cm"] > 0.5 and last["train"]["reliable_per_image"] > 50
    assert last["train"]["pose_failed"] == 0 and last["train"]["median_pose_t_m"] < 0.1
    # ... and, with random descriptors, learns nothing that carries over: the validation curve says so.
    assert last["validation"]["median_error_m"] > 5 * last["train"]["median_error_m"]
    assert last["lr"] == pytest.approx(0.0, abs=1e-9)


def test_wall_clock_budget_fixes_a_schedule_that_completes(tmp_path):
    rng = np.random.default_rng(8)
    images = [geometric_image(rng, f"im{i}", 100, 32) for i in range(2)]
    config = D2STrainConfig(iterations=1, train_minutes=0.1, images_per_batch=2, max_keypoints_per_image=64,
                            lr_schedule="onecycle", device="cpu", checkpoint_every=10_000, curve_points=2,
                            calibration_steps=3)
    result = train_d2s(images, config, D2SConfig(32, n_layers=1, head_dims=(64,)), tmp_path, progress=False)
    assert result.step_seconds > 0 and result.iterations_planned >= 10
    assert result.iteration == result.iterations_planned  # the schedule ran to its end ...
    assert result.history[-1]["lr"] == pytest.approx(config.lr / 25 / 1e4, rel=1e-6)  # ... fully annealed
    assert [c["iteration"] for c in result.curves][-1] == result.iterations_planned
    # A rerun resumes with the planned count; it does not plan again.
    again = train_d2s(images, config, D2SConfig(32, n_layers=1, head_dims=(64,)), tmp_path, progress=False)
    assert again.iteration == again.iterations_planned == result.iterations_planned
    assert again.step_seconds == result.step_seconds


def test_descriptor_noise_keeps_norms_and_has_the_asked_size():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(4000, 128, generator=g), dim=1) * 3.0
    assert noisy_descriptors(d, 0.0, g) is d
    noisy = noisy_descriptors(d, 0.2, g)
    torch.testing.assert_close(noisy.norm(dim=1), d.norm(dim=1))
    # The noise vector's expected norm is 0.2 of the descriptor's; after rescaling to the sphere the
    # angle moved is about atan(0.2) ~ 0.197 rad.
    angle = torch.arccos((noisy * d).sum(1) / 9.0).clamp(max=3.0)
    assert float(angle.mean()) == pytest.approx(math.atan(0.2), rel=0.05)
    # Batches draw it from the training generator: the same seed, the same batch.
    rng = np.random.default_rng(3)
    packed = pack_images([geometric_image(rng, "a", 60, 16)], 16, torch.device("cpu"), [False])
    config = D2STrainConfig(images_per_batch=1, descriptor_noise=0.1)
    a = sample_batch(packed, config, torch.Generator().manual_seed(5), torch.device("cpu"))
    b = sample_batch(packed, config, torch.Generator().manual_seed(5), torch.device("cpu"))
    clean = sample_batch(packed, D2STrainConfig(images_per_batch=1), torch.Generator().manual_seed(5), torch.device("cpu"))
    torch.testing.assert_close(a.descriptors, b.descriptors)
    assert not torch.allclose(a.descriptors[a.mask], clean.descriptors[clean.mask])
    with pytest.raises(ValueError, match="descriptor_noise"):
        D2STrainConfig(descriptor_noise=-0.1)


# ------------------------------------------------------------------------------ head warm-up
def test_head_warmup_batches_mix_sources_by_keypoint():
    rng = np.random.default_rng(11)
    real = [geometric_image(rng, f"r{i}", 50, 16) for i in range(3)]
    syn = [geometric_image(rng, f"s{i}", 80, 16, source="synthetic") for i in range(2)]
    packed = pack_images(real + syn, 16, torch.device("cpu"), [False] * 3 + [True] * 2)
    pool = keypoint_pool(packed)
    assert len(pool.real) == 150 and len(pool.synthetic) == 160
    assert pool.is_synthetic.sum() == 160 and not pool.is_synthetic[:150].any()
    config = D2STrainConfig(head_warmup_batch=1000, synthetic_ratio=0.3)
    flat = torch.cat([sample_keypoints(pool, config, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len(flat) == 20_000
    share = float(pool.is_synthetic[flat].float().mean())
    assert share == pytest.approx(0.3, abs=0.02)
    # Every keypoint of the pool can be drawn (not only the first of each image).
    assert len(torch.unique(flat)) > 0.99 * 310


@pytest.mark.builds  # trains a D2S head: seconds to a minute on 2 cores
def test_head_warmup_fits_keypoints_and_hands_over_the_same_model():
    rng = np.random.default_rng(12)
    images = [geometric_image(rng, f"im{i}", 150, 32) for i in range(2)]
    packed = pack_images(images, 32, torch.device("cpu"), [False, False])
    torch.manual_seed(0)
    model = D2SNet(D2SConfig(32, n_layers=2, head_dims=(128, 128)))
    model.set_coordinate_frame(packed.points3D[packed.valid].median(0).values, 1.0)
    zero_attention_residuals(model)
    head_before = _state(model)
    config = D2STrainConfig(head_warmup_batch=256, head_warmup_lr=3e-3)
    summary = head_warmup(model, packed, config, torch.Generator().manual_seed(0), 600)
    assert summary["iterations"] == 600 and summary["final_xyz_loss"] < 0.1
    after = _state(model)
    # Only the head moved; the attention layers are untouched (and still the identity).
    for key, value in after.items():
        assert torch.equal(value, head_before[key]) == (not key.startswith("head")), key
    model.eval()
    for im in images:
        d = torch.from_numpy(im.descriptors)
        xyz, u = model(d[None])
        xyz_head, u_head = model.regress(d)
        torch.testing.assert_close(xyz[0], xyz_head)
        torch.testing.assert_close(u[0], u_head)
        xyz, r = model.predict(d)
        err = np.linalg.norm(xyz.numpy() - im.points3D, axis=1)[im.valid]
        assert np.median(err) < 0.1, np.median(err)  # labels span metres
        r = r.numpy()
        assert np.median(r[im.valid]) > 0.7 and np.median(r[~im.valid]) < 0.3


def test_head_warmup_runs_once_inside_the_wall_clock_budget(tmp_path):
    rng = np.random.default_rng(13)
    images = [geometric_image(rng, f"im{i}", 100, 32) for i in range(2)]
    config = D2STrainConfig(iterations=1, train_minutes=0.15, images_per_batch=2, max_keypoints_per_image=64,
                            lr_schedule="onecycle", device="cpu", checkpoint_every=10_000, curve_points=2,
                            calibration_steps=3, head_warmup_iterations=40, head_warmup_batch=128)
    model_config = D2SConfig(32, n_layers=1, head_dims=(64,))
    result = train_d2s(images, config, model_config, tmp_path, progress=False)
    assert result.head_warmup["iterations"] == 40 and result.head_warmup["seconds"] > 0
    assert result.iteration == result.iterations_planned >= 10
    assert result.history[-1]["lr"] == pytest.approx(config.lr / 25 / 1e4, rel=1e-6)
    # Curves: before training, after the warm-up, then the full model's points.
    assert [c.get("after_head_warmup", False) for c in result.curves[:2]] == [False, True]
    assert [c["iteration"] for c in result.curves[:2]] == [0, 0]
    state = json.loads((tmp_path / json.loads((tmp_path / "latest.json").read_text())["checkpoint"]
                        / "state.json").read_text())
    assert state["head_warmup"] == result.head_warmup
    # A rerun resumes the finished training: no second warm-up, the same weights.
    again = train_d2s(images, config, model_config, tmp_path, progress=False)
    assert again.head_warmup == result.head_warmup and again.iteration == result.iteration
    for key, value in _state(again.model).items():
        assert torch.equal(value, _state(result.model)[key])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.builds  # trains a D2S model: minutes on 2 cores
def test_training_resumes_from_its_checkpoint(tmp_path, capsys):
    rng = np.random.default_rng(4)
    images = [geometric_image(rng, f"im{i}", 100, 32) for i in range(3)]
    model_config = D2SConfig(32, n_layers=1, head_dims=(64, 64))
    # A constant learning rate makes 40 + 40 iterations the very same computation as 80.
    common = dict(images_per_batch=2, max_keypoints_per_image=64, device="cpu", warmup_fraction=0.0,
                  lr_halving_fractions=(), reprojection_fraction=0.0, log_every=10, checkpoint_every=15)
    first = train_d2s(images, D2STrainConfig(iterations=40, **common), model_config, tmp_path / "a")
    assert "train D2S" in capsys.readouterr().err  # the progress bar
    assert first.iteration == 40
    pointer = json.loads((tmp_path / "a" / "latest.json").read_text())
    assert pointer["checkpoint"] == "ckpt-000000040"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ckpt-000000040", "latest.json", "learning_curves.json"]

    second = train_d2s(images, D2STrainConfig(iterations=80, **common), model_config, tmp_path / "a",
                       progress=False)
    assert second.iteration == 80
    assert [e["iteration"] for e in second.history] == list(range(10, 81, 10))
    assert second.history[:4] == first.history
    assert second.history[4]["seconds"] >= first.history[-1]["seconds"]

    straight = train_d2s(images, D2STrainConfig(iterations=80, **common), model_config, tmp_path / "b",
                         progress=False)
    resumed_state, straight_state = _state(second.model), _state(straight.model)
    for key in straight_state:
        torch.testing.assert_close(resumed_state[key], straight_state[key], atol=1e-5, rtol=1e-4)
    # It did learn in the second half (did not restart and did not stand still).
    assert not torch.equal(_state(first.model)["head_out.weight"], resumed_state["head_out.weight"])

    # Finished: a further call returns at once with the same model and history.
    t0 = time.perf_counter()
    again = train_d2s(images, D2STrainConfig(iterations=80, **common), model_config, tmp_path / "a",
                      progress=False)
    assert time.perf_counter() - t0 < 5.0
    assert again.iteration == 80 and again.history == second.history
    for key, value in _state(again.model).items():
        assert torch.equal(value, resumed_state[key])

    # A checkpoint of another model or other data is refused rather than silently mixed.
    with pytest.raises(ValueError, match="another model config"):
        train_d2s(images, D2STrainConfig(iterations=80, **common), D2SConfig(32, n_layers=2, head_dims=(64, 64)),
                  tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="other data"):
        train_d2s(images[:2], D2STrainConfig(iterations=80, **common), model_config, tmp_path / "a",
                  progress=False)


# ------------------------------------------------------------------------------ augmentation
def texture_image(rng: np.random.Generator, width: int = 640, height: int = 480) -> np.ndarray:
    """Multi-scale smoothed noise: rich in corners at every scale, like a real surface."""
    image = np.zeros((height, width), np.float32)
    for sigma in (1.5, 4.0, 10.0):
        noise = rng.normal(size=(height, width)).astype(np.float32)
        image += cv2.GaussianBlur(noise, (0, 0), sigma) * sigma
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return cv2.cvtColor(image.astype(np.uint8), cv2.COLOR_GRAY2RGB)


def label_by_depth(features, camera: CameraIntrinsics, T_world_cam: np.ndarray, depth_at) -> LabelledImage:
    """3D labels that reproject exactly onto the keypoints (depth_at: undistorted pixels -> metres)."""
    ideal = camera.undistort_points(features.keypoints)
    depth = depth_at(ideal)
    valid = np.isfinite(depth) & (depth > 0)
    rays = np.column_stack([(ideal[:, 0] - camera.cx) / camera.fx, (ideal[:, 1] - camera.cy) / camera.fy,
                            np.ones(len(ideal))])
    points = (rays * np.where(valid, depth, 1.0)[:, None]) @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
    return LabelledImage("orig", features.keypoints, features.descriptors, points.astype(np.float32), valid,
                         camera, T_world_cam)


def check_augmented(original: LabelledImage, augmented: list[LabelledImage], config: AugmentConfig,
                    min_labelled_fraction: float) -> None:
    cam0 = original.camera
    aspect = max(cam0.fx, cam0.fy) / min(cam0.fx, cam0.fy)
    for aug in augmented:
        assert aug.source == "augmented" and aug.descriptors.shape[1] == original.descriptors.shape[1]
        cam = aug.camera
        scale = cam.fx / cam0.fx
        assert config.scale_range[0] - 1e-9 <= scale <= config.scale_range[1] + 1e-9
        assert cam.fy / cam0.fy == pytest.approx(scale)
        assert (cam.cx, cam.cy, cam.width, cam.height) == (cam0.cx, cam0.cy, cam0.width, cam0.height)
        assert not cam.has_distortion
        # The augmented camera is the original one rotated about its optical axis.
        np.testing.assert_allclose(aug.T_world_cam[:3, 3], original.T_world_cam[:3, 3], atol=1e-12)
        np.testing.assert_allclose(aug.T_world_cam[:3, 2], original.T_world_cam[:3, 2], atol=1e-12)
        R_rel = original.T_world_cam[:3, :3].T @ aug.T_world_cam[:3, :3]
        angle = math.degrees(math.atan2(R_rel[1, 0], R_rel[0, 0]))
        assert abs(angle) <= config.max_rotation_deg + 1e-9
        # Every label reprojects onto its new keypoint within the matching radius
        # (carried to the augmented image by the warp, at most scale x aspect).
        uv, z = project_points(invert_pose(aug.T_world_cam), cam.K, aug.points3D[aug.valid].astype(np.float64))
        err = np.linalg.norm(uv - aug.keypoints[aug.valid], axis=1)
        assert (z > 0).all()
        assert err.max() <= config.label_radius_px * scale * aspect + 0.01, err.max()
        assert aug.valid.mean() >= min_labelled_fraction, aug.valid.mean()


@pytest.mark.parametrize("camera", [
    CameraIntrinsics(640, 480, 500.0, 560.0, 330.5, 235.0),
    CameraIntrinsics(640, 480, 520.0, 520.0, 320.0, 240.0, "plumb_bob", (-0.12, 0.03, 0.001, -0.0005, 0.0)),
], ids=["non-square-pixels", "plumb-bob"])
def test_augmented_labels_reproject_with_the_returned_camera(camera):
    rng = np.random.default_rng(5)
    image = texture_image(rng)
    T_world_cam = random_pose(rng)
    extractor = make_extractor("sift", max_keypoints=1500, device="cpu")
    features = extractor.extract(image)

    # A tilted surface in front of the camera: depth = 2 + 0.6 x_n - 0.3 y_n.
    def depth_at(pixels: np.ndarray) -> np.ndarray:
        return 2.0 + 0.6 * (pixels[:, 0] - camera.cx) / camera.fx - 0.3 * (pixels[:, 1] - camera.cy) / camera.fy

    original = label_by_depth(features, camera, T_world_cam, depth_at)
    config = AugmentConfig(n_per_image=3, seed=1)
    augmented = augment_images([(image, original)], extractor, config)
    assert len(augmented) == 3
    check_augmented(original, augmented, config, min_labelled_fraction=0.2)
    # Deterministic: the same seed gives the same bank.
    again = augment_images([(image, original)], extractor, config)
    np.testing.assert_array_equal(again[0].keypoints, augmented[0].keypoints)


def test_augmentation_on_a_real_redkitchen_frame(redkitchen_dir: Path):
    frame = redkitchen_dir / "seq-01" / "frame-000000"
    image = cv2.cvtColor(cv2.imread(str(frame) + ".color.jpg"), cv2.COLOR_BGR2RGB)
    depth_raw = cv2.imread(str(frame) + ".depth.png", cv2.IMREAD_UNCHANGED)
    depth_m = np.where((depth_raw == 0) | (depth_raw == 65535), np.nan, depth_raw / 1000.0)
    T_world_cam = np.loadtxt(str(frame) + ".pose.txt")
    camera = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0)
    extractor = make_extractor("sift", max_keypoints=1024, device="cpu")

    def depth_at(pixels: np.ndarray) -> np.ndarray:
        ij = np.round(pixels).astype(int)
        ij[:, 0] = ij[:, 0].clip(0, 639)
        ij[:, 1] = ij[:, 1].clip(0, 479)
        return depth_m[ij[:, 1], ij[:, 0]]

    original = label_by_depth(extractor.extract(image), camera, T_world_cam, depth_at)
    assert original.n_valid > 500
    config = AugmentConfig(n_per_image=2, seed=0)
    check_augmented(original, augment_images([(image, original)], extractor, config), config,
                    min_labelled_fraction=0.2)


def test_augment_rejects_mismatched_images():
    rng = np.random.default_rng(6)
    extractor = make_extractor("sift", max_keypoints=200, device="cpu")
    image = texture_image(rng)
    original = label_by_depth(extractor.extract(image), CAMERA, np.eye(4), lambda p: np.full(len(p), 2.0))
    with pytest.raises(ValueError, match="320x240 but its camera is 640x480"):
        augment_images([(cv2.resize(image, (320, 240)), original)], extractor, AugmentConfig(n_per_image=1))
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.5, 0.5))
