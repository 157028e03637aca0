"""Bags written with rosbags (ROS 2 mcap/sqlite3, ROS 1) from frames with known poses, read back."""

from __future__ import annotations

import numpy as np
import pytest

from d2s_nerf_ros.geometry import pose_error
from offline.demo_scene import DEMO_CAMERA, START_NS, BagWriter, base_pose_at, render_demo_frames, write_demo_bag
from offline.sources import detect_source, open_source
from offline.sources.frames import FrameSet
from offline.sources.rosbag_source import BagSourceError, BagSourceOptions, load_bag

N = 8  # frames per bag: enough to cover the loop, quick to write


def bag_path(tmp_path, storage: str, name: str = "bag"):
    return tmp_path / (f"{name}.bag" if storage == "ros1" else name)


def assert_poses_match(frameset: FrameSet, truth: list[np.ndarray], stamps: list[int] | None = None):
    assert len(frameset) == len(truth)
    for frame, T in zip(frameset, truth):
        dt, dr = pose_error(frame.T_world_cam, T)
        assert dt < 1e-3 and dr < 0.1, f"{frame.name}: {dt * 1000:.3f} mm, {dr:.4f} deg"
    if stamps is not None:
        assert [f.stamp_ns for f in frameset] == stamps


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "ros1"])
def test_tf_poses_with_static_extrinsic_and_raw_images(tmp_path, storage):
    path = bag_path(tmp_path, storage)
    gt = write_demo_bag(path, n_frames=N, storage=storage, pose_source="tf")
    assert detect_source(path) == "rosbag"
    frames = load_bag(path, BagSourceOptions(pose_source="tf", map_frame="map"), tmp_path / "out")
    assert_poses_match(frames, gt.T_world_cam, gt.stamps_ns)
    for frame, image in zip(frames, gt.images):
        assert np.array_equal(frame.load_rgb(), image)  # raw images are lossless
        assert frame.camera == DEMO_CAMERA
    assert frames.metadata["camera_frame"] == "camera_optical"  # from the image frame_id
    assert frames.metadata["counts"]["skipped_no_pose"] == 0
    # The frame set on disk is the one returned.
    again = FrameSet.load(tmp_path / "out" / "frames.json")
    assert again.names() == frames.names()
    np.testing.assert_allclose(again[3].T_world_cam, frames[3].T_world_cam)


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "ros1"])
def test_pose_topic_with_extrinsic_and_compressed_images(tmp_path, storage):
    path = bag_path(tmp_path, storage)
    gt = write_demo_bag(path, n_frames=N, storage=storage, compressed=True, pose_source="topic")
    options = BagSourceOptions(pose_source="topic", pose_topic="/robot_pose", pose_to_camera=gt.T_base_cam.tolist())
    frames = load_bag(path, options, tmp_path / "out")
    assert_poses_match(frames, gt.T_world_cam, gt.stamps_ns)
    for frame, image in zip(frames, gt.images):
        diff = np.abs(frame.load_rgb().astype(int) - image.astype(int))
        assert diff.mean() < 4.0  # JPEG quality 95
    # Without the extrinsic the poses are the base's, not the camera's: the check can fail.
    base_only = load_bag(path, BagSourceOptions(pose_source="topic"), tmp_path / "out2")
    assert pose_error(base_only[0].T_world_cam, gt.T_world_cam[0])[0] > 0.5


@pytest.mark.parametrize("msgtype", ["Odometry", "PoseWithCovarianceStamped", "TransformStamped"])
def test_other_pose_message_types(tmp_path, msgtype):
    path = tmp_path / "bag"
    gt = write_demo_bag(path, n_frames=5, storage="mcap", pose_source="topic", pose_msgtype=msgtype)
    options = BagSourceOptions(pose_source="topic", pose_to_camera=gt.T_base_cam)  # the only pose topic is found
    frames = load_bag(path, options, tmp_path / "out")
    assert_poses_match(frames, gt.T_world_cam)
    assert frames.metadata["map_frame"] == "map"


@pytest.mark.parametrize("encoding", ["bgr8", "mono8", "mono16"])
def test_image_encodings(tmp_path, encoding):
    import cv2

    path = tmp_path / "bag"
    gt = write_demo_bag(path, n_frames=3, storage="mcap", encoding=encoding)
    frames = load_bag(path, BagSourceOptions(), tmp_path / "out")
    for frame, image in zip(frames, gt.images):
        got = frame.load_rgb()
        if encoding == "bgr8":
            assert np.array_equal(got, image)
        else:  # grey images are stored grey; mono16 (grey * 257) maps back to the same 8 bits
            grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            assert np.array_equal(got[:, :, 0], grey) and np.array_equal(got[:, :, 1], grey)


def test_single_storage_files_and_open_source(tmp_path):
    gt = write_demo_bag(tmp_path / "m", n_frames=4, storage="mcap")
    write_demo_bag(tmp_path / "s", n_frames=4, storage="sqlite3")
    for f in (tmp_path / "m" / "m.mcap", tmp_path / "s" / "s.db3"):
        assert detect_source(f) == "rosbag"
        frames = open_source(f, tmp_path / f"out_{f.suffix[1:]}", BagSourceOptions())
        assert_poses_match(frames, gt.T_world_cam)
        assert (tmp_path / f"out_{f.suffix[1:]}" / "frames.json").is_file()


def test_frame_selection(tmp_path):
    path = tmp_path / "bag"
    gt = write_demo_bag(path, n_frames=12, storage="mcap")
    every = load_bag(path, BagSourceOptions(every=3), tmp_path / "a")
    assert_poses_match(every, gt.T_world_cam[::3], gt.stamps_ns[::3])
    fraction = load_bag(path, BagSourceOptions(fraction=0.25), tmp_path / "b")
    assert len(fraction) == 3
    assert len(list((tmp_path / "b" / "images").glob("*.png"))) == 3  # only selected images are decoded
    # Consecutive demo frames are ~0.5 m apart: 0.9 m of motion keeps about every other one.
    moved = load_bag(path, BagSourceOptions(min_motion_m=0.9), tmp_path / "c")
    centres = [f.T_world_cam[:3, 3] for f in moved]
    assert 3 <= len(moved) < 12
    assert all(np.linalg.norm(b - a) >= 0.9 for a, b in zip(centres[:-1], centres[1:]))
    with pytest.raises(BagSourceError, match="at most one"):
        load_bag(path, BagSourceOptions(every=2, fraction=0.5), tmp_path / "d")


def _custom_bag(path, storage, *, image_stamps, tf_range_s, rgb_images, shuffled_order=None, with_info=True):
    """Images (the k-th recorded is image shuffled_order[k], so stamps can go backwards in bag
    time) and /tf covering tf_range_s."""
    from offline.demo_scene import base_to_camera

    with BagWriter(path, storage) as bag:
        bag.write("/tf_static", bag.tf_message([bag.transform_stamped(START_NS, "base_link", "cam", base_to_camera())]), START_NS)
        t0, t1 = tf_range_s
        tf_stamps = [START_NS + int(t * 1e9) for t in np.arange(t0, t1, 0.01)]
        order = shuffled_order or list(range(len(image_stamps)))
        events = [(s, "tf", s) for s in tf_stamps] + [(image_stamps[k] + 5_000_000, "img", order[k]) for k in range(len(order))]
        for bag_ns, kind, arg in sorted(events, key=lambda e: e[0]):
            if kind == "tf":
                T = base_pose_at((arg - START_NS) / 1e9)
                bag.write("/tf", bag.tf_message([bag.transform_stamped(arg, "map", "base_link", T)]), bag_ns)
            else:
                bag.write("/cam/image", bag.image(image_stamps[arg], "cam", rgb_images[arg]), bag_ns)
                if with_info:
                    bag.write("/cam/camera_info", bag.camera_info(image_stamps[arg], "cam", DEMO_CAMERA), bag_ns)


def test_out_of_order_stamps_are_sorted_and_reported(tmp_path):
    _, stamps, _, _, cams, images, _ = render_demo_frames(6)
    path = tmp_path / "bag"
    # Recorded in the order 0 2 1 3 5 4 (bag time increasing, header stamps not).
    order = [0, 2, 1, 3, 5, 4]
    _custom_bag(path, "mcap", image_stamps=stamps, tf_range_s=(0.0, 20.0), rgb_images=images, shuffled_order=order)
    frames = load_bag(path, BagSourceOptions(image_topic="/cam/image"), tmp_path / "out")
    assert_poses_match(frames, cams, stamps)  # sorted by stamp, each with its own pose
    for frame, image in zip(frames, images):
        assert np.array_equal(frame.load_rgb(), image)
    assert frames.metadata["counts"]["out_of_order"] == 2
    assert any("out of stamp order" in w for w in frames.metadata["warnings"])


def test_images_without_pose_are_skipped_and_counted(tmp_path):
    _, stamps, _, _, cams, images, _ = render_demo_frames(8)  # images every 2.5 s
    path = tmp_path / "bag"
    _custom_bag(path, "sqlite3", image_stamps=stamps, tf_range_s=(4.0, 12.0), rgb_images=images)
    frames = load_bag(path, BagSourceOptions(), tmp_path / "out")
    inside = [i for i, s in enumerate(stamps) if START_NS + 4e9 <= s <= START_NS + 11.99e9]
    assert_poses_match(frames, [cams[i] for i in inside], [stamps[i] for i in inside])
    assert frames.metadata["counts"]["skipped_no_pose"] == 8 - len(inside) > 0


# --- bad input ---------------------------------------------------------------------------

def test_missing_topic_lists_the_topics_that_exist(tmp_path):
    path = tmp_path / "bag"
    write_demo_bag(path, n_frames=2, storage="mcap")
    with pytest.raises(BagSourceError) as err:
        load_bag(path, BagSourceOptions(image_topic="/front/image"), tmp_path / "out")
    message = str(err.value)
    assert "'/front/image' is not in the bag" in message
    for line in ("/camera/image_raw  (sensor_msgs/msg/Image, 2 messages)", "/camera/camera_info  (sensor_msgs/msg/CameraInfo",
                 "/tf  (tf2_msgs/msg/TFMessage", "/tf_static"):
        assert line in message
    with pytest.raises(BagSourceError, match="has type sensor_msgs/msg/CameraInfo"):
        load_bag(path, BagSourceOptions(image_topic="/camera/camera_info"), tmp_path / "out")
    with pytest.raises(BagSourceError, match="no pose topic"):
        load_bag(path, BagSourceOptions(pose_source="topic"), tmp_path / "out")
    with pytest.raises(BagSourceError, match="'odom' is not in the TF data"):
        load_bag(path, BagSourceOptions(map_frame="odom"), tmp_path / "out")
    assert not (tmp_path / "out" / "frames.json").exists()


@pytest.mark.parametrize("storage", ["mcap", "ros1"])
def test_no_camera_info_needs_intrinsics(tmp_path, storage):
    path = bag_path(tmp_path, storage)
    gt = write_demo_bag(path, n_frames=3, storage=storage, with_camera_info=False)
    with pytest.raises(BagSourceError, match=r"--intrinsics fx,fy,cx,cy"):
        load_bag(path, BagSourceOptions(), tmp_path / "out")
    frames = load_bag(path, BagSourceOptions(intrinsics=(250.0, 250.0, 159.5, 119.5)), tmp_path / "out")
    assert frames[0].camera == DEMO_CAMERA
    assert_poses_match(frames, gt.T_world_cam)
    with pytest.raises(BagSourceError, match="four"):
        load_bag(path, BagSourceOptions(intrinsics=(250.0, 250.0, 159.5)), tmp_path / "out2")


@pytest.mark.parametrize("storage", ["mcap", "sqlite3", "ros1"])
def test_truncated_bag_is_a_clear_error(tmp_path, storage):
    path = bag_path(tmp_path, storage)
    write_demo_bag(path, n_frames=4, storage=storage)
    data_file = path if path.is_file() else next(p for p in path.iterdir() if p.suffix in (".mcap", ".db3"))
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(BagSourceError, match="truncated or corrupted"):
        load_bag(path, BagSourceOptions(), tmp_path / "out")
    assert not (tmp_path / "out" / "frames.json").exists()


def test_empty_selection_is_a_clear_error(tmp_path):
    _, stamps, _, _, _, images, _ = render_demo_frames(3)
    path = tmp_path / "bag"
    # /tf recorded only after the last image: no image can get a pose.
    _custom_bag(path, "mcap", image_stamps=stamps, tf_range_s=(19.0, 20.0), rgb_images=images)
    with pytest.raises(BagSourceError, match="none of the 3 images has a pose within 0.1 s"):
        load_bag(path, BagSourceOptions(), tmp_path / "out")
    # An image topic without messages.
    empty = tmp_path / "empty"
    with BagWriter(empty, "mcap") as bag:
        bag._writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=bag.typestore)
        bag.write("/tf_static", bag.tf_message([bag.transform_stamped(START_NS, "map", "cam", np.eye(4))]), START_NS)
    with pytest.raises(BagSourceError, match="has no messages"):
        load_bag(empty, BagSourceOptions(intrinsics=(1, 1, 0, 0)), tmp_path / "out")


def test_bag_without_poses_points_to_sfm(tmp_path):
    """The SfM path itself is tested in test_sfm.py; here, what a bag without poses is told."""
    path = tmp_path / "bag"
    write_demo_bag(path, n_frames=2, pose_source="none")
    for source in ("tf", "topic"):
        with pytest.raises(BagSourceError, match="--pose-source sfm for poses from the images"):
            load_bag(path, BagSourceOptions(pose_source=source), tmp_path / "out")
    # The motion filter needs poses before the selection; SfM makes them after it.
    with pytest.raises(BagSourceError, match="--every or --fraction instead"):
        load_bag(path, BagSourceOptions(pose_source="sfm", min_motion_m=0.5), tmp_path / "out")
    assert not (tmp_path / "out" / "frames.json").exists()
