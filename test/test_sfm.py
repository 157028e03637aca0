"""``--pose-source sfm``: poses of a bag WITHOUT poses by pycolmap structure-from-motion.

The bag is the generated demo room (exact ground truth, no /tf, no pose topic). SfM's frame
and scale are its own, so the recovered camera centres are aligned to the truth with a
similarity (Umeyama) before rotations and positions are compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import make_pose, matrix_from_rotvec, rotation_angle_deg, similarity_from_points
from offline.demo_scene import write_demo_bag
from offline.sfm import SfmConfig, SfmError, colmap_camera_params, known_distance_scale, reconstruct_poses, scale_poses
from offline.sources.frames import FrameSet
from offline.sources.rosbag_source import BagSourceError, BagSourceOptions, load_bag

N_FRAMES = 16  # one loop of the room: consecutive frames ~0.5 m and ~20 degrees apart
SFM = SfmConfig(num_threads=2)


def image_index(frame) -> int:
    return int(frame.name.split("-")[1])  # frame-00000I: the I-th image on the topic


@pytest.fixture(scope="module")
def sfm_bag(tmp_path_factory):
    """(root, truth, frame set) of one SfM run on a pose-less demo bag; later runs with another
    scale reuse its cached reconstruction (same out dir)."""
    root = tmp_path_factory.mktemp("sfm")
    gt = write_demo_bag(root / "bag", n_frames=N_FRAMES, storage="mcap", pose_source="none")
    frames = load_bag(root / "bag", BagSourceOptions(pose_source="sfm", sfm=SFM), root / "out")
    return root, gt, frames


def aligned_errors(frames, gt):
    """Per frame (position error in metres, rotation error in degrees) after the best
    similarity from the recovered camera centres to the true ones, and that similarity's scale."""
    truth = [gt.T_world_cam[image_index(f)] for f in frames]
    est_centres = np.array([f.T_world_cam[:3, 3] for f in frames])
    true_centres = np.array([T[:3, 3] for T in truth])
    s, R, t = similarity_from_points(est_centres, true_centres)
    position = np.linalg.norm((s * est_centres @ R.T + t) - true_centres, axis=1)
    rotation = np.array([rotation_angle_deg((R @ f.T_world_cam[:3, :3]).T @ T[:3, :3]) for f, T in zip(frames, truth)])
    return position, rotation, s


def trajectory_extent(gt) -> float:
    centres = np.array([T[:3, 3] for T in gt.T_world_cam])
    return float(max(np.linalg.norm(a - b) for a in centres for b in centres))


def test_sfm_recovers_relative_poses_up_to_scale(sfm_bag):
    root, gt, frames = sfm_bag
    # The bag really has no poses: the other pose sources cannot read it.
    with pytest.raises(BagSourceError, match="needs /tf"):
        load_bag(root / "bag", BagSourceOptions(pose_source="tf"), root / "tf_out")

    counts = frames.metadata["counts"]
    registered = len(frames)
    assert counts["selected"] == N_FRAMES and counts["skipped_unregistered"] == N_FRAMES - registered
    assert registered >= 0.75 * N_FRAMES, frames.metadata["sfm"]
    if registered < N_FRAMES:  # the skipped frames are named, not silently dropped
        assert any("could not be registered by SfM" in w for w in frames.metadata["warnings"])

    position, rotation, _ = aligned_errors(frames, gt)
    extent = trajectory_extent(gt)
    assert rotation.max() < 1.0, rotation
    assert position.max() < 0.03 * extent, (position, extent)
    # Relative rotations need no alignment at all (the centres-only similarity above is weakly
    # constrained about horizontal axes: the trajectory is nearly planar).
    truth = [gt.T_world_cam[image_index(f)][:3, :3] for f in frames]
    relative = [rotation_angle_deg((frames[i].T_world_cam[:3, :3].T @ frames[j].T_world_cam[:3, :3]).T @ (truth[i].T @ truth[j]))
                for i in range(len(frames)) for j in range(i + 1, len(frames))]
    assert max(relative) < 1.0 and float(np.median(relative)) < 0.3, relative

    # The documented gauge: first registered frame = identity, centres' RMS spread = 1 unit.
    np.testing.assert_allclose(frames[0].T_world_cam, np.eye(4), atol=1e-9)
    centres = np.array([f.T_world_cam[:3, 3] for f in frames])
    assert math.isclose(float(np.sqrt(((centres - centres.mean(0)) ** 2).sum(1).mean())), 1.0, rel_tol=1e-9)
    # Without --scale or --known-distance the arbitrary scale is said, in the log and the frame set.
    assert frames.metadata["sfm"]["scale"]["kind"] == "arbitrary"
    assert any("scale is arbitrary" in w for w in frames.metadata["warnings"])
    # Frames keep the bag's images and camera, in stamp order, and are saved as returned.
    assert [f.stamp_ns for f in frames] == sorted(f.stamp_ns for f in frames)
    for f in frames:
        assert np.array_equal(f.load_rgb(), gt.images[image_index(f)])
        assert f.camera == gt.camera
    again = FrameSet.load(root / "out" / "frames.json")
    assert again.names() == frames.names()
    np.testing.assert_allclose(again[-1].T_world_cam, frames[-1].T_world_cam)


def test_known_distance_and_scale_make_the_map_metric(sfm_bag):
    root, gt, unscaled = sfm_bag
    true_centres = {image_index(f): gt.T_world_cam[image_index(f)][:3, 3] for f in unscaled}
    a = image_index(unscaled[0])
    b = max(true_centres, key=lambda j: np.linalg.norm(true_centres[j] - true_centres[a]))
    distance = float(np.linalg.norm(true_centres[a] - true_centres[b]))

    metric = load_bag(root / "bag", BagSourceOptions(pose_source="sfm", known_distance=f"{a},{b},{distance}", sfm=SFM),
                      root / "out")
    assert metric.metadata["sfm"]["cached"]  # same images, camera and options: the reconstruction is reused
    assert metric.metadata["sfm"]["scale"]["kind"] == "known_distance"
    assert not any("scale is arbitrary" in w for w in metric.metadata["warnings"])
    by_index = {image_index(f): f for f in metric}
    assert math.isclose(np.linalg.norm(by_index[a].T_world_cam[:3, 3] - by_index[b].T_world_cam[:3, 3]), distance, rel_tol=1e-9)
    position, rotation, s = aligned_errors(metric, gt)
    assert abs(s - 1.0) < 0.02, s  # metric: the alignment to the truth needs no scaling
    assert position.max() < 0.03 * trajectory_extent(gt) and rotation.max() < 1.0

    # --scale S multiplies the translations of the unit map, nothing else.
    given = load_bag(root / "bag", BagSourceOptions(pose_source="sfm", scale=2.5, sfm=SFM), root / "out")
    assert given.metadata["sfm"]["scale"] == {"kind": "given", "metres_per_unit": 2.5, "note": "metric if --scale 2.5 is right"}
    for f, g in zip(unscaled, given):
        np.testing.assert_allclose(g.T_world_cam[:3, :3], f.T_world_cam[:3, :3], atol=1e-12)
        np.testing.assert_allclose(g.T_world_cam[:3, 3], 2.5 * f.T_world_cam[:3, 3], atol=1e-12)

    # Images the known distance cannot use.
    with pytest.raises(BagSourceError, match="not among the selected frames"):
        load_bag(root / "bag", BagSourceOptions(pose_source="sfm", known_distance=(a, 999, 1.0), sfm=SFM), root / "out")
    with pytest.raises(BagSourceError, match=r"image 3 \(frame-000003\), which is not among"):  # --every 2: 0, 2, 4, ...
        load_bag(root / "bag", BagSourceOptions(pose_source="sfm", every=2, known_distance=(2, 3, 1.0), sfm=SFM), root / "out_every")
    assert not (root / "out_every" / "sfm").exists()  # refused before any SfM work
    unregistered = sorted(set(range(N_FRAMES)) - set(true_centres))
    if unregistered:  # the data decide whether there is one; the fixture test bounds how many
        with pytest.raises(BagSourceError, match="SfM could not register"):
            load_bag(root / "bag", BagSourceOptions(pose_source="sfm", known_distance=(a, unregistered[0], 1.0), sfm=SFM),
                     root / "out")


def test_too_few_registered_frames_is_a_clear_error(tmp_path):
    # Three views a third of a loop apart share almost nothing: no initial pair, nothing registered.
    write_demo_bag(tmp_path / "bag", n_frames=3, storage="sqlite3", pose_source="none")
    options = BagSourceOptions(pose_source="sfm", sfm=SfmConfig(num_threads=2, matching="sequential"))
    with pytest.raises(BagSourceError, match=r"SfM registered [0-2] of 3 images \(needs at least 3.*select more of them"):
        load_bag(tmp_path / "bag", options, tmp_path / "out")
    assert not (tmp_path / "out" / "frames.json").exists()


def test_sfm_options_are_checked_before_reading(tmp_path):
    with pytest.raises(BagSourceError, match="--every or --fraction instead"):
        BagSourceOptions(pose_source="sfm", min_motion_m=0.5).validate()
    with pytest.raises(BagSourceError, match="at most one of --scale and --known-distance"):
        BagSourceOptions(pose_source="sfm", scale=2.0, known_distance="0,5,1.0").validate()
    for bad in ("0,5", "0,0,1.0", "0,5,-1", "a,5,1", "0,5,nan"):
        with pytest.raises(BagSourceError, match="known distance must be I,J,D"):
            BagSourceOptions(pose_source="sfm", known_distance=bad).validate()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(BagSourceError, match="--scale must be a positive number"):
            BagSourceOptions(pose_source="sfm", scale=bad).validate()
    with pytest.raises(BagSourceError, match="apply only to --pose-source sfm"):
        BagSourceOptions(pose_source="tf", scale=2.0).validate()
    with pytest.raises(BagSourceError, match="--pose-to-camera does not apply"):
        BagSourceOptions(pose_source="sfm", pose_to_camera=np.eye(4)).validate()
    with pytest.raises(BagSourceError, match="matching must be one of"):
        BagSourceOptions(pose_source="sfm", sfm=SfmConfig(matching="vocab_tree")).validate()
    with pytest.raises(SfmError, match="at least 2 images"):
        reconstruct_poses([tmp_path / "a.png"], CameraIntrinsics(320, 240, 250, 250, 160, 120), tmp_path / "sfm")


def test_cli_scale_options(tmp_path):
    from offline.cli import _query_frames, bag_source_options, build_parser

    args = build_parser().parse_args(["build", "bag", "--out", "map", "--pose-source", "sfm", "--known-distance", "3,40,2.5"])
    options = bag_source_options(args, every=2)
    assert (options.pose_source, options.known_distance, options.scale, options.every) == ("sfm", (3, 40, 2.5), None, 2)
    args = build_parser().parse_args(["build", "bag", "--out", "map", "--pose-source", "sfm", "--scale", "0.5"])
    assert bag_source_options(args).scale == 0.5
    for bad in (["--scale", "1", "--known-distance", "0,1,2"], ["--scale", "-1"], ["--known-distance", "0,1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["build", "bag", "--out", "map", "--pose-source", "sfm", *bad])
    # SfM poses live in a frame of their own: they cannot be the ground truth of query frames.
    args = build_parser().parse_args(["evaluate", "map", "queries", "--out", "eval", "--pose-source", "sfm"])
    with pytest.raises(ValueError, match="cannot score queries"):
        _query_frames(args, tmp_path, None, 1, tmp_path / "q")


def test_sfm_is_for_bags_only(redkitchen_dir, tmp_path):
    from offline.sources import open_source

    with pytest.raises(ValueError, match="sfm is for bags without poses.*sevenscenes source"):
        open_source(redkitchen_dir, tmp_path / "out", BagSourceOptions(pose_source="sfm"))


# --- helpers ----------------------------------------------------------------------------------

def test_similarity_from_points_recovers_a_known_similarity():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(12, 3))
    R = matrix_from_rotvec(np.array([0.3, -1.1, 0.7]))
    dst = 0.37 * src @ R.T + np.array([1.0, -2.0, 0.5])
    s, R_est, t = similarity_from_points(src, dst)
    assert math.isclose(s, 0.37, rel_tol=1e-12)
    np.testing.assert_allclose(R_est, R, atol=1e-12)
    np.testing.assert_allclose(t, [1.0, -2.0, 0.5], atol=1e-12)
    # A mirrored copy is fitted by a proper rotation, never by a reflection.
    _, R_mirror, _ = similarity_from_points(src, src * np.array([1.0, 1.0, -1.0]))
    assert np.linalg.det(R_mirror) > 0
    with pytest.raises(ValueError, match="collinear"):
        similarity_from_points(np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), rng.normal(size=(5, 3)))


def test_scale_helpers():
    T_a = make_pose(np.eye(3), [0.0, 0.0, 0.0])
    T_b = make_pose(matrix_from_rotvec(np.array([0.0, 0.2, 0.0])), [0.3, 0.4, 0.0])
    assert math.isclose(known_distance_scale(T_a, T_b, 2.0), 4.0)
    scaled = scale_poses([T_a, None, T_b], 4.0)
    assert scaled[1] is None
    np.testing.assert_allclose(scaled[2][:3, 3], [1.2, 1.6, 0.0])
    np.testing.assert_allclose(scaled[2][:3, :3], T_b[:3, :3])
    with pytest.raises(SfmError, match="too close"):
        known_distance_scale(T_a, T_a, 1.0)


@pytest.mark.parametrize("model,distortion,colmap_model", [
    ("none", (), "PINHOLE"),
    ("plumb_bob", (0.1, -0.05, 0.001, 0.002), "OPENCV"),
    ("plumb_bob", (0.1, -0.05, 0.001, 0.002, 0.01), "FULL_OPENCV"),
    ("equidistant", (0.1, -0.02, 0.003, 0.0), "OPENCV_FISHEYE"),
])
def test_camera_to_colmap(model, distortion, colmap_model):
    from offline.sfm import _camera_from_params

    camera = CameraIntrinsics(640, 480, 500.0, 505.0, 319.5, 239.5, model, distortion)
    name, params = colmap_camera_params(camera)
    assert name == colmap_model
    assert params[2:4] == [320.0, 240.0]  # COLMAP's pixel centres are at +0.5
    assert _camera_from_params(camera, name, params) == camera
