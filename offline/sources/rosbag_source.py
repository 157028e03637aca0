"""Posed mapping frames from a bag: ROS 1 ``.bag``, ROS 2 mcap or sqlite3 (file or bag folder).

Read with ``rosbags`` (no ROS install needed). Images come from one ``sensor_msgs/Image`` or
``CompressedImage`` topic, intrinsics from a ``CameraInfo`` topic (or ``--intrinsics``), and
each image's camera pose from one of:

- ``tf``: the ``/tf`` + ``/tf_static`` chain from the map frame to the camera frame (default
  the image ``frame_id``), dynamic transforms interpolated to the image stamp;
- ``topic``: a ``PoseStamped``, ``PoseWithCovarianceStamped``, ``Odometry`` or
  ``TransformStamped`` topic interpolated to the image stamp, times ``pose_to_camera``;
- ``sfm``: no poses in the bag: structure-from-motion (``offline/sfm.py``, COLMAP via pycolmap)
  on the selected images. Its frame is the first registered camera's and its scale arbitrary
  unless ``scale`` (metres per map unit) or ``known_distance`` (images I and J, the numbers in
  their frame names ``frame-00000I``, are D metres apart) fixes it; frames SfM cannot register
  are skipped and counted. The motion filter cannot run before there are poses.

Images are ordered by header stamp (recorders do not guarantee it; how many were out of
order is reported). An image whose pose cannot be interpolated from samples within
``pose_tolerance_s`` on each side is skipped and counted. The selected images are written as
PNG into ``out_dir/images`` and the frame set into ``out_dir/frames.json``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2s_nerf_ros.camera import CameraInfoError, CameraIntrinsics, camera_from_camera_info, rectification_hint
from d2s_nerf_ros.geometry import pose_error
from d2s_nerf_ros.image_conversion import ImageConversionError, compressed_msg_to_numpy, image_msg_to_numpy
from d2s_nerf_ros.tf_math import TransformBuffer, TransformLookupError, pose_from_msg, transform_from_msg
from offline.sfm import SfmConfig
from offline.sources.frames import Frame, FrameSet, even_indices

log = logging.getLogger(__name__)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"
POSE_TYPES = (
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/TransformStamped",
)
POSE_SOURCES = ("tf", "topic", "sfm")
INTRINSICS_HINT = "pass the camera intrinsics with --intrinsics fx,fy,cx,cy (pixels)"


class BagSourceError(ValueError):
    """The bag cannot give posed frames with these options; the message says what to change."""


@dataclass
class BagSourceOptions:
    image_topic: str | None = None  # None: the bag's only image topic
    camera_info_topic: str | None = None  # None: the CameraInfo beside the image topic, or the only one
    pose_source: str = "tf"  # tf | topic | sfm
    map_frame: str = "map"
    camera_frame: str | None = None  # None: the images' header.frame_id
    pose_topic: str | None = None  # pose_source "topic"; None: the bag's only pose topic
    pose_to_camera: Any = None  # 4x4 T_pose_cam (list or array): the camera in the frame the poses describe
    intrinsics: tuple[float, float, float, float] | None = None  # (fx, fy, cx, cy); overrides CameraInfo
    # The images are rectified: the camera is CameraInfo P's pinhole and D is ignored (see
    # d2s_nerf_ros.camera.camera_from_camera_info); the topic name never decides this.
    rectified: bool = False
    fraction: float | None = None
    every: int | None = None
    min_motion_m: float | None = None  # keep a frame once the camera moved this far ...
    min_rotation_deg: float | None = None  # ... or turned this much since the last kept one
    pose_tolerance_s: float = 0.1  # pose samples on each side of an image stamp must be this close
    # pose_source "sfm" only: metres per SfM map unit, or "I,J,D" / (I, J, D): the camera centres
    # of images I and J (message indices on the image topic, as in frame-00000I) are D metres apart.
    scale: float | None = None
    known_distance: Any = None
    sfm: SfmConfig = field(default_factory=SfmConfig)

    def validate(self) -> None:
        if self.pose_source not in POSE_SOURCES:
            raise BagSourceError(f"pose source must be one of {', '.join(POSE_SOURCES)}, got {self.pose_source!r}")
        if self.fraction is not None and self.every is not None:
            raise BagSourceError("give at most one of --fraction and --every")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise BagSourceError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.every is not None and self.every < 1:
            raise BagSourceError(f"--every must be >= 1, got {self.every}")
        for name in ("min_motion_m", "min_rotation_deg"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise BagSourceError(f"{name} must be a non-negative number, got {value}")
        if not (math.isfinite(self.pose_tolerance_s) and self.pose_tolerance_s >= 0):
            raise BagSourceError(f"pose tolerance must be a non-negative number of seconds, got {self.pose_tolerance_s}")
        if self.intrinsics is not None:
            parse_intrinsics(self.intrinsics)
        if self.pose_to_camera is not None:
            pose_to_camera_matrix(self.pose_to_camera)
        if self.pose_source == "sfm":
            if self.min_motion_m is not None or self.min_rotation_deg is not None:
                raise BagSourceError(
                    "the motion filter (--min-motion) needs poses before the frames are chosen, and --pose-source sfm "
                    "makes them from the chosen frames; select frames with --every or --fraction instead"
                )
            for name, flag in (("pose_topic", "--pose-topic"), ("pose_to_camera", "--pose-to-camera")):
                if getattr(self, name) is not None:
                    raise BagSourceError(f"{flag} does not apply to --pose-source sfm (it reads no poses from the bag)")
            if self.scale is not None and self.known_distance is not None:
                raise BagSourceError("give at most one of --scale and --known-distance")
            if self.scale is not None and not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
                raise BagSourceError(f"--scale must be a positive number of metres per map unit, got {self.scale!r}")
            if self.known_distance is not None:
                parse_known_distance(self.known_distance)
            try:
                self.sfm.validate()
            except ValueError as exc:
                raise BagSourceError(str(exc)) from exc
        elif self.scale is not None or self.known_distance is not None:
            raise BagSourceError(
                f"--scale and --known-distance apply only to --pose-source sfm; {self.pose_source} poses are already metric"
            )


def parse_intrinsics(value: str | Sequence[float]) -> tuple[float, float, float, float]:
    """``"fx,fy,cx,cy"`` or a 4-sequence -> 4 floats, checked."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise BagSourceError(f"intrinsics must be four numbers fx,fy,cx,cy, got {value!r}") from None
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers) or numbers[0] <= 0 or numbers[1] <= 0:
        raise BagSourceError(f"intrinsics must be four finite numbers fx,fy,cx,cy with fx, fy > 0, got {value!r}")
    return numbers  # type: ignore[return-value]


def parse_known_distance(value: str | Sequence[Any]) -> tuple[int, int, float]:
    """``"I,J,D"`` or a 3-sequence -> (image I, image J, D metres), checked."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    accepted = ("known distance must be I,J,D: two different image indices (the numbers in the frame names "
                "frame-00000I) and their cameras' distance in metres, e.g. 0,40,2.5")
    if len(parts) != 3:
        raise BagSourceError(f"{accepted}; got {value!r}")
    try:
        a, b = (int(str(p).strip()) for p in parts[:2])
        distance = float(parts[2])
    except (TypeError, ValueError):
        raise BagSourceError(f"{accepted}; got {value!r}") from None
    if a < 0 or b < 0 or a == b or not (math.isfinite(distance) and distance > 0):
        raise BagSourceError(f"{accepted}; got {value!r}")
    return a, b, distance


def pose_to_camera_matrix(value: Any) -> np.ndarray:
    T = np.asarray(value, dtype=np.float64)
    if T.shape == (16,):
        T = T.reshape(4, 4)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise BagSourceError(f"pose_to_camera must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-6 or np.linalg.det(R) < 0 or np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-12:
        raise BagSourceError("pose_to_camera must be a rigid transform (rotation + translation)")
    return T


def is_bag(path: str | Path) -> bool:
    """A ROS 1 ``.bag``, a ROS 2 ``.mcap`` or ``.db3`` file, or a ROS 2 bag folder."""
    path = Path(path)
    if path.is_file():
        return path.suffix in (".bag", ".mcap", ".db3")
    if path.is_dir() and (path / "metadata.yaml").is_file():
        return any(p.suffix in (".db3", ".mcap") for p in path.iterdir())
    return False


# --- reading ----------------------------------------------------------------------------------

def _describe_topics(topics: dict[str, Any]) -> str:
    if not topics:
        return "  (the bag has no topics)"
    return "\n".join(f"  {name}  ({info.msgtype}, {info.msgcount} messages)" for name, info in sorted(topics.items()))


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _pose_of_message(msg: Any, msgtype: str) -> tuple[str, str, np.ndarray]:
    """(frame_id, child frame or "", T_frame_body) of a pose message."""
    if msgtype == "geometry_msgs/msg/PoseStamped":
        return msg.header.frame_id, "", pose_from_msg(msg.pose)
    if msgtype in ("geometry_msgs/msg/PoseWithCovarianceStamped",):
        return msg.header.frame_id, "", pose_from_msg(msg.pose.pose)
    if msgtype == "nav_msgs/msg/Odometry":
        return msg.header.frame_id, msg.child_frame_id, pose_from_msg(msg.pose.pose)
    if msgtype == "geometry_msgs/msg/TransformStamped":
        return msg.header.frame_id, msg.child_frame_id, transform_from_msg(msg.transform)
    raise AssertionError(msgtype)


def _make_camera(info_msg: Any, intrinsics: Any, width: int, height: int, info_topic: str | None,
                 rectified: bool) -> CameraIntrinsics:
    """The camera of the frames: --intrinsics (size from the image) or the first CameraInfo
    (whose size, when a driver left it 0, comes from the image)."""
    if intrinsics is not None:
        fx, fy, cx, cy = parse_intrinsics(intrinsics)
        return CameraIntrinsics(width=width, height=height, fx=fx, fy=fy, cx=cx, cy=cy)
    assert info_msg is not None
    try:
        return camera_from_camera_info(info_msg, rectified=rectified, image_size=(width, height))
    except CameraInfoError as exc:
        raise BagSourceError(f"CameraInfo on {info_topic} is not usable: {exc}; {INTRINSICS_HINT}") from exc


class _Mono16Scaler:
    """One scale for all 16-bit images of a bag (set by the first one), so brightness stays consistent."""

    def __init__(self) -> None:
        self.scale: float | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.scale is None:
            peak = int(image.max()) if image.size else 0
            # 10/12-bit sensors in 16-bit containers: stretch by the container the data uses.
            full = next((2**bits - 1 for bits in (8, 10, 12, 14, 16) if peak <= 2**bits - 1), 65535)
            self.scale = 255.0 / full
        return np.clip(np.rint(image.astype(np.float32) * self.scale), 0, 255).astype(np.uint8)


@dataclass
class _ImageRecord:
    ordinal: int  # position in the image topic's message stream (the key for the second pass)
    stamp_ns: int
    frame_id: str
    width: int | None
    height: int | None


@dataclass
class _BagContents:
    images: list[_ImageRecord] = field(default_factory=list)
    camera_info: Any = None  # the first CameraInfo message (converted once the image size is known)
    camera_info_count: int = 0
    # The whole recording, strict: a second parent or a static/dynamic mix is an error in a bag.
    tf: TransformBuffer = field(default_factory=lambda: TransformBuffer(cache_s=None, strict=True))
    pose_frames: set[str] = field(default_factory=set)
    pose_count: int = 0
    zero_stamp_images: int = 0


def _open_reader(path: Path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    if not path.exists():
        raise BagSourceError(f"bag {path} does not exist")
    # A ROS 2 bag folder is read through its metadata.yaml; a single .mcap/.db3 file directly.
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    except BagSourceError:
        raise
    except Exception as exc:  # rosbags raises several types for damaged files; all mean the same here
        raise BagSourceError(f"cannot open bag {path}: {type(exc).__name__}: {exc} (is it truncated or corrupted?)") from exc
    return reader


def _pick_topic(topics: dict[str, Any], wanted: str | None, types: Sequence[str], what: str, option: str) -> str | None:
    if wanted is not None:
        if wanted not in topics:
            raise BagSourceError(f"{what} topic {wanted!r} is not in the bag. Topics in the bag:\n{_describe_topics(topics)}")
        if topics[wanted].msgtype not in types:
            raise BagSourceError(
                f"{what} topic {wanted!r} has type {topics[wanted].msgtype}, expected one of: {', '.join(types)}. "
                f"Topics in the bag:\n{_describe_topics(topics)}"
            )
        return wanted
    candidates = sorted(name for name, info in topics.items() if info.msgtype in types)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return None
    raise BagSourceError(
        f"the bag has several {what} topics ({', '.join(candidates)}); choose one with {option}. "
        f"Topics in the bag:\n{_describe_topics(topics)}"
    )


def _camera_info_topic(topics: dict[str, Any], image_topic: str, wanted: str | None) -> str | None:
    if wanted is not None:
        return _pick_topic(topics, wanted, (CAMERA_INFO_TYPE,), "CameraInfo", "--camera-info-topic")
    infos = sorted(name for name, info in topics.items() if info.msgtype == CAMERA_INFO_TYPE)
    # image_transport layout: /ns/image_raw[/compressed] beside /ns/camera_info.
    base = re.sub(r"/compressed$", "", image_topic).rsplit("/", 1)[0]
    beside = f"{base}/camera_info"
    if beside in infos:
        return beside
    return infos[0] if len(infos) == 1 else None


def _read_metadata_pass(reader: Any, path: Path, image_topic: str, info_topic: str | None, pose_topic: str | None,
                        tf_topics: list[str], options: BagSourceOptions) -> _BagContents:
    topics = reader.topics
    contents = _BagContents()
    wanted = [image_topic] + ([info_topic] if info_topic else []) + ([pose_topic] if pose_topic else []) + tf_topics
    connections = [c for t in wanted for c in topics[t].connections]
    image_ordinal = 0
    pose_buffer_frames = ("__pose_parent__", "__pose_body__")
    try:
        for connection, bag_ns, raw in reader.messages(connections=connections):
            topic, msgtype = connection.topic, connection.msgtype
            msg = reader.deserialize(raw, msgtype)
            if topic == image_topic:
                stamp = _stamp_ns(msg.header)
                if stamp == 0:  # an unset header stamp: the recording time is the best we have
                    stamp = int(bag_ns)
                    contents.zero_stamp_images += 1
                w = int(msg.width) if msgtype == IMAGE_TYPES[0] else None
                h = int(msg.height) if msgtype == IMAGE_TYPES[0] else None
                contents.images.append(_ImageRecord(image_ordinal, stamp, str(msg.header.frame_id), w, h))
                image_ordinal += 1
            elif topic == info_topic:
                if contents.camera_info is None and options.intrinsics is None:
                    contents.camera_info = msg
                contents.camera_info_count += 1
            elif topic == pose_topic:
                frame_id, _, T = _pose_of_message(msg, msgtype)
                contents.pose_frames.add(str(frame_id))
                contents.tf.set_transform(*pose_buffer_frames, _stamp_ns(msg.header), T)
                contents.pose_count += 1
            else:  # a TF topic
                static = topic.endswith("tf_static")
                for tr in msg.transforms:
                    parent = str(tr.header.frame_id).lstrip("/")  # ROS 1 frames may carry a leading slash
                    child = str(tr.child_frame_id).lstrip("/")
                    contents.tf.set_transform(parent, child, _stamp_ns(tr.header), transform_from_msg(tr.transform), static=static)
    except BagSourceError:
        raise
    except ValueError as exc:
        raise BagSourceError(f"bad message in {path}: {exc}") from exc
    except Exception as exc:
        raise BagSourceError(f"cannot read the messages of {path}: {type(exc).__name__}: {exc} (is it truncated or corrupted?)") from exc
    return contents

def _select(count: int, poses: list[np.ndarray] | None, options: BagSourceOptions) -> list[int]:
    """Indices of the ``count`` candidate images to keep: motion filter first (needs their
    poses), then an even sample."""
    keep = list(range(count))
    if options.min_motion_m is not None or options.min_rotation_deg is not None:
        assert poses is not None, "validate() rejects the motion filter without poses"
        min_m = options.min_motion_m if options.min_motion_m is not None else math.inf
        min_deg = options.min_rotation_deg if options.min_rotation_deg is not None else math.inf
        moved: list[int] = []
        for i in keep:
            if not moved:
                moved.append(i)
                continue
            dt, dr = pose_error(poses[i], poses[moved[-1]])
            if dt >= min_m or dr >= min_deg:
                moved.append(i)
        keep = moved
    if options.fraction is not None or options.every is not None:
        keep = [keep[j] for j in even_indices(len(keep), fraction=options.fraction, every=options.every)]
    return keep


def _pose_inputs(topics: dict[str, Any], options: BagSourceOptions) -> tuple[str | None, list[str]]:
    """(pose topic, TF topics) the pose source reads; neither for sfm."""
    if options.pose_source == "sfm":
        return None, []
    if options.pose_source == "topic":
        pose_topic = _pick_topic(topics, options.pose_topic, POSE_TYPES, "pose", "--pose-topic")
        if pose_topic is None:
            raise BagSourceError(
                f"the bag has no pose topic ({', '.join(POSE_TYPES)}); give one with --pose-topic, use --pose-source tf, "
                f"or --pose-source sfm for poses from the images. Topics in the bag:\n{_describe_topics(topics)}"
            )
        return pose_topic, []
    tf_topics = sorted(name for name, info in topics.items() if info.msgtype == TF_TYPE)
    if not tf_topics:
        raise BagSourceError(
            "--pose-source tf needs /tf and /tf_static (tf2_msgs/TFMessage), which the bag does not have; "
            "use --pose-source topic --pose-topic T if poses are on a topic, or --pose-source sfm for poses from the images. "
            f"Topics in the bag:\n{_describe_topics(topics)}"
        )
    return None, tf_topics


def _order_by_stamp(images: list[_ImageRecord]) -> tuple[list[_ImageRecord], int, int]:
    """(images by header stamp without repeated stamps, how many were out of order, how many repeated)."""
    # Recorders write in arrival order; frames are ordered by capture (header) time.
    stamps = [r.stamp_ns for r in images]
    out_of_order = sum(1 for a, b in zip(stamps[:-1], stamps[1:]) if b < a)
    unique: list[_ImageRecord] = []
    for r in sorted(images, key=lambda r: (r.stamp_ns, r.ordinal)):
        if unique and unique[-1].stamp_ns == r.stamp_ns:
            continue  # a duplicated stamp is the same capture twice
        unique.append(r)
    return unique, out_of_order, len(images) - len(unique)


@dataclass
class _PosedImages:
    posed: list[tuple[_ImageRecord, np.ndarray]]
    skipped: int
    pose_frame: str
    camera_frame: str | None


def _poses_from_bag(contents: _BagContents, unique: list[_ImageRecord], options: BagSourceOptions, path: Path,
                    image_topic: str, pose_topic: str | None) -> _PosedImages:
    """Each image's camera pose from the bag's TF or pose topic, interpolated to its stamp;
    images without pose samples close enough on both sides are skipped."""
    pose_to_cam = pose_to_camera_matrix(options.pose_to_camera) if options.pose_to_camera is not None else np.eye(4)
    tolerance_ns = int(round(options.pose_tolerance_s * 1e9))
    if options.pose_source == "tf":
        camera_frame = (options.camera_frame or unique[0].frame_id).lstrip("/")
        if not camera_frame:
            raise BagSourceError(f"the images on {image_topic} have an empty header.frame_id; give the camera frame with --camera-frame")
        target, source = options.map_frame.lstrip("/"), camera_frame
        pose_frame = target
    else:
        target, source = "__pose_parent__", "__pose_body__"
        if contents.pose_count == 0:
            raise BagSourceError(f"pose topic {pose_topic} has no messages in {path}")
        pose_frame = ",".join(sorted(contents.pose_frames))
        camera_frame = None
    posed: list[tuple[_ImageRecord, np.ndarray]] = []
    gap_examples: list[str] = []
    for r in unique:
        try:
            T = contents.tf.lookup(target, source, r.stamp_ns, tolerance_ns)
        except TransformLookupError as exc:
            if exc.kind != "out_of_range":
                raise BagSourceError(f"cannot compute camera poses from the bag's TF data: {exc}") from exc
            if len(gap_examples) < 3:
                gap_examples.append(str(exc))
            continue
        posed.append((r, T @ pose_to_cam))
    if not posed:
        raise BagSourceError(
            f"none of the {len(unique)} images has a pose within {options.pose_tolerance_s} s "
            f"(pose source {options.pose_source}); e.g. {gap_examples[0] if gap_examples else ''}"
        )
    return _PosedImages(posed, len(unique) - len(posed), pose_frame, camera_frame)


def _decode_selected(reader: Any, path: Path, image_topic: str, info_topic: str | None, contents: _BagContents,
                     options: BagSourceOptions, selected: list[tuple[_ImageRecord, np.ndarray]], images_dir: Path) -> list[Frame]:
    """Second pass over the image topic: decode the selected images, write them as PNG and
    make their frames (in the order of ``selected``)."""
    import cv2

    by_ordinal = {record.ordinal: (record, T) for record, T in selected}
    images_dir.mkdir(parents=True, exist_ok=True)
    mono16 = _Mono16Scaler()
    camera: CameraIntrinsics | None = None
    frames_by_ordinal: dict[int, Frame] = {}
    ordinal = -1
    try:
        for connection, _, raw in reader.messages(connections=reader.topics[image_topic].connections):
            ordinal += 1
            if ordinal not in by_ordinal:
                continue
            record, T_world_cam = by_ordinal[ordinal]
            msg = reader.deserialize(raw, connection.msgtype)
            try:
                if connection.msgtype == IMAGE_TYPES[0]:
                    image = image_msg_to_numpy(msg, backend="numpy")
                else:
                    image = compressed_msg_to_numpy(msg)
            except ImageConversionError as exc:
                raise BagSourceError(f"image {ordinal} on {image_topic} (stamp {record.stamp_ns} ns): {exc}") from exc
            if image.dtype == np.uint16:
                image = mono16(image)
            h, w = image.shape[:2]
            if camera is None:
                camera = _make_camera(contents.camera_info, options.intrinsics, w, h, info_topic, options.rectified)
            if (w, h) != (camera.width, camera.height):
                raise BagSourceError(
                    f"image {ordinal} on {image_topic} is {w}x{h} but the camera is calibrated for "
                    f"{camera.width}x{camera.height}; check --camera-info-topic or {INTRINSICS_HINT}"
                )
            name = frame_name(record.ordinal)
            out_path = images_dir / f"{name}.png"
            tmp_path = images_dir / f"{name}.tmp.png"
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
            if not cv2.imwrite(str(tmp_path), bgr):
                raise BagSourceError(f"cannot write {tmp_path} (disk full or no permission?)")
            os.replace(tmp_path, out_path)
            frames_by_ordinal[ordinal] = Frame(name=name, image_path=out_path, T_world_cam=T_world_cam,
                                               camera=camera, stamp_ns=record.stamp_ns)
    except BagSourceError:
        raise
    except Exception as exc:
        raise BagSourceError(f"cannot read the images of {path}: {type(exc).__name__}: {exc} (is it truncated or corrupted?)") from exc
    if len(frames_by_ordinal) != len(by_ordinal):
        missing = len(by_ordinal) - len(frames_by_ordinal)
        raise BagSourceError(f"{missing} selected images could not be read back from {path} (is it truncated or corrupted?)")
    # Frames in the given order; the camera decided on the first decoded image holds for all.
    frames = [frames_by_ordinal[record.ordinal] for record, _ in selected]
    for f in frames:
        f.camera = camera  # type: ignore[assignment]
    return frames


def frame_name(image_index: int) -> str:
    """The frame name of the image_index-th message (0-based) on the image topic."""
    return f"frame-{image_index:06d}"


@dataclass
class _SfmPoses:
    frames: list[Frame]
    summary: dict[str, Any]
    warnings: list[str]


def _pose_by_sfm(frames: list[Frame], options: BagSourceOptions, work_dir: Path) -> _SfmPoses:
    """Poses of the selected frames by structure-from-motion, scaled as the options say;
    unregistered frames are dropped (and counted)."""
    from offline.sfm import SfmError, known_distance_scale, reconstruct_poses, scale_poses

    index = {f.name: i for i, f in enumerate(frames)}
    known = parse_known_distance(options.known_distance) if options.known_distance is not None else None
    for image in known[:2] if known else ():  # before the SfM run: a wrong index should not cost one
        if frame_name(image) not in index:
            raise BagSourceError(
                f"--known-distance names image {image} ({frame_name(image)}), which is not among the selected frames "
                f"({', '.join(f.name for f in frames[:8])}{', ...' if len(frames) > 8 else ''}); "
                "pick two selected frames or change --every/--fraction"
            )
    try:
        result = reconstruct_poses([f.image_path for f in frames], frames[0].camera, work_dir, options.sfm)
    except SfmError as exc:
        raise BagSourceError(f"--pose-source sfm: {exc}") from exc
    warnings: list[str] = []
    if result.unregistered:
        names = [frames[i].name for i in result.unregistered]
        warnings.append(
            f"{len(names)} of {len(frames)} selected image(s) could not be registered by SfM and were skipped "
            f"(e.g. {', '.join(names[:5])})"
        )
    if known is not None:
        a, b, distance = known
        for image in (a, b):
            if result.poses[index[frame_name(image)]] is None:
                raise BagSourceError(
                    f"--known-distance names image {image} ({frame_name(image)}), which SfM could not register; "
                    "pick another frame"
                )
        try:
            factor = known_distance_scale(result.poses[index[frame_name(a)]], result.poses[index[frame_name(b)]], distance)
        except SfmError as exc:
            raise BagSourceError(f"--known-distance {a},{b},{distance}: {exc}") from exc
        scale = {"kind": "known_distance", "metres_per_unit": factor,
                 "note": f"metric: the camera centres of {frame_name(a)} and {frame_name(b)} are {distance} m apart"}
    elif options.scale is not None:
        factor = float(options.scale)
        scale = {"kind": "given", "metres_per_unit": factor, "note": f"metric if --scale {factor} is right"}
    else:
        factor = 1.0
        scale = {"kind": "arbitrary", "metres_per_unit": None,
                 "note": "ARBITRARY: SfM without --scale or --known-distance; 1 unit = the trajectory's RMS spread, not a metre"}
        warnings.append(
            "the map's scale is arbitrary (structure-from-motion without --scale or --known-distance): distances are in "
            "units of the trajectory's RMS spread, not metres, so metric thresholds and errors downstream mean nothing"
        )
    poses = scale_poses(result.poses, factor)
    kept: list[Frame] = []
    for frame, T in zip(frames, poses):
        if T is not None:
            frame.T_world_cam = T
            frame.camera = result.camera
            kept.append(frame)
    summary = {**result.summary(), "scale": scale,
               "world_frame": f"camera of {kept[0].name} (the first registered frame), OpenCV axes"}
    return _SfmPoses(kept, summary, warnings)


def load_bag(path: str | Path, options: BagSourceOptions, out_dir: str | Path) -> FrameSet:
    """Posed frames from a bag; images written to ``out_dir/images``, the set to ``out_dir/frames.json``
    (pose source sfm: the COLMAP work in ``out_dir/sfm``)."""
    path = Path(path)
    out_dir = Path(out_dir)
    options.validate()
    sfm = options.pose_source == "sfm"
    reader = _open_reader(path)
    try:
        topics = reader.topics
        image_topic = _pick_topic(topics, options.image_topic, IMAGE_TYPES, "image", "--image-topic")
        if image_topic is None:
            raise BagSourceError(f"the bag has no sensor_msgs/Image or CompressedImage topic. Topics in the bag:\n{_describe_topics(topics)}")
        image_type = topics[image_topic].msgtype
        info_topic = None
        if options.intrinsics is None:
            info_topic = _camera_info_topic(topics, image_topic, options.camera_info_topic)
            if info_topic is None:
                raise BagSourceError(
                    f"the bag has no sensor_msgs/CameraInfo topic for {image_topic}; {INTRINSICS_HINT}. "
                    f"Topics in the bag:\n{_describe_topics(topics)}"
                )
        pose_topic, tf_topics = _pose_inputs(topics, options)

        contents = _read_metadata_pass(reader, path, image_topic, info_topic, pose_topic, tf_topics, options)
        if not contents.images:
            raise BagSourceError(f"image topic {image_topic} has no messages in {path}")
        if options.intrinsics is None and contents.camera_info is None:
            raise BagSourceError(f"CameraInfo topic {info_topic} has no messages; {INTRINSICS_HINT}")
        unique, out_of_order, duplicates = _order_by_stamp(contents.images)

        if sfm:  # every image is a candidate; SfM poses the selected ones below
            candidates = _PosedImages([(r, np.full((4, 4), np.nan)) for r in unique], 0, "", None)
        else:
            candidates = _poses_from_bag(contents, unique, options, path, image_topic, pose_topic)
        chosen = _select(len(candidates.posed), None if sfm else [T for _, T in candidates.posed], options)
        if not chosen:
            raise BagSourceError(f"the frame selection is empty: {len(candidates.posed)} candidate images, none kept by the selection options")
        frames = _decode_selected(reader, path, image_topic, info_topic, contents, options,
                                  [candidates.posed[i] for i in chosen], out_dir / "images")
    finally:
        reader.close()

    warnings: list[str] = []
    if out_of_order:
        warnings.append(f"{out_of_order} image(s) were recorded out of stamp order; frames are sorted by header stamp")
    if duplicates:
        warnings.append(f"{duplicates} image(s) repeated an earlier stamp and were dropped")
    if candidates.skipped:
        warnings.append(f"{candidates.skipped} image(s) had no pose within {options.pose_tolerance_s} s and were skipped")
    if contents.zero_stamp_images:
        warnings.append(f"{contents.zero_stamp_images} image(s) had no header stamp; their recording time was used")
    counts = {
        "images": len(contents.images),
        "out_of_order": out_of_order,
        "duplicate_stamps": duplicates,
        "skipped_no_pose": candidates.skipped,
        "posed": len(candidates.posed),
        "selected": len(frames),
    }
    sfm_summary = None
    if sfm:
        selected = len(frames)
        posed_by_sfm = _pose_by_sfm(frames, options, out_dir / "sfm")
        frames, sfm_summary = posed_by_sfm.frames, posed_by_sfm.summary
        warnings.extend(posed_by_sfm.warnings)
        counts.update(posed=len(frames), selected=selected, skipped_unregistered=selected - len(frames))
    hint = rectification_hint(image_topic, options.rectified) if options.intrinsics is None else ""
    if hint:
        warnings.append(hint.replace("rectified:=true", "--rectified").replace("rectified:=false", "no --rectified")
                        .replace("rectified is", "--rectified is"))
    for w in warnings:
        log.warning("%s: %s", path.name, w)
    metadata = {
        "source": "rosbag",
        "path": str(path.resolve()),
        "ros_version": 2 if reader.is2 else 1,
        "image_topic": image_topic,
        "image_type": image_type,
        "camera_info_topic": info_topic,
        "intrinsics": "given (--intrinsics)" if options.intrinsics is not None else
                      f"CameraInfo {info_topic} ({'P, rectified images' if options.rectified else 'K and D, raw images'})",
        "pose_source": options.pose_source,
        "pose_topic": pose_topic,
        "tf_topics": tf_topics,
        "map_frame": "sfm" if sfm else candidates.pose_frame,
        "camera_frame": candidates.camera_frame,
        "pose_tolerance_s": options.pose_tolerance_s,
        "counts": counts,
        "warnings": warnings,
    }
    if sfm_summary is not None:
        metadata["sfm"] = sfm_summary
    frameset = FrameSet(frames, metadata)
    frameset.save(out_dir / "frames.json")
    log.info("%s: %d images, %d posed, %d in the frame set", path.name, len(contents.images), counts["posed"], len(frames))
    return frameset
