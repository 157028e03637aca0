"""Import a folder in the Microsoft 7-Scenes layout, and split it evenly into mapping/query frames.

Layout (SOURCE is either a scene folder holding ``seq-*/`` folders or one ``seq-*`` folder)::

    SCENE/camera-intrinsics.txt            optional; DEPTH camera K (fx = fy = 585), see below
    SCENE/seq-NN/frame-NNNNNN.color.png    colour image (.color.jpg accepted too)
    SCENE/seq-NN/frame-NNNNNN.pose.txt     4x4 camera-to-world, metres, OpenCV camera axes
    SCENE/seq-NN/frame-NNNNNN.depth.png    optional uint16 depth in millimetres, 65535 = invalid

Colour intrinsics: 7-Scenes ships no calibration of the colour camera. RGB relocalisation
work on 7-Scenes (DSAC*, ACE, hloc) uses fx = fy = 525, cx = 320, cy = 240 at 640x480, and
so do we by default. ``camera-intrinsics.txt`` in a scene folder holds the *depth* camera's
K (585) and is deliberately NOT used for the colour images.

Depth and colour are not registered in 7-Scenes. The data README's measurement: using one
focal length consistently for depth back-projection and for PnP (525 for both, or 585 for
both) gives ~1.5 cm / 1.3 deg, while mixing them (585 for depth, 525 for PnP) gives ~17 cm.
So every frame carries ONE camera (the colour intrinsics), and ``offline.depth_labels``
back-projects depth with that same camera.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.sources.frames import Frame, FrameSet, even_indices

# Colour camera used by RGB relocalisation work on 7-Scenes (not the depth camera's 585).
SEVENSCENES_COLOUR_INTRINSICS = CameraIntrinsics(width=640, height=480, fx=525.0, fy=525.0, cx=320.0, cy=240.0)
DEPTH_SCALE_MM = 1000.0  # depth pngs are millimetres

_SEQ_RE = re.compile(r"^seq-(\d+)$")
_POSE_RE = re.compile(r"^frame-(\d+)\.pose\.txt$")
_COLOUR_RE = re.compile(r"^frame-(\d+)\.color\.(png|jpg)$")
# Tolerance on R^T R = I and det R = 1: real 7-Scenes poses deviate by up to ~5e-4
# (text rounding of KinectFusion output); a scaled or sheared matrix is far outside.
_RIGID_TOLERANCE = 1e-2


def _sequence_dirs(path: Path) -> list[Path]:
    """The seq-* folders SOURCE stands for (itself if it is one), sorted by sequence number."""
    if _SEQ_RE.match(path.name) and any(path.glob("frame-*.pose.txt")):
        return [path]
    seqs = [p for p in path.iterdir() if p.is_dir() and _SEQ_RE.match(p.name)]
    return sorted(seqs, key=lambda p: int(_SEQ_RE.match(p.name).group(1)))


def is_sevenscenes(path: str | Path) -> bool:
    """True when ``path`` is a 7-Scenes scene folder (with seq-* folders) or one seq-* folder."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return any(next(seq.glob("frame-*.pose.txt"), None) is not None for seq in _sequence_dirs(path))
    except OSError:
        return False


def read_pose(path: Path) -> np.ndarray:
    """A camera-to-world pose file: a finite 4x4 rigid transform, else ValueError naming the file."""
    try:
        T = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read pose file {path}: {exc}") from exc
    if T.shape != (4, 4):
        raise ValueError(f"pose file {path} must hold a 4x4 matrix, got shape {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"pose file {path} holds non-finite values (inf/nan): not a valid pose")
    if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise ValueError(f"pose file {path}: last row must be [0 0 0 1], got {T[3].tolist()}")
    R = T[:3, :3]
    orth_err = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if orth_err > _RIGID_TOLERANCE or abs(det - 1.0) > _RIGID_TOLERANCE:
        raise ValueError(
            f"pose file {path} is not a rigid transform: rotation block has |R^T R - I| = {orth_err:.3g} "
            f"and det = {det:.6g} (expected an orthonormal rotation with det 1)"
        )
    return T


def _image_size(path: Path) -> tuple[int, int]:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read colour image {path}")
    return int(img.shape[1]), int(img.shape[0])


def load_sevenscenes(path: str | Path, intrinsics: CameraIntrinsics | None = None) -> FrameSet:
    """All posed frames of a 7-Scenes scene or sequence folder, sorted by sequence then frame index.

    ``intrinsics``: the colour camera (default fx = fy = 525, cx = 320, cy = 240 at 640x480;
    the scene's ``camera-intrinsics.txt`` describes the depth camera and is ignored on purpose).
    Frame names are ``"seq-NN/frame-NNNNNN"``. Depth pngs, where present, are attached in
    millimetres (``depth_scale=1000``) and are meant to be back-projected with the SAME camera.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"7-Scenes folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"7-Scenes source {path} is not a folder")
    camera = intrinsics if intrinsics is not None else SEVENSCENES_COLOUR_INTRINSICS
    seqs = _sequence_dirs(path)
    if not seqs:
        raise ValueError(f"{path} holds no seq-* folders and is not a seq-* folder with frame-*.pose.txt files")

    frames: list[Frame] = []
    for seq in seqs:
        files = {p.name: p for p in seq.iterdir() if p.is_file()}
        poses = sorted(((int(m.group(1)), m.group(0)) for m in map(_POSE_RE.match, files) if m))
        pose_indices = {i for i, _ in poses}
        orphans = sorted(n for n in files if (m := _COLOUR_RE.match(n)) and int(m.group(1)) not in pose_indices)
        if orphans:
            raise ValueError(f"{seq}: colour image(s) without a pose file, e.g. {orphans[0]} ({len(orphans)} in all)")
        for _, pose_name in poses:
            stem = pose_name[: -len(".pose.txt")]
            colour = next((files[f"{stem}.color.{ext}"] for ext in ("png", "jpg") if f"{stem}.color.{ext}" in files), None)
            if colour is None:
                raise ValueError(f"{seq / pose_name}: no colour image {stem}.color.png or {stem}.color.jpg beside it")
            depth = files.get(f"{stem}.depth.png")
            frames.append(Frame(
                name=f"{seq.name}/{stem}",
                image_path=colour,
                T_world_cam=read_pose(files[pose_name]),
                camera=camera,
                depth_path=depth,
                depth_scale=DEPTH_SCALE_MM,
            ))
    if not frames:
        raise ValueError(f"{path}: no frames found (expected frame-NNNNNN.pose.txt files in seq-* folders)")

    # One header check: the intrinsics must describe images of this size (pixel units).
    width, height = _image_size(frames[0].image_path)
    if (width, height) != (camera.width, camera.height):
        raise ValueError(
            f"colour images are {width}x{height} but the intrinsics are for {camera.width}x{camera.height}; "
            f"pass intrinsics for the actual image size (e.g. camera.scaled_to({width}, {height}))"
        )

    metadata = {
        "source": "7scenes",
        "path": str(path.resolve()),
        "sequences": [s.name for s in seqs],
        "intrinsics": "given" if intrinsics is not None else "7-Scenes colour default fx=fy=525 cx=320 cy=240",
        "note": "camera-intrinsics.txt (depth camera, 585) not used; depth back-projected with the colour camera",
    }
    return FrameSet(frames, metadata)


def split_frames(frameset: FrameSet, fraction: float | None = None, every: int | None = None) -> tuple[FrameSet, FrameSet]:
    """(mapping, queries): an even sample (``fraction`` of the frames, or every N-th), and all the others."""
    mapping_idx = even_indices(len(frameset), fraction=fraction, every=every)
    chosen = set(mapping_idx)
    query_idx = [i for i in range(len(frameset)) if i not in chosen]
    mapping = frameset.subset(mapping_idx)
    queries = frameset.subset(query_idx)
    split = {"fraction": fraction, "every": every, "n_total": len(frameset)}
    mapping.metadata["split"] = dict(split, role="mapping")
    queries.metadata["split"] = dict(split, role="queries")
    return mapping, queries
