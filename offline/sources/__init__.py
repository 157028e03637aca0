"""Mapping-data sources: detect what a path is and import it into a ``FrameSet``.

Accepted (``detect_source`` names):
- ``sevenscenes``: a 7-Scenes scene folder (``seq-*/frame-*.pose.txt``) or one ``seq-*`` folder;
- ``rosbag``: a ROS 1 ``.bag``, a ROS 2 ``.mcap`` or ``.db3`` file, or a ROS 2 bag folder
  (``metadata.yaml`` beside ``.db3``/``.mcap`` files);
- ``nerfstudio``: a folder with ``transforms.json`` (or that file);
- ``colmap``: a COLMAP model folder (``cameras``/``images``/``points3D`` .bin or .txt) or a
  project folder with ``sparse/0``, plus its images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.sources.frames import FrameSet
from offline.sources.rosbag_source import BagSourceOptions, is_bag

SOURCE_KINDS = ("sevenscenes", "rosbag", "nerfstudio", "colmap")
ACCEPTED = (
    "a 7-Scenes scene or seq-* folder (frame-*.pose.txt + frame-*.color.png); "
    "a ROS 1 .bag file; a ROS 2 .mcap or .db3 file or bag folder (metadata.yaml + .db3/.mcap); "
    "a nerfstudio folder with transforms.json; "
    "a COLMAP model folder (cameras/images/points3D .bin or .txt, or a project with sparse/0) with its images"
)


@dataclass
class SourceOptions:
    """Options for every source; each reads the ones that apply to it."""

    bag: BagSourceOptions = field(default_factory=BagSourceOptions)
    # (fx, fy, cx, cy) for sources without a calibration (bags without CameraInfo; 7-Scenes override).
    intrinsics: tuple[float, float, float, float] | None = None
    colmap_image_dir: Path | None = None  # None: an images/ folder beside or above the model


def detect_source(path: str | Path) -> str:
    """One of ``SOURCE_KINDS``; ``ValueError`` listing what is accepted otherwise."""
    from offline.sources.colmap_source import is_colmap
    from offline.sources.nerfstudio_source import is_nerfstudio
    from offline.sources.sevenscenes import is_sevenscenes

    path = Path(path)
    if not path.exists():
        raise ValueError(f"source {path} does not exist. Accepted sources: {ACCEPTED}")
    if is_bag(path):
        return "rosbag"
    if is_nerfstudio(path):
        return "nerfstudio"
    if is_colmap(path):
        return "colmap"
    if is_sevenscenes(path):
        return "sevenscenes"
    raise ValueError(f"cannot tell what kind of source {path} is. Accepted sources: {ACCEPTED}")


def open_source(path: str | Path, out_dir: str | Path, options: SourceOptions | BagSourceOptions | None = None) -> FrameSet:
    """Import ``path`` (any accepted kind) into a FrameSet saved as ``out_dir/frames.json``.

    Bags have their selected images decoded into ``out_dir/images``; folder sources keep
    their images where they are (the frame set refers to them by absolute path).
    """
    if options is None:
        options = SourceOptions()
    elif isinstance(options, BagSourceOptions):
        options = SourceOptions(bag=options, intrinsics=options.intrinsics)
    path, out_dir = Path(path), Path(out_dir)
    kind = detect_source(path)
    if kind != "rosbag" and options.bag.pose_source == "sfm":
        raise ValueError(f"--pose-source sfm is for bags without poses; {path} is a {kind} source, which has its own poses")
    if kind == "rosbag":
        from offline.sources.rosbag_source import load_bag

        bag_options = options.bag
        if bag_options.intrinsics is None and options.intrinsics is not None:
            bag_options = BagSourceOptions(**{**bag_options.__dict__, "intrinsics": options.intrinsics})
        return load_bag(path, bag_options, out_dir)  # saves frames.json itself
    if kind == "sevenscenes":
        from offline.sources.sevenscenes import load_sevenscenes

        camera = None
        if options.intrinsics is not None:
            from offline.sources.rosbag_source import parse_intrinsics
            from offline.sources.sevenscenes import SEVENSCENES_COLOUR_INTRINSICS as default

            fx, fy, cx, cy = parse_intrinsics(options.intrinsics)
            camera = CameraIntrinsics(width=default.width, height=default.height, fx=fx, fy=fy, cx=cx, cy=cy)
        frameset = load_sevenscenes(path, intrinsics=camera)
    elif kind == "nerfstudio":
        from offline.sources.nerfstudio_source import load_nerfstudio

        frameset = load_nerfstudio(path)
    else:
        from offline.sources.colmap_source import load_colmap

        frameset = load_colmap(path, options.colmap_image_dir)
    if len(frameset) == 0:
        raise ValueError(f"source {path} ({kind}) holds no frames")
    frameset.save(out_dir / "frames.json")
    return frameset


__all__ = ["SOURCE_KINDS", "SourceOptions", "BagSourceOptions", "detect_source", "open_source"]
