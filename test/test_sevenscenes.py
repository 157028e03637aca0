"""7-Scenes import and the even split: real shared data plus hand-made folders with broken parts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.sources.sevenscenes import is_sevenscenes, load_sevenscenes, split_frames


# ----------------------------------------------------------------------------- real data

def test_real_redkitchen_import(redkitchen_dir: Path) -> None:
    fs = load_sevenscenes(redkitchen_dir)
    assert len(fs) == 500
    names = fs.names()
    assert names[0] == "seq-01/frame-000000"
    assert names[1] == "seq-01/frame-000002"
    assert names[-1] == "seq-01/frame-000998"
    assert names == sorted(names) and len(set(names)) == 500

    # Colour intrinsics, not the depth camera's 585 from camera-intrinsics.txt.
    cam = fs[0].camera
    assert (cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy) == (640, 480, 525.0, 525.0, 320.0, 240.0)
    assert all(f.camera == cam for f in fs)

    # A pose equals its file, read independently.
    frame = fs[137]
    assert frame.name == "seq-01/frame-000274"
    expected = np.array([[float(v) for v in line.split()] for line in
                         (redkitchen_dir / "seq-01" / "frame-000274.pose.txt").read_text().splitlines() if line.strip()])
    np.testing.assert_array_equal(frame.T_world_cam, expected)

    assert frame.image_path.name == "frame-000274.color.jpg" and frame.image_path.is_file()
    assert frame.depth_path.name == "frame-000274.depth.png" and frame.depth_scale == 1000.0
    assert frame.load_rgb().shape == (480, 640, 3)
    depth = frame.load_depth_m()
    raw = cv2.imread(str(frame.depth_path), cv2.IMREAD_UNCHANGED)
    ok = (raw > 0) & (raw < 65535)
    np.testing.assert_allclose(depth[ok], raw[ok] / 1000.0, rtol=1e-6)
    assert np.isnan(depth[~ok]).all()


def test_real_redkitchen_detection_and_sequence_folder(redkitchen_dir: Path) -> None:
    assert is_sevenscenes(redkitchen_dir)
    assert is_sevenscenes(redkitchen_dir / "seq-01")
    assert not is_sevenscenes(redkitchen_dir.parent)
    assert not is_sevenscenes(redkitchen_dir / "README.md")
    seq = load_sevenscenes(redkitchen_dir / "seq-01")
    assert seq.names() == load_sevenscenes(redkitchen_dir).names()


def test_real_split_fraction_and_every(redkitchen_dir: Path) -> None:
    fs = load_sevenscenes(redkitchen_dir)
    mapping, queries = split_frames(fs, fraction=0.04)
    assert (len(mapping), len(queries)) == (20, 480)
    assert set(mapping.names()).isdisjoint(queries.names())
    assert sorted(mapping.names() + queries.names()) == sorted(fs.names())
    # 20 of 500 evenly: the centre of each bin of 25, i.e. indices 12, 37, ... -> frame numbers 24, 74, ...
    assert mapping.names()[:3] == ["seq-01/frame-000024", "seq-01/frame-000074", "seq-01/frame-000124"]
    assert mapping.names()[-1] == "seq-01/frame-000974"
    assert queries.names() == [n for n in fs.names() if n not in set(mapping.names())]  # order kept

    mapping, queries = split_frames(fs, every=25)
    assert (len(mapping), len(queries)) == (20, 480)
    assert mapping.names()[:2] == ["seq-01/frame-000000", "seq-01/frame-000050"]
    with pytest.raises(ValueError, match="exactly one"):
        split_frames(fs)
    with pytest.raises(ValueError, match="exactly one"):
        split_frames(fs, fraction=0.1, every=3)


# ----------------------------------------------------------------------------- hand-made folders

def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    R, _ = cv2.Rodrigues(np.array([rx, ry, rz], dtype=np.float64))
    return R


def _write_frame(seq: Path, index: int, T: np.ndarray, ext: str = "png", depth: bool = False,
                 size: tuple[int, int] = (640, 480)) -> None:
    seq.mkdir(parents=True, exist_ok=True)
    stem = f"frame-{index:06d}"
    np.savetxt(seq / f"{stem}.pose.txt", T)
    w, h = size
    image = np.full((h, w, 3), 40 * index % 255, np.uint8)
    assert cv2.imwrite(str(seq / f"{stem}.color.{ext}"), image)
    if depth:
        assert cv2.imwrite(str(seq / f"{stem}.depth.png"), np.full((h, w), 1500, np.uint16))


def _pose(i: int) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = _rotation(0.1 * i, -0.05 * i, 0.02)
    T[:3, 3] = [0.1 * i, -0.2, 1.0 + i]
    return T


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    root = tmp_path / "scene"
    # Two sequences, written out of order; png colour in one, jpg in the other; a depth camera K file.
    for i in (10, 2, 0):
        _write_frame(root / "seq-02", i, _pose(i), ext="png")
    for i in (5, 1):
        _write_frame(root / "seq-01", i, _pose(i), ext="jpg", depth=True)
    np.savetxt(root / "camera-intrinsics.txt", np.array([[585.0, 0, 320], [0, 585.0, 240], [0, 0, 1]]))
    return root


def test_folder_png_and_jpg_sorted_by_sequence_then_index(scene: Path) -> None:
    assert is_sevenscenes(scene)
    fs = load_sevenscenes(scene)
    assert fs.names() == ["seq-01/frame-000001", "seq-01/frame-000005",
                          "seq-02/frame-000000", "seq-02/frame-000002", "seq-02/frame-000010"]
    assert fs[0].image_path.suffix == ".jpg" and fs[2].image_path.suffix == ".png"
    assert fs[0].depth_path is not None and fs[2].depth_path is None
    np.testing.assert_allclose(fs[4].T_world_cam, _pose(10), atol=1e-12)
    # camera-intrinsics.txt (585, the depth camera) must not leak into the colour camera.
    assert fs[0].camera.fx == 525.0


def test_intrinsics_override(scene: Path) -> None:
    cam = CameraIntrinsics(640, 480, 530.0, 531.0, 319.5, 239.5)
    fs = load_sevenscenes(scene, intrinsics=cam)
    assert all(f.camera == cam for f in fs)
    with pytest.raises(ValueError, match="320x240"):
        load_sevenscenes(scene, intrinsics=CameraIntrinsics(320, 240, 262.5, 262.5, 160, 120))


def test_non_rigid_pose_is_a_clear_error(scene: Path) -> None:
    bad = _pose(2)
    bad[:3, :3] *= 1.2  # a scaled rotation: not a rigid transform
    np.savetxt(scene / "seq-02" / "frame-000002.pose.txt", bad)
    with pytest.raises(ValueError, match=r"frame-000002\.pose\.txt.*not a rigid transform"):
        load_sevenscenes(scene)


def test_reflection_pose_is_a_clear_error(scene: Path) -> None:
    bad = _pose(2)
    bad[:3, 0] *= -1.0  # orthonormal but det = -1
    np.savetxt(scene / "seq-02" / "frame-000002.pose.txt", bad)
    with pytest.raises(ValueError, match="det"):
        load_sevenscenes(scene)


@pytest.mark.parametrize("content, message", [
    ("inf inf inf inf\n" * 4, "non-finite"),
    ("1 0 0\n0 1 0\n0 0 1\n", "4x4"),
    ("not a number\n", "cannot read pose"),
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 2\n", "last row"),
])
def test_broken_pose_file_is_a_clear_error(scene: Path, content: str, message: str) -> None:
    (scene / "seq-01" / "frame-000005.pose.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_sevenscenes(scene)


def test_missing_colour_image_is_a_clear_error(scene: Path) -> None:
    (scene / "seq-01" / "frame-000005.color.jpg").unlink()
    with pytest.raises(ValueError, match=r"frame-000005\.pose\.txt: no colour image"):
        load_sevenscenes(scene)


def test_colour_without_pose_is_a_clear_error(scene: Path) -> None:
    (scene / "seq-02" / "frame-000010.pose.txt").unlink()
    with pytest.raises(ValueError, match="without a pose"):
        load_sevenscenes(scene)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_sevenscenes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert not is_sevenscenes(tmp_path / "empty")
    with pytest.raises(ValueError, match="no seq-"):
        load_sevenscenes(tmp_path / "empty")
    (tmp_path / "empty" / "seq-01").mkdir()
    with pytest.raises(ValueError, match="no frames"):
        load_sevenscenes(tmp_path / "empty")


def test_single_sequence_folder(scene: Path) -> None:
    fs = load_sevenscenes(scene / "seq-02")
    assert fs.names() == ["seq-02/frame-000000", "seq-02/frame-000002", "seq-02/frame-000010"]


def test_saved_frameset_round_trip(scene: Path, tmp_path: Path) -> None:
    from offline.sources.frames import FrameSet

    fs = load_sevenscenes(scene)
    mapping, queries = split_frames(fs, every=2)
    assert mapping.names() == [fs.names()[i] for i in (0, 2, 4)]
    assert queries.names() == [fs.names()[i] for i in (1, 3)]
    mapping.save(tmp_path / "frames" / "frames.json")
    back = FrameSet.load(tmp_path / "frames" / "frames.json")
    assert back.names() == mapping.names()
    assert back.metadata["split"]["role"] == "mapping"
    np.testing.assert_array_equal(back[1].T_world_cam, mapping[1].T_world_cam)
