"""Posed frames from a COLMAP model (``cameras``/``images``/``points3D`` as .bin or .txt) and its images.

Read with ``pycolmap.Reconstruction``. Conventions:
- COLMAP stores ``cam_from_world`` (world-to-camera), OpenCV camera axes; we keep the inverse,
  ``T_world_cam``.
- COLMAP's image coordinates put the top-left pixel's centre at (0.5, 0.5); ours at (0, 0),
  so ``cx_ours = cx_colmap - 0.5`` (same for ``cy``).
- Camera models with an equivalent here: SIMPLE_PINHOLE, PINHOLE (no distortion),
  SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV (OpenCV's radial-tangential, ``plumb_bob``),
  OPENCV_FISHEYE (``equidistant``). Others raise a clear error.

Accepted paths: the model folder itself, or a project folder holding ``sparse/0`` (or
``sparse``) with the model. Images are looked up in ``image_dir`` when given, else in an
``images`` folder beside the model or up to two levels above it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose
from offline.sources.frames import Frame, FrameSet

MODEL_FILES = ("cameras", "images")


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / f"{name}{ext}").is_file() for name in MODEL_FILES) for ext in (".bin", ".txt"))


def find_model_dir(path: str | Path) -> Path | None:
    """The folder holding cameras/images files that ``path`` stands for, or None."""
    path = Path(path)
    for candidate in (path, path / "sparse" / "0", path / "sparse"):
        if _is_model_dir(candidate):
            return candidate
    return None


def is_colmap(path: str | Path) -> bool:
    return find_model_dir(path) is not None


def camera_from_colmap(camera, where: str = "") -> CameraIntrinsics:
    """A pycolmap camera as our intrinsics (pixel centres shifted to integer coordinates)."""
    model = camera.model.name
    p = [float(v) for v in camera.params]
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]; cx, cy = p[1], p[2]; dist_model, dist = "none", ()
    elif model == "PINHOLE":
        fx, fy, cx, cy = p[:4]; dist_model, dist = "none", ()
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]; cx, cy = p[1], p[2]; dist_model, dist = "plumb_bob", (p[3], 0.0, 0.0, 0.0)
    elif model == "RADIAL":
        fx = fy = p[0]; cx, cy = p[1], p[2]; dist_model, dist = "plumb_bob", (p[3], p[4], 0.0, 0.0)
    elif model == "OPENCV":
        fx, fy, cx, cy = p[:4]; dist_model, dist = "plumb_bob", tuple(p[4:8])
    elif model == "FULL_OPENCV":
        # COLMAP: k1 k2 p1 p2 k3 k4 k5 k6, OpenCV's rational model in OpenCV's order.
        fx, fy, cx, cy = p[:4]; dist_model, dist = "plumb_bob", tuple(p[4:12])
    elif model == "OPENCV_FISHEYE":
        fx, fy, cx, cy = p[:4]; dist_model, dist = "equidistant", tuple(p[4:8])
    else:
        raise ValueError(
            f"{where}COLMAP camera model {model} has no equivalent here (supported: SIMPLE_PINHOLE, PINHOLE, "
            "SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV, OPENCV_FISHEYE); undistort the model first "
            "(colmap image_undistorter) and use the undistorted model"
        )
    if dist_model != "none" and not any(dist):
        dist_model, dist = "none", ()
    return CameraIntrinsics(width=int(camera.width), height=int(camera.height), fx=fx, fy=fy,
                            cx=cx - 0.5, cy=cy - 0.5, distortion_model=dist_model, distortion=dist)


def _find_image_dir(model_dir: Path, first_name: str, image_dir: Path | None) -> Path:
    candidates = [Path(image_dir)] if image_dir is not None else [
        model_dir / "images", model_dir.parent / "images", model_dir.parent.parent / "images", model_dir.parent.parent.parent / "images",
    ]
    for c in candidates:
        if (c / first_name).is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise ValueError(f"cannot find the model's images (e.g. {first_name}) in: {looked}; give the image folder explicitly")


def load_colmap(path: str | Path, image_dir: str | Path | None = None) -> FrameSet:
    """The registered images of a COLMAP model, with their poses and cameras."""
    import pycolmap

    path = Path(path)
    model_dir = find_model_dir(path)
    if model_dir is None:
        raise ValueError(f"{path} holds no COLMAP model (cameras.bin/.txt and images.bin/.txt, here or in sparse/0)")
    try:
        recon = pycolmap.Reconstruction(str(model_dir))
    except Exception as exc:  # pycolmap raises generic errors on malformed files
        raise ValueError(f"cannot read the COLMAP model in {model_dir}: {exc}") from exc
    registered = sorted((im for im in recon.images.values() if im.has_pose), key=lambda im: im.name)
    if not registered:
        raise ValueError(f"the COLMAP model in {model_dir} has no registered images")
    images_root = _find_image_dir(model_dir, registered[0].name, Path(image_dir) if image_dir is not None else None)
    cameras: dict[int, CameraIntrinsics] = {}
    frames: list[Frame] = []
    missing: list[str] = []
    for im in registered:
        if im.camera_id not in cameras:
            cameras[im.camera_id] = camera_from_colmap(im.camera, f"camera {im.camera_id}: ")
        image_path = images_root / im.name
        if not image_path.is_file():
            missing.append(im.name)
            continue
        cam_from_world = np.vstack([np.asarray(im.cam_from_world().matrix(), dtype=np.float64), [0, 0, 0, 1]])
        frames.append(Frame(name=str(Path(im.name).with_suffix("")), image_path=image_path.resolve(),
                            T_world_cam=invert_pose(cam_from_world), camera=cameras[im.camera_id]))
    if missing:
        raise ValueError(f"{len(missing)} image(s) of the model are not in {images_root}, e.g. {', '.join(missing[:3])}")
    metadata = {
        "source": "colmap",
        "path": str(model_dir.resolve()),
        "images": str(images_root.resolve()),
        "registered": len(registered),
        "unregistered": len(recon.images) - len(registered),
        "points3D": int(recon.num_points3D()),
        "note": "cam_from_world inverted to T_world_cam; cx, cy shifted by -0.5 px to integer pixel centres",
    }
    return FrameSet(frames, metadata)
