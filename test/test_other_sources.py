"""nerfstudio transforms.json and COLMAP model sources, and source detection, from known poses."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose, pose_error, quat_wxyz_from_matrix
from offline.demo_scene import DEMO_CAMERA, render_demo_frames
from offline.sources import SourceOptions, detect_source, open_source
from offline.sources.colmap_source import load_colmap
from offline.sources.frames import FrameSet
from offline.sources.nerfstudio_source import load_nerfstudio


@pytest.fixture(scope="module")
def demo_frames():
    _, stamps, _, _, cams, images, _ = render_demo_frames(5)
    return cams, images


def write_images(folder, images) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        name = f"frame_{i:05d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        names.append(name)
    return names


def opengl_c2w(T_world_cam: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world -> OpenGL: the camera's y (down -> up) and z (forward -> back) axes flip."""
    T = T_world_cam.copy()
    T[:3, 1] *= -1
    T[:3, 2] *= -1
    return T


# --- nerfstudio ----------------------------------------------------------------------------

def test_nerfstudio_round_trip(tmp_path, demo_frames):
    cams, images = demo_frames
    names = write_images(tmp_path / "ns" / "images", images)
    doc = {
        "camera_model": "OPENCV",
        # nerfstudio's pixel centres are at +0.5: our cx = 159.5 is its 160.0.
        "fl_x": 250.0, "fl_y": 250.0, "cx": 160.0, "cy": 120.0, "w": 320, "h": 240,
        "k1": 0.01, "k2": -0.002, "p1": 0.0005, "p2": -0.0003,
        "frames": [{"file_path": f"images/{n}", "transform_matrix": opengl_c2w(T).tolist()} for n, T in zip(names, cams)],
    }
    doc["frames"][2]["fl_x"] = 260.0  # a per-frame override
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps(doc))
    assert detect_source(tmp_path / "ns") == "nerfstudio"
    frames = open_source(tmp_path / "ns", tmp_path / "out")
    assert len(frames) == 5
    for frame, T, image in zip(frames, cams, images):
        np.testing.assert_allclose(frame.T_world_cam, T, atol=1e-12)
        assert np.array_equal(frame.load_rgb(), image)
    cam = frames[0].camera
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (250.0, 250.0, 159.5, 119.5, 320, 240)
    assert cam.distortion_model == "plumb_bob"
    assert cam.distortion == (0.01, -0.002, 0.0005, -0.0003, 0.0)  # OpenCV order k1 k2 p1 p2 k3
    assert frames[2].camera.fx == 260.0 and frames[1].camera.fx == 250.0
    reloaded = FrameSet.load(tmp_path / "out" / "frames.json")
    np.testing.assert_allclose(reloaded[4].T_world_cam, cams[4])


def test_nerfstudio_hand_case_and_fisheye(tmp_path, demo_frames):
    _, images = demo_frames
    names = write_images(tmp_path / "ns" / "images", images[:1])
    doc = {"camera_model": "OPENCV_FISHEYE", "fl_x": 200.0, "cx": 160.5, "cy": 120.5,
           "k1": 0.1, "k2": 0.01, "k3": -0.001, "k4": 0.0001,
           "frames": [{"file_path": f"images/{names[0]}", "transform_matrix": np.eye(4).tolist()}]}
    (tmp_path / "ns" / "transforms.json").write_text(json.dumps(doc))
    frame = load_nerfstudio(tmp_path / "ns")[0]
    # An OpenGL camera at the identity looks along world -z with y up: ours looks along -z with y down.
    np.testing.assert_allclose(frame.T_world_cam, np.diag([1.0, -1.0, -1.0, 1.0]))
    assert frame.camera == CameraIntrinsics(320, 240, 200.0, 200.0, 160.0, 120.0, "equidistant", (0.1, 0.01, -0.001, 0.0001))


def test_nerfstudio_bad_input(tmp_path, demo_frames):
    _, images = demo_frames
    names = write_images(tmp_path / "ns" / "images", images[:2])
    base = {"fl_x": 250.0, "w": 320, "h": 240}

    def write(**changes):
        doc = {**base, "frames": [{"file_path": f"images/{n}", "transform_matrix": np.eye(4).tolist()} for n in names]}
        doc.update(changes)
        (tmp_path / "ns" / "transforms.json").write_text(json.dumps(doc))

    write(camera_model="EQUIRECTANGULAR")
    with pytest.raises(ValueError, match="EQUIRECTANGULAR.*not supported"):
        load_nerfstudio(tmp_path / "ns")
    write(frames=[{"file_path": "images/missing.png", "transform_matrix": np.eye(4).tolist()}])
    with pytest.raises(ValueError, match="not found, e.g. images/missing.png"):
        load_nerfstudio(tmp_path / "ns")
    write(frames=[{"file_path": f"images/{names[0]}", "transform_matrix": (2 * np.eye(4)).tolist()}])
    with pytest.raises(ValueError, match="rotation"):
        load_nerfstudio(tmp_path / "ns")
    write(k4=0.1)
    with pytest.raises(ValueError, match="no k4"):
        load_nerfstudio(tmp_path / "ns")


# --- COLMAP --------------------------------------------------------------------------------

def write_colmap_text(model_dir, names, cams, camera_lines: list[str], camera_of_image: list[int]) -> None:
    """cameras.txt / images.txt / points3D.txt in COLMAP's documented text format."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cameras.txt").write_text("# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n" + "\n".join(camera_lines) + "\n")
    lines = ["# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME"]
    for i, (name, T_world_cam) in enumerate(zip(names, cams)):
        T_cam_world = invert_pose(T_world_cam)
        q = quat_wxyz_from_matrix(T_cam_world[:3, :3])
        t = T_cam_world[:3, 3]
        lines.append(" ".join(f"{v:.17g}" for v in [i + 1, *q, *t]) + f" {camera_of_image[i]} {name}")
        lines.append("")  # no 2D points
    (model_dir / "images.txt").write_text("\n".join(lines) + "\n")
    (model_dir / "points3D.txt").write_text("# POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[]\n")


def test_colmap_text_and_binary_round_trip(tmp_path, demo_frames):
    import pycolmap

    cams, images = demo_frames
    project = tmp_path / "project"
    names = write_images(project / "images", images)
    # COLMAP's pixel centres are at +0.5: our cx = 159.5 is COLMAP's 160.
    camera_lines = ["1 PINHOLE 320 240 250 250 160 120", "2 OPENCV 320 240 251 252 161 121 0.01 -0.002 0.0005 -0.0003"]
    write_colmap_text(project / "sparse" / "0", names, cams, camera_lines, [1, 1, 2, 1, 1])
    assert detect_source(project) == "colmap"
    frames = open_source(project, tmp_path / "out")
    assert frames.names() == [n[:-4] for n in names]
    for frame, T, image in zip(frames, cams, images):
        dt, dr = pose_error(frame.T_world_cam, T)
        assert dt < 1e-9 and dr < 1e-6
        assert np.array_equal(frame.load_rgb(), image)
    assert frames[0].camera == DEMO_CAMERA
    assert frames[2].camera == CameraIntrinsics(320, 240, 251.0, 252.0, 160.5, 120.5, "plumb_bob", (0.01, -0.002, 0.0005, -0.0003))

    # The same model as .bin in a bare model folder, images given explicitly.
    binary = tmp_path / "binary_model"
    binary.mkdir()
    pycolmap.Reconstruction(str(project / "sparse" / "0")).write_binary(str(binary))
    assert (binary / "images.bin").is_file()
    frames_bin = load_colmap(binary, image_dir=project / "images")
    for a, b in zip(frames, frames_bin):
        np.testing.assert_allclose(a.T_world_cam, b.T_world_cam, atol=1e-12)
        assert a.camera == b.camera
    frames_opt = open_source(binary, tmp_path / "out2", SourceOptions(colmap_image_dir=project / "images"))
    assert len(frames_opt) == 5


def test_colmap_bad_input(tmp_path, demo_frames):
    cams, images = demo_frames
    project = tmp_path / "p"
    names = write_images(project / "images", images[:2])
    write_colmap_text(project / "sparse" / "0", names, cams[:2], ["1 FOV 320 240 250 250 160 120 0.9"], [1, 1])
    with pytest.raises(ValueError, match="camera model FOV has no equivalent"):
        load_colmap(project)
    write_colmap_text(project / "sparse" / "0", ["a.png", "b.png"], cams[:2], ["1 PINHOLE 320 240 250 250 160 120"], [1, 1])
    with pytest.raises(ValueError, match="cannot find the model's images"):
        load_colmap(project)


# --- detection -----------------------------------------------------------------------------

def test_detect_source_kinds_and_unknown(tmp_path, demo_frames):
    cams, images = demo_frames
    seq = tmp_path / "scene" / "seq-01"
    seq.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(seq / f"frame-{i:06d}.color.png"), cv2.resize(images[i], (640, 480)))
        np.savetxt(seq / f"frame-{i:06d}.pose.txt", cams[i])
    assert detect_source(tmp_path / "scene") == "sevenscenes"
    frames = open_source(tmp_path / "scene", tmp_path / "out")
    np.testing.assert_allclose(frames[1].T_world_cam, cams[1], atol=1e-12)

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    for bad in (tmp_path / "junk", tmp_path / "junk" / "notes.txt"):
        with pytest.raises(ValueError) as err:
            detect_source(bad)
        for accepted in ("7-Scenes", ".bag", ".mcap", "metadata.yaml", "transforms.json", "COLMAP"):
            assert accepted in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        open_source(tmp_path / "nothing", tmp_path / "out")
