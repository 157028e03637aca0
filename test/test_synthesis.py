"""Render filtering, synthetic labels and the synthesis stage, on controlled cases.

The stage test renders with an exact renderer of the generated room (``test_nerf.render_room``),
an implementation of the ``Renderer`` interface whose depth is the truth, so every synthetic
label can be checked against the true 3D point of its keypoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose, make_pose, project_points, transform_points
from offline.labelled import LabelledImage, load_labelled
from offline.nerf.renderer import Renderer, RenderResult, choose_renderer
from offline.synthesis.filtering import FilterConfig, filter_renders, match_count_histogram, match_render
from offline.synthesis.labels import SyntheticLabelConfig, synthetic_labels
from test_nerf import cast_room, look_rotation, render_room, room_frames


# ----------------------------------------------------------------------------------- filter


@pytest.fixture(scope="module")
def sift_and_mnn():
    from d2s_nerf_ros.features import make_extractor
    from offline.matching import make_matcher

    return make_extractor("sift", max_keypoints=512, device="cpu"), make_matcher("mnn", "sift", device="cpu")


def test_filter_counts_on_a_real_image_itself_and_noise(redkitchen_dir, sift_and_mnn):
    extractor, matcher = sift_and_mnn
    real = cv2.cvtColor(cv2.imread(str(redkitchen_dir / "seq-01" / "frame-000000.color.jpg")), cv2.COLOR_BGR2RGB)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    reference = extractor.extract(real)
    assert len(reference) == 512
    matched = [match_render(image, reference, extractor, matcher) for image in (real, noise, real)]
    result = filter_renders(matched, extractor.max_keypoints, FilterConfig(keep_fraction=0.12),
                            names=["self", "noise", "self-again"], reference_names=["f0"] * 3)
    assert result.threshold == 62  # ceil(0.12 * 512)
    counts = {d.name: d.n_matches for d in result.decisions}
    # The image matched against itself: every keypoint finds itself (ratio test aside: SIFT
    # yields a few near-identical descriptors at one location, which the ratio test removes).
    assert counts["self"] >= 0.9 * 512 and counts["self-again"] == counts["self"]
    # Noise shares no structure with the kitchen: a handful of chance matches at most.
    assert counts["noise"] < 0.05 * 512
    assert [d.kept for d in result.decisions] == [True, False, True]
    assert result.n_kept == 2
    assert sum(result.histogram["counts"]) == 3
    assert result.histogram["counts"][0] == 1 and result.histogram["counts"][-1] == 2  # [0, 51.2) and [460.8, 512]
    # The threshold is inclusive: exactly the self count keeps it, one more drops it.
    at = filter_renders(matched[:1], extractor.max_keypoints, FilterConfig(min_matches=counts["self"]))
    above = filter_renders(matched[:1], extractor.max_keypoints, FilterConfig(min_matches=counts["self"] + 1))
    assert at.decisions[0].kept and not above.decisions[0].kept


def test_histogram_and_config_checks():
    h = match_count_histogram([0, 10, 99, 100, 400], max_keypoints=100, bins=4)
    assert h["bin_edges"] == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert h["counts"] == [2, 0, 0, 3]  # 400 is clipped into the last bin
    with pytest.raises(ValueError, match="keep_fraction"):
        FilterConfig(keep_fraction=1.5)
    assert FilterConfig(keep_fraction=0.12).threshold(4096) == 492  # the paper's ~500 of 4096


# ----------------------------------------------------------------------------------- labels

CAM = CameraIntrinsics(80, 60, 70.0, 70.0, 39.5, 29.5)
PLANE_Z = 3.0  # a fronto-parallel wall for the reference camera at the origin


def plane_points(T_world_cam: np.ndarray, cam: CameraIntrinsics, pixels: np.ndarray) -> np.ndarray:
    """World points where the pixels' rays meet the plane z = PLANE_Z (world)."""
    rays = np.stack([(pixels[:, 0] - cam.cx) / cam.fx, (pixels[:, 1] - cam.cy) / cam.fy, np.ones(len(pixels))], 1)
    d = rays @ T_world_cam[:3, :3].T
    o = T_world_cam[:3, 3]
    t = (PLANE_Z - o[2]) / d[:, 2]
    return o + t[:, None] * d


def plane_depth_map(T_world_cam: np.ndarray, cam: CameraIntrinsics) -> np.ndarray:
    v, u = np.mgrid[0:cam.height, 0:cam.width]
    pix = np.stack([u.ravel(), v.ravel()], 1).astype(np.float64)
    pts = plane_points(T_world_cam, cam, pix)
    return transform_points(invert_pose(T_world_cam), pts)[:, 2].reshape(cam.height, cam.width).astype(np.float32)


@pytest.fixture()
def controlled_render():
    """A reference view and a novel view of one wall, with render keypoints that are exact
    projections of the reference keypoints' 3D points."""
    rng = np.random.default_rng(5)
    T_ref = np.eye(4)
    T_novel = make_pose(look_rotation(6.0, -3.0), [0.15, -0.05, 0.1])
    ref_kp = np.stack([rng.uniform(8, 72, 40), rng.uniform(8, 52, 40)], 1)
    ref_pts = plane_points(T_ref, CAM, ref_kp)
    ref_valid = np.ones(40, dtype=bool)
    ref_valid[[3, 7, 11]] = False  # the triangulation did not label these
    reference = LabelledImage("ref", ref_kp.astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32),
                              np.where(ref_valid[:, None], ref_pts, 0.0).astype(np.float32), ref_valid, CAM, T_ref)
    # Render keypoints: the first 30 reference points seen from the novel pose, plus 10 keypoints
    # that match nothing (on the wall too, at other places).
    uv, _ = project_points(invert_pose(T_novel), CAM.K, ref_pts[:30])
    extra = np.stack([rng.uniform(8, 72, 10), rng.uniform(8, 52, 10)], 1)
    render_kp = np.concatenate([uv, extra])
    matches = np.stack([np.arange(30), np.arange(30)], 1)
    return {"T": T_novel, "kp": render_kp, "matches": matches, "reference": reference, "ref_pts": ref_pts,
            "desc": rng.normal(size=(40, 8)).astype(np.float32)}


def test_matches_mode_gives_the_reference_labels(controlled_render):
    c = controlled_render
    image, stats = synthetic_labels("novel", c["kp"], c["desc"], CAM, c["T"], c["reference"], c["matches"],
                                    SyntheticLabelConfig(mode="matches"))
    assert image.source == "synthetic" and image.T_world_cam is not None
    expected_valid = np.zeros(40, dtype=bool)
    expected_valid[:30] = True
    expected_valid[[3, 7, 11]] = False  # matched, but their reference keypoint has no label
    np.testing.assert_array_equal(image.valid, expected_valid)
    np.testing.assert_allclose(image.points3D[expected_valid], c["ref_pts"][:30][expected_valid[:30]], atol=1e-5)
    assert np.all(image.points3D[~image.valid] == 0.0)
    assert stats["n_from_matches"] == 27 and stats["n_from_depth"] == 0


def test_depth_mode_back_projects_to_the_exact_points(controlled_render):
    c = controlled_render
    # The depth map at half the resolution of the keypoints' camera (as a 1/2-resolution render).
    half = CAM.scaled_to(40, 30)
    depth = plane_depth_map(c["T"], half)
    acc = np.ones_like(depth)
    acc[:, :8] = 0.5  # the NeRF is not sure about the left fifth of the view
    truth = plane_points(c["T"], CAM, c["kp"])
    map_points = c["ref_pts"][c["reference"].valid]

    image, stats = synthetic_labels("novel", c["kp"], c["desc"], CAM, c["T"], c["reference"], c["matches"],
                                    SyntheticLabelConfig(mode="depth"), depth_m=depth, accumulation=acc,
                                    map_points=map_points)
    left = c["kp"][:, 0] <= (8 + 0.5) * 2 - 0.5 + 1e-9  # keypoints whose stencil touches the unsure columns
    assert stats["n_low_accumulation"] == int(left.sum()) > 0
    assert not image.valid[left].any()
    # A fronto-parallel... no: the novel view is turned, so z varies linearly in 1/z; bilinear
    # interpolation of z over half a pixel errs by far less than a millimetre here.
    assert image.valid.sum() >= 20
    np.testing.assert_allclose(image.points3D[image.valid], truth[image.valid], atol=2e-3)
    # Unmatched keypoints are only labelled when map points vouch for them (within 3 px).
    uv_map, _ = project_points(invert_pose(c["T"]), CAM.K, map_points)
    near = np.min(np.linalg.norm(c["kp"][:, None] - uv_map[None], axis=-1), axis=1) <= 3.0
    for i in range(30, 40):
        if not left[i]:
            assert image.valid[i] == near[i]

    # A depth map 0.5 m too far disagrees with the map everywhere: nothing is labelled.
    wrong, wrong_stats = synthetic_labels("novel", c["kp"], c["desc"], CAM, c["T"], c["reference"], c["matches"],
                                          SyntheticLabelConfig(mode="depth"), depth_m=depth + 0.5,
                                          accumulation=np.ones_like(depth), map_points=map_points)
    assert wrong.n_valid == 0 and wrong_stats["n_depth_disagrees"] > 0
    # ... unless unverified keypoints are accepted, and then only those without evidence.
    keep_all, _ = synthetic_labels("novel", c["kp"], c["desc"], CAM, c["T"], c["reference"], c["matches"],
                                   SyntheticLabelConfig(mode="depth", keep_unverified=True),
                                   depth_m=depth, accumulation=np.ones_like(depth), map_points=None)
    # Every keypoint whose depth stencil lies inside the depth map, and no other, is labelled.
    px = (c["kp"] + 0.5) / 2.0 - 0.5
    inside = (px[:, 0] >= 0) & (px[:, 0] <= 39) & (px[:, 1] >= 0) & (px[:, 1] <= 29)
    np.testing.assert_array_equal(keep_all.valid, inside)
    assert inside.sum() >= 30
    np.testing.assert_allclose(keep_all.points3D[keep_all.valid], truth[keep_all.valid], atol=2e-3)


def test_both_mode_prefers_matches_then_depth(controlled_render):
    c = controlled_render
    # Give the reference labels a 1 cm offset (within the agreement tolerance) to tell sources apart.
    ref = c["reference"]
    shifted = LabelledImage(ref.name, ref.keypoints, ref.descriptors,
                            np.where(ref.valid[:, None], ref.points3D + np.float32([0.01, 0, 0]), 0).astype(np.float32),
                            ref.valid, ref.camera, ref.T_world_cam)
    depth = plane_depth_map(c["T"], CAM)
    image, stats = synthetic_labels("novel", c["kp"], c["desc"], CAM, c["T"], shifted, c["matches"],
                                    SyntheticLabelConfig(mode="both", keep_unverified=True), depth_m=depth,
                                    accumulation=np.ones_like(depth), map_points=None)
    truth = plane_points(c["T"], CAM, c["kp"])
    from_match = np.zeros(40, dtype=bool)
    from_match[:30] = ref.valid[:30]
    np.testing.assert_allclose(image.points3D[from_match], truth[from_match] + [0.01, 0, 0], atol=1e-4)
    rest = image.valid & ~from_match
    assert rest.sum() >= 10  # the 3 unlabelled matches and the unmatched keypoints, from depth
    np.testing.assert_allclose(image.points3D[rest], truth[rest], atol=2e-3)
    assert stats["n_from_matches"] == 27 and stats["n_from_depth"] == int(rest.sum())


def test_labels_reject_bad_input(controlled_render):
    c = controlled_render
    with pytest.raises(ValueError, match="mode"):
        SyntheticLabelConfig(mode="nerf")
    with pytest.raises(ValueError, match="needs the rendered depth"):
        synthetic_labels("n", c["kp"], c["desc"], CAM, c["T"], c["reference"], c["matches"],
                         SyntheticLabelConfig(mode="depth"))
    with pytest.raises(ValueError, match="out of range"):
        synthetic_labels("n", c["kp"], c["desc"], CAM, c["T"], c["reference"], np.array([[0, 99]]),
                         SyntheticLabelConfig(mode="matches"))


# ------------------------------------------------------------------------------------ stage


class RoomRenderer:
    """Exact renders of the generated room: a Renderer whose depth is the ground truth."""

    def __init__(self, name: str, frames):
        self.name = name
        self.frame_names = frozenset(f.name for f in frames)
        self.camera_positions = np.stack([f.T_world_cam[:3, 3] for f in frames])
        self.calls = 0

    def render(self, T_world_cam, camera) -> RenderResult:
        self.calls += 1
        rgb, z = render_room(T_world_cam, camera)
        return RenderResult(rgb=rgb, depth_m=z, accumulation=np.ones_like(z))

    def render_batch(self, poses, cameras):
        return [self.render(T, c) for T, c in zip(poses, cameras)]


def real_labels(frames, extractor) -> dict[str, LabelledImage]:
    """Mapping frames' keypoints with exact 3D labels (ray-cast into the room)."""
    out = {}
    for f in frames:
        feats = extractor.extract(f.load_rgb())
        _, _, pts = cast_room(f.T_world_cam, f.camera, feats.keypoints[:, 0], feats.keypoints[:, 1])
        out[f.name] = LabelledImage(f.name, feats.keypoints, feats.descriptors, pts.astype(np.float32),
                                    np.ones(len(feats), dtype=bool), f.camera, f.T_world_cam)
    return out


def test_choose_renderer_prefers_the_one_trained_on_the_pair(tmp_path):
    cam = CameraIntrinsics(32, 24, 30.0, 30.0, 15.5, 11.5)
    frames = room_frames(tmp_path, cam, 4)
    r0, r1 = RoomRenderer("a", frames[:2]), RoomRenderer("b", frames[2:])
    assert isinstance(r0, Renderer)
    # By name: a pair inside one renderer's frames goes to it, wherever the pose is.
    assert choose_renderer([r0, r1], frames[3].T_world_cam, (frames[0].name, frames[1].name)) == 0
    # Otherwise by the nearest training camera.
    assert choose_renderer([r0, r1], frames[3].T_world_cam, (frames[0].name, frames[3].name)) == 1
    assert choose_renderer([r0, r1], frames[0].T_world_cam) == 0
    with pytest.raises(ValueError, match="at least one renderer"):
        choose_renderer([], np.eye(4))


@pytest.mark.parametrize("mode", ["matches", "depth"])
def test_synthesis_stage_end_to_end_with_exact_renders(tmp_path, sift_and_mnn, mode):
    from offline.synthesis.novel_poses import NovelPoseConfig
    from offline.synthesis.stage import SynthesisConfig, run_synthesis

    extractor, matcher = sift_and_mnn
    cam = CameraIntrinsics(320, 240, 260.0, 260.0, 159.5, 119.5)
    frames = room_frames(tmp_path / "images", cam, 6, seed=1)
    real = real_labels(frames, extractor)
    renderers = [RoomRenderer("left", frames[:3]), RoomRenderer("right", frames[3:])]
    config = SynthesisConfig(poses=NovelPoseConfig(k_neighbours=2, samples_per_pair=3), render_fraction=0.5,
                             filter=FilterConfig(keep_fraction=0.1),
                             labels=SyntheticLabelConfig(mode=mode), render_device="cpu")
    lines: list[str] = []
    result = run_synthesis(frames, real, extractor, matcher, renderers, config, tmp_path / "syn", log=lines.append)
    stats = result.stats
    assert stats["n_poses"] == stats["n_rendered"] == stats["n_rendered_now"] == len(stats["decisions"]) > 0
    assert sum(r.calls for r in renderers) == stats["n_poses"]
    assert stats["render_size"] == [160, 120]
    assert stats["keep_threshold"] == 52
    kept_decisions = [d for d in stats["decisions"] if d["kept"]]
    assert stats["n_kept"] == len(result.images) == len(kept_decisions) > 0
    assert all(d["n_matches"] >= 52 for d in kept_decisions)
    assert all(d["n_matches"] < 52 for d in stats["decisions"] if not d["kept"])
    assert sum(stats["match_count_histogram"]["counts"]) == stats["n_poses"]
    assert set(stats["timings_s"]) >= {"poses_s", "render_s", "filter_s", "labels_s"}

    # Every valid synthetic label against the true 3D point of its keypoint's ray.
    errors = []
    for image in result.images:
        assert image.source == "synthetic" and image.camera == cam  # features at the camera's resolution
        _, _, truth = cast_room(image.T_world_cam, cam, image.keypoints[:, 0], image.keypoints[:, 1])
        errors.append(np.linalg.norm(image.points3D[image.valid] - truth[image.valid], axis=1))
    errors = np.concatenate(errors)
    assert len(errors) > 100
    if mode == "matches":
        # A correct match puts the reference's point within about a pixel of the render keypoint's
        # ray: 1 px at 260 px focal length and <= 3.5 m is <= 1.3 cm (plus SIFT's own jitter on an
        # upsampled render). Wrong matches are the tail.
        assert np.median(errors) < 0.02 and np.mean(errors < 0.05) > 0.8
    else:
        # Exact depth, checked against exact map points: only the bilinear interpolation of z
        # between pixel centres remains (well under a millimetre on these walls).
        assert np.median(errors) < 1e-4 and np.percentile(errors, 99) < 2e-3

    # Saved, and a rerun is served from the cache; renders survive a lost stats file.
    assert len(load_labelled(tmp_path / "syn" / "synthetic.npz")) == len(result.images)
    saved = json.loads((tmp_path / "syn" / "synthesis_stats.json").read_text())
    assert saved["n_kept"] == stats["n_kept"]
    again = run_synthesis(frames, real, extractor, matcher, renderers, config, tmp_path / "syn", log=lines.append)
    assert len(again.images) == len(result.images) and any("cached" in line for line in lines)
    (tmp_path / "syn" / "synthesis_stats.json").unlink()
    calls = sum(r.calls for r in renderers)
    third = run_synthesis(frames, real, extractor, matcher, renderers, config, tmp_path / "syn", log=lines.append)
    assert third.stats["n_rendered_now"] == 0 and sum(r.calls for r in renderers) == calls
    assert third.stats["n_kept"] == stats["n_kept"]

    # Another label mode or keep threshold (an ablation) reuses the renders and their features
    # and matches: nothing is rendered, and decisions follow the new threshold from the same counts.
    other = dataclasses.replace(config, labels=SyntheticLabelConfig(mode="both"),
                                filter=FilterConfig(keep_fraction=0.05))
    feature_files = sorted((tmp_path / "syn" / "renders").glob("*.features.npz"))
    assert len(feature_files) == stats["n_poses"]
    written = [p.stat().st_mtime_ns for p in feature_files]
    fourth = run_synthesis(frames, real, extractor, matcher, renderers, other, tmp_path / "syn", log=lines.append)
    assert fourth.stats["n_rendered_now"] == 0 and sum(r.calls for r in renderers) == calls
    assert [p.stat().st_mtime_ns for p in feature_files] == written  # not extracted again
    assert [d["n_matches"] for d in fourth.stats["decisions"]] == [d["n_matches"] for d in stats["decisions"]]
    assert fourth.stats["keep_threshold"] == 26
    assert fourth.stats["n_kept"] == sum(d["n_matches"] >= 26 for d in stats["decisions"]) >= stats["n_kept"]

    # Another extractor in the same work directory (the renders are reused): its own descriptors,
    # never the cached result of the first one (seen: a 64-d XFeat build got ALIKED's 128-d ones).
    from d2s_nerf_ros.features import make_extractor

    fewer = make_extractor("sift", max_keypoints=256, device="cpu")
    lines.clear()
    fifth = run_synthesis(frames, real_labels(frames, fewer), fewer, matcher, renderers, other, tmp_path / "syn",
                          log=lines.append)
    assert not any("cached" in line for line in lines) and fifth.stats["n_rendered_now"] == 0
    assert max(len(image.keypoints) for image in fifth.images) <= 256 < max(len(i.keypoints) for i in fourth.images)
    # Changed real labels (another label mode of the mapping frames): not the cached result either.
    moved = {name: dataclasses.replace(image, points3D=image.points3D + 1.0) for name, image in real.items()}
    lines.clear()
    sixth = run_synthesis(frames, moved, extractor, matcher, renderers, other, tmp_path / "syn", log=lines.append)
    assert not any("cached" in line for line in lines)
    assert [i.points3D.tobytes() for i in sixth.images] != [i.points3D.tobytes() for i in fourth.images]

    # The map report shows the synthesis: kept views on the trajectory, the match histogram with
    # its threshold, and real/render pairs (the files the stats point at exist).
    from offline.report import write_report

    assert len(stats["kept_positions"]) == stats["n_kept"] and 1 <= len(stats["samples"]) <= 3
    for sample in stats["samples"]:
        assert Path(sample["reference_image"]).is_file() and Path(sample["render_image"]).is_file()
    map_dir = tmp_path / "map"
    map_dir.mkdir()
    (map_dir / "manifest.json").write_text(json.dumps({"extractor": extractor.config(), "training": {}}))
    page = write_report(map_dir, tmp_path / "report.html", frames, list(real.values()), [], stats).read_text()
    for title in ("Trajectory", "Synthetic views", "Real vs rendered"):
        assert f"<h2>{title}</h2>" in page


def test_synthesis_rejects_frames_without_labels(tmp_path, sift_and_mnn):
    from offline.synthesis.stage import SynthesisConfig, run_synthesis

    extractor, matcher = sift_and_mnn
    cam = CameraIntrinsics(64, 48, 50.0, 50.0, 31.5, 23.5)
    frames = room_frames(tmp_path / "images", cam, 3)
    with pytest.raises(ValueError, match="no labelled keypoints"):
        run_synthesis(frames, {}, extractor, matcher, [RoomRenderer("r", frames)], SynthesisConfig(), tmp_path / "s")
    with pytest.raises(ValueError, match="render_fraction"):
        SynthesisConfig(render_fraction=0.0)
