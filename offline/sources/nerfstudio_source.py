"""Posed frames from a nerfstudio ``transforms.json`` folder.

Conventions of the format (nerfstudio's own data parser is the reference):
- ``transform_matrix`` is camera-to-world with OpenGL camera axes (x right, y up, z back);
  ours are OpenCV's (x right, y down, z forward), so the camera's y and z columns flip.
- Intrinsics ``fl_x fl_y cx cy w h`` at the top level, any of them overridable per frame.
  nerfstudio puts pixel centres at ``i + 0.5`` (its rays go through ``(x + 0.5 - cx) / fx``);
  ours are at integer coordinates, so ``cx_ours = cx - 0.5`` (same for ``cy``).
- Distortion ``k1 k2 k3 k4 p1 p2`` with ``camera_model`` ``OPENCV`` (radial k1..k3,
  tangential p1 p2) or ``OPENCV_FISHEYE`` (equidistant k1..k4).
- Optional ``depth_file_path`` per frame, raw units times ``depth_unit_scale_factor``
  (default 1e-3) are metres.
The world frame is the file's world frame as written (``applied_transform`` already applied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.sources.frames import Frame, FrameSet

# OpenGL camera axes -> OpenCV camera axes: flip y and z of the camera frame.
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
PINHOLE_LIKE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "k3", "k4", "p1", "p2", "camera_model")


def transforms_path(path: str | Path) -> Path | None:
    """The transforms.json that ``path`` names (the file itself or inside the folder), or None."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".json"):
        return path
    if path.is_dir() and (path / "transforms.json").is_file():
        return path / "transforms.json"
    return None


def is_nerfstudio(path: str | Path) -> bool:
    p = transforms_path(path)
    if p is None:
        return False
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("frames"), list)


def _camera(params: dict[str, Any], where: str, image_size: tuple[int, int] | None) -> CameraIntrinsics:
    model = str(params.get("camera_model", "OPENCV")).upper()
    try:
        fx = float(params["fl_x"])
        fy = float(params.get("fl_y", fx))
        if "w" in params and "h" in params:
            width, height = int(params["w"]), int(params["h"])
        elif image_size is not None:
            width, height = image_size
        else:
            raise KeyError("w/h")
        cx = float(params.get("cx", width / 2.0)) - 0.5
        cy = float(params.get("cy", height / 2.0)) - 0.5
        k = [float(params.get(f"k{i}", 0.0)) for i in range(1, 5)]
        p = [float(params.get(f"p{i}", 0.0)) for i in range(1, 3)]
    except KeyError as exc:
        raise ValueError(f"{where}: missing intrinsics key {exc.args[0]!r} (need fl_x, and w/h or readable images)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: intrinsics must be numbers ({exc})") from None
    if model in PINHOLE_LIKE_MODELS:
        if k[3] != 0.0:
            raise ValueError(f"{where}: camera model {model} has no k4 (got k4={k[3]}); use OPENCV_FISHEYE for k1..k4")
        coeffs = (k[0], k[1], p[0], p[1], k[2])
        dist_model = "plumb_bob" if any(coeffs) else "none"
        distortion = coeffs if any(coeffs) else ()
    elif model == "OPENCV_FISHEYE":
        if any(p):
            raise ValueError(f"{where}: OPENCV_FISHEYE has no tangential terms (got p1={p[0]}, p2={p[1]})")
        dist_model, distortion = "equidistant", tuple(k)
    else:
        raise ValueError(
            f"{where}: camera model {model!r} is not supported (supported: {', '.join(PINHOLE_LIKE_MODELS)}, OPENCV_FISHEYE)"
        )
    try:
        return CameraIntrinsics(width=width, height=height, fx=fx, fy=fy, cx=cx, cy=cy,
                                distortion_model=dist_model, distortion=distortion)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _image_size(path: Path) -> tuple[int, int] | None:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if image is None else (int(image.shape[1]), int(image.shape[0]))


def load_nerfstudio(path: str | Path) -> FrameSet:
    """All frames of a transforms.json (folder or file); images stay where they are."""
    json_path = transforms_path(path)
    if json_path is None:
        raise ValueError(f"{path} is not a transforms.json or a folder holding one")
    root = json_path.parent
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {json_path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list):
        raise ValueError(f"{json_path} has no 'frames' list; not a nerfstudio transforms.json")
    if not doc["frames"]:
        raise ValueError(f"{json_path} lists no frames")
    depth_scale = 1.0 / float(doc.get("depth_unit_scale_factor", 1e-3))

    frames: list[Frame] = []
    missing: list[str] = []
    names: set[str] = set()
    for i, entry in enumerate(doc["frames"]):
        where = f"{json_path} frame {i}"
        if "file_path" not in entry or "transform_matrix" not in entry:
            raise ValueError(f"{where}: needs file_path and transform_matrix")
        image_path = (root / entry["file_path"]).resolve()
        if not image_path.is_file():
            missing.append(str(entry["file_path"]))
            continue
        T_gl = np.asarray(entry["transform_matrix"], dtype=np.float64)
        if T_gl.shape == (3, 4):
            T_gl = np.vstack([T_gl, [0, 0, 0, 1]])
        if T_gl.shape != (4, 4) or not np.all(np.isfinite(T_gl)):
            raise ValueError(f"{where}: transform_matrix must be a finite 4x4 (or 3x4) matrix")
        R = T_gl[:3, :3]
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-4 or np.linalg.det(R) < 0:
            raise ValueError(f"{where}: transform_matrix does not hold a rotation (scaled or mirrored camera?)")
        params = {k: doc[k] for k in INTRINSIC_KEYS if k in doc}
        params.update({k: entry[k] for k in INTRINSIC_KEYS if k in entry})
        size = None if ("w" in params and "h" in params) else _image_size(image_path)
        camera = _camera(params, where, size)
        depth_path = None
        if entry.get("depth_file_path"):
            depth_path = (root / entry["depth_file_path"]).resolve()
            if not depth_path.is_file():
                raise ValueError(f"{where}: depth file {entry['depth_file_path']} does not exist")
        name = str(Path(entry["file_path"]).with_suffix(""))
        if name in names:
            raise ValueError(f"{where}: image {entry['file_path']} is listed twice")
        names.add(name)
        frames.append(Frame(name=name, image_path=image_path, T_world_cam=T_gl @ GL_TO_CV, camera=camera,
                            depth_path=depth_path, depth_scale=depth_scale))
    if missing:
        raise ValueError(f"{json_path}: {len(missing)} image(s) listed but not found, e.g. {', '.join(missing[:3])}")
    metadata = {
        "source": "nerfstudio",
        "path": str(json_path.resolve()),
        "note": "OpenGL camera-to-world converted to OpenCV axes; cx, cy shifted by -0.5 px to integer pixel centres",
    }
    if "applied_transform" in doc:
        metadata["applied_transform"] = doc["applied_transform"]
    return FrameSet(frames, metadata)
