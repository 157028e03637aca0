"""The ROS 2 node ``localizer``: images + CameraInfo in, pose + TF + diagnostics out.

    ros2 run d2s_nerf_ros localizer --ros-args -p map_path:=/maps/kitchen
    python -m d2s_nerf_ros.node --ros-args -p map_path:=/maps/kitchen      (pip environment)

Topics (node name ``localizer``; relative names resolve in the node's namespace)
    in   <image_topic>                sensor_msgs/Image (mono8, mono16, rgb8, bgr8, rgba8, bgra8)
    in   <image_topic>/compressed     sensor_msgs/CompressedImage, instead, when use_compressed
    in   <camera_info_topic>          sensor_msgs/CameraInfo (plumb_bob, rational_polynomial, equidistant)
    in   /tf, /tf_static              when odom_frame or base_frame is set, or TF is published without odom
    out  ~/pose                       geometry_msgs/PoseWithCovarianceStamped in map_frame, image stamp
    out  /tf                          map_frame -> odom_frame (REP-105); map_frame -> base_frame | the image's
                                      frame_id only with odom_frame "" and allow_tf_without_odom
    out  /diagnostics                 diagnostic_msgs/DiagnosticArray, once a second
    out  ~/map_points                 sensor_msgs/PointCloud2 of the map's labelled 3D points, once, transient_local
    out  ~/debug_image                sensor_msgs/Image rgb8: each localised frame with its keypoints (green PnP
                                      inlier, red outlier, grey unreliable) and status, with publish_debug_image
    out  /initialpose                 PoseWithCovarianceStamped of base_frame, with publish_initial_pose (AMCL)
    srv  ~/relocalize                 std_srvs/Trigger: localise the next frames until one is accepted or
                                      relocalize_timeout passes; answers success and a message naming why
    srv  ~/change_state, ~/get_state, ...   lifecycle_msgs (a managed node)

Behaviour
- Images use sensor-data QoS (best effort, as camera drivers publish) unless
  ``image_qos: reliable``. With Fast DDS's default transports a raw image larger than the
  shared-memory segment (about 0.5 MB; a raw 640x480 rgb8 image is 900 KiB) rarely arrives:
  export ``FASTDDS_DEFAULT_PROFILES_FILE=<share>/config/fastdds_shm_large.xml`` for the camera
  driver (the publisher's segment decides) and the node; the launch file does it for the node.
  Diagnostics compare the image rate with the CameraInfo rate and WARN, naming this fix, when
  images arrive at less than half the CameraInfo rate.
- Only the newest frame is processed: the image callback parks the message in a one-slot
  mailbox; a worker thread takes it. A frame replaced before the worker took it is counted
  as dropped, so a slow frame never builds a backlog.
- A frame that cannot be used (bad encoding, size mismatch, no or invalid CameraInfo, no
  localisation) publishes no pose, is counted and named in diagnostics, and logs a warning
  at most every 5 s per kind of problem. Nothing a frame contains stops the node.
- Pose: ``base_frame`` (default base_link; camera -> base_frame from TF, the covariance
  carried over to the base), or the camera optical frame (the image's frame_id) when empty.
- TF (REP-105, default odom_frame odom): map -> odom = T_map_cam * inv(T_odom_cam), odom ->
  camera looked up at the image stamp. Sent when a frame is accepted and re-sent by a timer at
  ``tf_publish_rate`` (20 Hz), always stamped send time + ``transform_tolerance`` (1 s: the
  estimate holds until then; it covers the ~0.9 s CPU end-to-end latency), as rtabmap does.
  odom_frame "" publishes no TF unless ``allow_tf_without_odom``: then map -> base_frame (or the
  camera frame), stamped image time + tolerance, refused (log line once, ERROR diagnostic) while
  that frame has another parent on /tf or /tf_static.
- Odometry gate (``pose_gate.OdometryGate``, when odom -> camera is on TF): nothing is published
  before ``min_consistent_frames`` frames agree through odometry; afterwards a pose further than
  ``max_jump_translation_m`` / ``max_jump_rotation_deg`` from the odometry prediction is
  rejected (named in diagnostics); as many frames in a row that agree with each other re-lock.
- Lifecycle (``rclpy.lifecycle``): the map is loaded and the parameters checked in
  ``on_configure``; subscriptions, publishers, timers, the service and the worker thread live
  between ``on_activate`` and ``on_deactivate``; ``on_error`` tears them down and returns to
  'unconfigured' instead of exiting. ``autostart`` (default true) configures and activates at
  start-up; false waits for a lifecycle manager (nav2 ``lifecycle_manager``).
- Modes: ``continuous`` localises every frame (at most ``max_rate_hz``); ``on_demand`` only while
  a ``~/relocalize`` request waits. Each request resets the odometry gate (agreeing frames
  again) and, with ``publish_initial_pose``, the accepted pose also goes to /initialpose once.
- Start-up faults under autostart (missing/corrupted/incompatible map, invalid parameter
  values, device ``cuda`` without a GPU) print one line ``[localizer] error: ...`` on stderr and
  exit with status 1; without autostart the configure transition fails with that message in
  the log and the node stays 'unconfigured'. ``device: auto`` falls back to the CPU.
- Parameters are read once at start-up; changing one at run time is refused (restart instead).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped, TransformStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from d2s_nerf_ros.camera import CameraInfoError, CameraIntrinsics, camera_from_camera_info, rectification_hint
from d2s_nerf_ros.errors import FrameRejected
from d2s_nerf_ros.pose_gate import OdometryGate
from d2s_nerf_ros.image_conversion import (
    ImageConversionError,
    UnsupportedEncoding,
    compressed_msg_to_numpy,
    converter_backend,
    image_msg_to_numpy,
    numpy_to_image_fields,
    to_uint8,
)
from d2s_nerf_ros.tf_math import (
    TransformBuffer,
    TransformLookupError,
    checked_pose_covariance,
    covariance_of_offset_pose,
    covariance_to_msg_list,
    map_to_odom,
    ns_to_stamp_fields,
    pose_to_msg_fields,
    stamp_to_ns,
    transform_from_msg,
    transform_to_msg_fields,
)

NODE_NAME = "localizer"
DIAGNOSTIC_NAME = "localizer: visual localization"
WARN_EVERY_S = 5.0          # one warning per kind of frame problem at most this often
STATS_WINDOW_S = 10.0       # rates and latency percentiles in diagnostics cover this window
IMAGE_TIMEOUT_S = 5.0       # diagnostics WARN when no image arrived for this long
ERROR_AFTER_FAILURES = 10   # diagnostics ERROR after this many failed frames in a row
CAMERA_INFO_WAIT_S = 0.2    # how long an image waits for the first CameraInfo
# Diagnostics WARN (frames lost in transport) when images arrive at less than this share of the
# CameraInfo rate: a driver sends one CameraInfo per image, and the small CameraInfo still
# arrives when a large raw image does not fit the DDS transport.
IMAGE_LOSS_RATIO = 0.5
MIN_CAMERA_INFO_FOR_LOSS = 3  # CameraInfo messages in the window before frame loss is judged
FASTDDS_PROFILE_HINT = ("export FASTDDS_DEFAULT_PROFILES_FILE=<d2s_nerf_ros share>/config/fastdds_shm_large.xml "
                        "for the camera driver too (its shared-memory segment holds raw frames), "
                        "or use compressed images")


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    description: str


PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("map_path", "", "Map bundle directory (manifest.json + d2s.safetensors) written by `d2s-nerf build`. Required."),
    ParameterSpec("image_topic", "/camera/image_raw", "sensor_msgs/Image topic of the camera (raw or rectified: see rectified)."),
    ParameterSpec("rectified", False, "The images are already rectified (e.g. image_proc's image_rect): use CameraInfo P (fx, fy, cx, cy) "
                  "and ignore D. false: the images are raw; K and D (plumb_bob, rational_polynomial, equidistant) describe them. "
                  "The topic name only produces a warning hint, never decides."),
    ParameterSpec("camera_info_topic", "/camera/camera_info", "sensor_msgs/CameraInfo topic matching the images."),
    ParameterSpec("use_compressed", False, "Subscribe sensor_msgs/CompressedImage on <image_topic>/compressed instead of raw images."),
    ParameterSpec("image_qos", "sensor_data", "QoS of the image subscription: sensor_data (best effort, accepts any publisher, "
                  "as camera drivers publish) or reliable (needs a reliable publisher). Raw frames over ~0.5 MB need the Fast DDS "
                  "profile config/fastdds_shm_large.xml exported (FASTDDS_DEFAULT_PROFILES_FILE) for the camera driver and the node."),
    ParameterSpec("device", "auto", "auto | cuda | cpu. auto takes CUDA when present, else the CPU; cuda without a GPU is a start-up error."),
    ParameterSpec("extractor_backend", "auto", "auto | torch | onnxruntime: how the feature network runs (the map fixes which network). "
                  "auto: onnxruntime on the CPU where the extractor has an ONNX path (ALIKED; exported once into ~/.cache/d2s_nerf_ros), "
                  "else torch; onnxruntime requested but not installed is a start-up error."),
    ParameterSpec("num_threads", 0, "CPU threads for torch and onnxruntime (intra- and inter-op); 0: the libraries' defaults "
                  "(every core). Leave cores to the rest of the robot."),
    ParameterSpec("max_keypoints", 1024, "Keypoints extracted per image (>= 4)."),
    ParameterSpec("reliability_threshold", 0.5, "Keypoints whose D2S reliability is below this are not used for PnP, in [0, 1]."),
    ParameterSpec("ransac_threshold_px", 12.0, "PnP-RANSAC inlier threshold in pixels at 640x480; scaled with the image diagonal (> 0)."),
    ParameterSpec("ransac_iterations", 10000, "Maximum PnP-RANSAC iterations (> 0)."),
    ParameterSpec("min_inliers", 15, "A pose needs at least this many PnP inliers (>= 4)."),
    ParameterSpec("min_inlier_ratio", 0.07, "A pose needs at least this share of the PnP correspondences as inliers, in [0, 1] "
                  "(frames of another scene gave 0.03-0.04, held-out RedKitchen frames 0.11-0.41; docs/BENCHMARKS.md, wrong-scene)."),
    ParameterSpec("max_reprojection_rmse_px", 9.0, "A pose needs an inlier reprojection RMSE of at most this many pixels at 640x480, "
                  "scaled with the image diagonal (> 0); a sanity bound (true and wrong frames both give ~7 px at the 12 px threshold)."),
    ParameterSpec("max_distance_to_mapping_m", 1.0, "A pose needs a mapping camera within this many metres whose optical axis is "
                  "within max_angle_to_mapping_deg of its own: D2S only knows views like its training views (>= 0; 0: off). "
                  "Held-out RedKitchen poses were 0.03-0.17 m from one, wrong-scene poses 1.15-14 m or none looking that way (docs/BENCHMARKS.md, wrong-scene)."),
    ParameterSpec("max_angle_to_mapping_deg", 45.0, "The viewing-direction tolerance of max_distance_to_mapping_m, degrees (0, 180]."),
    ParameterSpec("map_frame", "map", "Frame of the map (REP-105); the pose and TF are expressed in it."),
    ParameterSpec("odom_frame", "odom", "Odometry frame (REP-105): the node publishes map -> odom = T_map_cam * inv(T_odom_cam), "
                  "odom -> camera looked up on TF at the image stamp. Empty: no odometry; no TF unless allow_tf_without_odom."),
    ParameterSpec("base_frame", "base_link", "Robot base frame: ~/pose is of this frame (camera -> base from TF). "
                  "Empty: ~/pose is the camera's (the image frame_id)."),
    ParameterSpec("publish_tf", True, "Publish the localisation on /tf (map -> odom_frame)."),
    ParameterSpec("allow_tf_without_odom", False, "With odom_frame empty: publish map -> base_frame (or the camera frame) instead. "
                  "Refused (ERROR diagnostic) while that frame has another parent on /tf or /tf_static: a frame has one parent."),
    ParameterSpec("tf_publish_rate", 20.0, "Hz at which the last map -> odom is re-sent, stamped now + transform_tolerance, "
                  "so TF users never wait for the next frame (0: only when a frame is accepted)."),
    ParameterSpec("transform_tolerance", 1.0, "Seconds added to the stamp of published TF: map -> odom is stamped send time + this "
                  "(it is valid until then); the CPU end-to-end latency is ~0.9 s, so consumers looking up at a sensor's stamp "
                  "never extrapolate (>= 0). map -> base/camera (allow_tf_without_odom) is stamped image time + this."),
    ParameterSpec("transform_timeout", 0.1, "Seconds to wait for odom/base -> camera transforms at the image stamp (>= 0)."),
    ParameterSpec("mode", "continuous", "continuous: localise every frame (at most max_rate_hz). on_demand: localise only while "
                  "a ~/relocalize request (std_srvs/Trigger) waits for an accepted pose."),
    ParameterSpec("max_rate_hz", 0.0, "Localise at most this many frames per second; newer frames replace waiting ones (0: no limit)."),
    ParameterSpec("relocalize_timeout", 10.0, "Seconds a ~/relocalize request waits for an accepted pose before it answers failure (> 0)."),
    ParameterSpec("publish_initial_pose", False, "Send the first accepted pose after start-up and after each ~/relocalize on "
                  "/initialpose (PoseWithCovarianceStamped of base_frame, which must be set), to seed AMCL."),
    ParameterSpec("pose_durability", "volatile", "Durability of ~/pose: volatile, or transient_local (a late subscriber gets the last pose)."),
    ParameterSpec("publish_map_points", True, "Publish the map's 3D points (map_points.safetensors of the bundle) once on ~/map_points "
                  "(sensor_msgs/PointCloud2 in map_frame, transient_local) for RViz."),
    ParameterSpec("publish_debug_image", False, "Publish every frame the localizer processed on ~/debug_image (sensor_msgs/Image rgb8, "
                  "the image's header) with its keypoints drawn (green: PnP inlier, red: outlier, grey: below the reliability "
                  "threshold) and a status line (inliers, ratio, RMSE, or why not). Costs a few ms and a raw image per frame."),
    ParameterSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed). false: wait in "
                  "'unconfigured' for lifecycle transitions (nav2 lifecycle_manager)."),
    ParameterSpec("max_jump_translation_m", 0.5, "With odometry: a pose further than this from the one odometry predicts "
                  "(last map -> odom and odom -> camera at the image stamp) is rejected (> 0)."),
    ParameterSpec("max_jump_rotation_deg", 10.0, "With odometry: the same limit for the rotation, degrees (> 0)."),
    ParameterSpec("min_consistent_frames", 2, "With odometry: agreeing frames in a row needed before the first pose is published, "
                  "and to re-lock after frames keep disagreeing with the last estimate (1: no gate)."),
)
PARAMETER_DEFAULTS = {p.name: p.default for p in PARAMETERS}
IMAGE_QOS_CHOICES = ("sensor_data", "reliable")
MODES = ("continuous", "on_demand")


@dataclass(frozen=True)
class NodeSettings:
    map_path: str
    image_topic: str
    camera_info_topic: str
    rectified: bool
    use_compressed: bool
    image_qos: str
    device: str
    extractor_backend: str
    num_threads: int
    max_keypoints: int
    reliability_threshold: float
    ransac_threshold_px: float
    ransac_iterations: int
    min_inliers: int
    min_inlier_ratio: float
    max_reprojection_rmse_px: float
    max_distance_to_mapping_m: float
    max_angle_to_mapping_deg: float
    map_frame: str
    odom_frame: str
    base_frame: str
    publish_tf: bool
    allow_tf_without_odom: bool
    tf_publish_rate: float
    transform_tolerance: float
    transform_timeout: float
    max_jump_translation_m: float
    max_jump_rotation_deg: float
    min_consistent_frames: int
    mode: str
    max_rate_hz: float
    relocalize_timeout: float
    publish_initial_pose: bool
    pose_durability: str
    publish_map_points: bool
    publish_debug_image: bool
    autostart: bool


def settings_from_values(values: dict[str, Any]) -> NodeSettings:
    """Check every parameter value; raise ``ValueError`` naming the first bad one."""
    unknown = sorted(set(values) - set(PARAMETER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}")
    v = dict(PARAMETER_DEFAULTS, **values)

    def text(name: str) -> str:
        if not isinstance(v[name], str):
            raise ValueError(f"parameter {name} must be a string, got {v[name]!r}")
        return v[name].strip()

    def flag(name: str) -> bool:
        if not isinstance(v[name], bool):
            raise ValueError(f"parameter {name} must be true or false, got {v[name]!r}")
        return v[name]

    def integer(name: str, minimum: int) -> int:
        if isinstance(v[name], bool) or not isinstance(v[name], int) or v[name] < minimum:
            raise ValueError(f"parameter {name} must be an integer >= {minimum}, got {v[name]!r}")
        return int(v[name])

    def number(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> float:
        x = v[name]
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        ok = ok and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
        if not ok:
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or math.isinf(high) else ']'}"
            raise ValueError(f"parameter {name} must be a number in {bounds}, got {x!r}")
        return float(x)

    map_path = text("map_path")
    if not map_path:
        raise ValueError("parameter map_path is required (the map bundle directory), e.g. --ros-args -p map_path:=/path/to/map")
    topics = {name: text(name) for name in ("image_topic", "camera_info_topic")}
    for name, topic in topics.items():
        if not topic:
            raise ValueError(f"parameter {name} must not be empty")
    image_qos = text("image_qos").lower()
    if image_qos not in IMAGE_QOS_CHOICES:
        raise ValueError(f"parameter image_qos must be sensor_data or reliable, got {v['image_qos']!r}")
    device = text("device").lower()
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"parameter device must be auto, cuda or cpu, got {v['device']!r}")
    extractor_backend = text("extractor_backend").lower()
    if extractor_backend not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"parameter extractor_backend must be auto, torch or onnxruntime, got {v['extractor_backend']!r}")
    frames = {name: text(name).lstrip("/") for name in ("map_frame", "odom_frame", "base_frame")}
    if not frames["map_frame"]:
        raise ValueError("parameter map_frame must not be empty")
    if frames["odom_frame"] and frames["odom_frame"] == frames["map_frame"]:
        raise ValueError(f"parameter odom_frame must differ from map_frame, both are {frames['map_frame']!r}")
    if frames["base_frame"] and frames["base_frame"] in (frames["map_frame"], frames["odom_frame"]):
        raise ValueError(f"parameter base_frame {frames['base_frame']!r} must differ from map_frame and odom_frame")
    mode = text("mode").lower()
    if mode not in MODES:
        raise ValueError(f"parameter mode must be continuous or on_demand, got {v['mode']!r}")
    pose_durability = text("pose_durability").lower()
    if pose_durability not in ("volatile", "transient_local"):
        raise ValueError(f"parameter pose_durability must be volatile or transient_local, got {v['pose_durability']!r}")
    publish_initial_pose = flag("publish_initial_pose")
    if publish_initial_pose and not frames["base_frame"]:
        raise ValueError("parameter publish_initial_pose needs base_frame (AMCL's /initialpose is the robot base's pose)")
    return NodeSettings(
        map_path=map_path,
        image_topic=topics["image_topic"],
        camera_info_topic=topics["camera_info_topic"],
        rectified=flag("rectified"),
        use_compressed=flag("use_compressed"),
        image_qos=image_qos,
        device=device,
        extractor_backend=extractor_backend,
        num_threads=integer("num_threads", 0),
        max_keypoints=integer("max_keypoints", 4),
        reliability_threshold=number("reliability_threshold", 0.0, 1.0),
        ransac_threshold_px=number("ransac_threshold_px", 0.0, low_open=True),
        ransac_iterations=integer("ransac_iterations", 1),
        min_inliers=integer("min_inliers", 4),
        min_inlier_ratio=number("min_inlier_ratio", 0.0, 1.0),
        max_reprojection_rmse_px=number("max_reprojection_rmse_px", 0.0, low_open=True),
        max_distance_to_mapping_m=number("max_distance_to_mapping_m", 0.0),
        max_angle_to_mapping_deg=number("max_angle_to_mapping_deg", 0.0, 180.0, low_open=True),
        map_frame=frames["map_frame"],
        odom_frame=frames["odom_frame"],
        base_frame=frames["base_frame"],
        publish_tf=flag("publish_tf"),
        allow_tf_without_odom=flag("allow_tf_without_odom"),
        tf_publish_rate=number("tf_publish_rate", 0.0, 1000.0),
        transform_tolerance=number("transform_tolerance", 0.0),
        transform_timeout=number("transform_timeout", 0.0),
        max_jump_translation_m=number("max_jump_translation_m", 0.0, low_open=True),
        max_jump_rotation_deg=number("max_jump_rotation_deg", 0.0, 180.0, low_open=True),
        min_consistent_frames=integer("min_consistent_frames", 1),
        mode=mode,
        max_rate_hz=number("max_rate_hz", 0.0),
        relocalize_timeout=number("relocalize_timeout", 0.0, low_open=True),
        publish_initial_pose=publish_initial_pose,
        pose_durability=pose_durability,
        publish_map_points=flag("publish_map_points"),
        publish_debug_image=flag("publish_debug_image"),
        autostart=flag("autostart"),
    )


# --------------------------------------------------------------------------- newest-frame mailbox

class LatestSlot:
    """A one-item mailbox: ``put`` replaces what the consumer has not taken yet."""

    def __init__(self) -> None:
        self._item: Any = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, item: Any) -> bool:
        """Store ``item``; True when it replaced an item nobody took (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float) -> Any:
        """The newest item (and empty the slot), or None after ``timeout`` s or when closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class _PendingFrame:
    msg: Any
    compressed: bool
    received_ns: int  # monotonic


@dataclass
class _Stats:
    received: int = 0
    processed: int = 0
    localized: int = 0
    failed: int = 0
    dropped: int = 0
    idle: int = 0          # frames not localised because mode is on_demand and no request waits
    consecutive_failures: int = 0
    last_received_mono: float | None = None
    # monotonic arrival times of images and CameraInfo messages (the rate window)
    image_arrivals: deque = field(default_factory=deque)
    camera_info_arrivals: deque = field(default_factory=deque)
    last_frame_stamp_ns: int | None = None
    last_frame_result: str = ""
    last_failure_reason: str = ""
    last_inliers: int = 0
    last_keypoints: int = 0
    last_reliable: int = 0
    tf_problem: str = ""
    tf_refused: str = ""   # an opt-in map -> child TF refused because child has another parent
    # (monotonic time, success, end-to-end latency ms, processing ms)
    window: deque = field(default_factory=deque)


# --------------------------------------------------------------------------- TF lookups

class _TfLookup:
    """odom/base -> camera transforms: tf2_ros when installed, else the small ``TransformBuffer``."""

    def __init__(self, node: Node) -> None:
        self.backend = "internal"
        try:
            import tf2_ros  # type: ignore[import-not-found]

            self._tf2_buffer = tf2_ros.Buffer()
            self._tf2_listener = tf2_ros.TransformListener(self._tf2_buffer, node, spin_thread=False)
            self.backend = "tf2_ros"
            return
        except ImportError:
            pass
        self._buffer = TransformBuffer(cache_s=10.0)
        dynamic_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        static_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._subs = [
            node.create_subscription(TFMessage, "/tf", lambda m: self._on_tf(m, False), dynamic_qos),
            node.create_subscription(TFMessage, "/tf_static", lambda m: self._on_tf(m, True), static_qos),
        ]
        self._logger = node.get_logger()

    def entities(self) -> list[Any]:
        """The subscriptions this lookup created (none with tf2_ros, whose listener owns its own)."""
        return list(getattr(self, "_subs", []))

    def _on_tf(self, msg: TFMessage, static: bool) -> None:
        for t in msg.transforms:
            try:
                self._buffer.set_transform(t.header.frame_id, t.child_frame_id, stamp_to_ns(t.header.stamp),
                                           transform_from_msg(t.transform), static=static)
            except ValueError as exc:  # a malformed transform from someone else must not stop us
                self._logger.warning(f"ignoring transform {t.header.frame_id} -> {t.child_frame_id}: {exc}",
                                     throttle_duration_sec=WARN_EVERY_S)

    def lookup(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
        """T_target_source at ``stamp_ns``; waits up to ``timeout_s`` for data to arrive."""
        if self.backend == "tf2_ros":
            from rclpy.duration import Duration
            from rclpy.time import Time

            try:
                t = self._tf2_buffer.lookup_transform(target, source, Time(nanoseconds=stamp_ns),
                                                      timeout=Duration(nanoseconds=int(timeout_s * 1e9)))
            except Exception as exc:  # tf2 raises several exception types; all mean "not available"
                raise TransformLookupError(str(exc)) from exc
            return transform_from_msg(t.transform)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._buffer.lookup(target, source, stamp_ns)
            except TransformLookupError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)


# --------------------------------------------------------------------------- RViz

def point_cloud_msg(points: np.ndarray, frame_id: str, stamp: Any) -> PointCloud2:
    """An (N, 3) float32 array as an unorganised ``sensor_msgs/PointCloud2`` with fields x, y, z."""
    xyz = np.ascontiguousarray(points, dtype=np.float32).reshape(-1, 3)
    msg = PointCloud2()
    msg.header.frame_id, msg.header.stamp = frame_id, stamp
    msg.height, msg.width = 1, len(xyz)
    msg.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyz")]
    msg.is_bigendian, msg.point_step, msg.row_step, msg.is_dense = sys.byteorder == "big", 12, 12 * len(xyz), True
    msg.data = xyz.tobytes()
    return msg


# --------------------------------------------------------------------------- the node

class StartupError(Exception):
    """The node cannot start; the message is printed as one line."""


class LocalizerNode(LifecycleNode):
    """Lifecycle: parameters declared at construction (a wrong type is a ``StartupError``); map loaded
    and parameters checked in ``on_configure``; topics, timers, the service and the worker thread live
    between ``on_activate`` and ``on_deactivate``; ``on_error`` tears them down and returns to
    'unconfigured' instead of exiting the process."""

    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.settings: NodeSettings | None = None
        self.configure_error = ""
        self._io: list[Any] = []                    # what on_activate created, destroyed on deactivate
        self._initial_pose_due = False
        self._relocalize_lock = threading.Lock()
        self._relocalize_request: threading.Event | None = None   # set by the worker when a pose is accepted
        self._relocalize_result = ""
        self._last_taken_mono = -math.inf
        self._map_points: np.ndarray | None = None
        self._debug_image_pub: Any = None
        self._localizer = None
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._slot = LatestSlot()
        self._camera_info: CameraInfo | None = None
        self._camera_cache: tuple[Any, CameraIntrinsics | FrameRejected] | None = None
        self._last_warned: dict[str, float] = {}
        self._last_map_odom: np.ndarray | None = None
        self._gate: OdometryGate | None = None
        self._foreign_parents: dict[str, str] = {}  # child -> parent, from others' /tf and /tf_static
        self._tf: _TfLookup | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._first_camera_info = threading.Event()
        self.device_name = ""
        self._declared = self._declare_parameters()
        self.add_on_set_parameters_callback(self._refuse_parameter_changes)

    @property
    def autostart(self) -> bool:
        value = self.get_parameter("autostart").value
        return value if isinstance(value, bool) else True

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.start()
        except StartupError as exc:
            self.configure_error = str(exc)
            self._localizer = None
            if not self.autostart:  # under autostart main() prints it as the one line
                self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception as exc:  # the transition goes to on_error, which cleans up
            self.get_logger().error(f"activation failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.ERROR
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._localizer, self.settings, self._gate, self._map_points = None, None, None, None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in state {state.label}: topics and worker stopped, back to unconfigured")
        self._deactivate()
        self._localizer, self.settings, self._gate = None, None, None
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Configure: check the parameters, resolve the device, load the map. Raises StartupError."""
        self.settings = self._read_parameters()
        s = self.settings
        try:
            from d2s_nerf_ros.device import resolve_device

            self.device_name = str(resolve_device(s.device))
        except (RuntimeError, ValueError) as exc:
            raise StartupError(f"{exc} (use device:=auto to fall back to the CPU)") from exc
        self._localizer = self._load_localizer(s)
        if s.odom_frame:
            self._gate = OdometryGate(s.max_jump_translation_m, s.max_jump_rotation_deg, s.min_consistent_frames)
        self._map_points = None
        if s.publish_map_points:
            from d2s_nerf_ros.map_bundle import MapBundleError, load_map_points_xyz

            try:
                self._map_points = load_map_points_xyz(s.map_path)
            except MapBundleError as exc:
                self.get_logger().warning(f"~/map_points not published: {exc}")

    def _activate(self) -> None:
        """Topics, timers, the ~/relocalize service and the worker thread."""
        s = self.settings
        io = self._io
        self._stop = threading.Event()
        self._slot = LatestSlot()
        self._initial_pose_due = s.publish_initial_pose
        self._tf = _TfLookup(self) if (s.odom_frame or s.base_frame) else None
        if self._tf is not None:
            io.extend(self._tf.entities())
        if s.publish_tf and not s.odom_frame and s.allow_tf_without_odom:
            # A frame has one parent: watch who else publishes, and refuse map -> child if someone parents it.
            tf_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
            static_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                                    durability=DurabilityPolicy.TRANSIENT_LOCAL)
            io.append(self.create_subscription(TFMessage, "/tf", self._watch_parents, tf_qos))
            io.append(self.create_subscription(TFMessage, "/tf_static", self._watch_parents, static_qos))
        pose_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=(
            DurabilityPolicy.TRANSIENT_LOCAL if s.pose_durability == "transient_local" else DurabilityPolicy.VOLATILE))
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", pose_qos)
        self._tf_pub = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        io += [self._pose_pub, self._tf_pub, self._diag_pub]
        self._initial_pose_pub = None
        if s.publish_initial_pose:
            self._initial_pose_pub = self.create_publisher(PoseWithCovarianceStamped, "/initialpose", 10)
            io.append(self._initial_pose_pub)
        self._debug_image_pub = None
        if s.publish_debug_image:
            self._debug_image_pub = self.create_publisher(Image, "~/debug_image", QoSProfile(
                depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST))
            io.append(self._debug_image_pub)
        if self._map_points is not None:
            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            points_pub = self.create_publisher(PointCloud2, "~/map_points", latched)
            io.append(points_pub)
            points_pub.publish(point_cloud_msg(self._map_points, s.map_frame, self.get_clock().now().to_msg()))
        image_qos = qos_profile_sensor_data if s.image_qos == "sensor_data" else QoSProfile(
            depth=qos_profile_sensor_data.depth, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        if s.use_compressed:
            self._image_topic = s.image_topic.rstrip("/") + "/compressed"
            io.append(self.create_subscription(CompressedImage, self._image_topic, lambda m: self._on_image(m, True), image_qos))
        else:
            self._image_topic = s.image_topic
            io.append(self.create_subscription(Image, self._image_topic, lambda m: self._on_image(m, False), image_qos))
        io.append(self.create_subscription(CameraInfo, s.camera_info_topic, self._on_camera_info, qos_profile_sensor_data))
        io.append(self.create_timer(1.0, self._publish_diagnostics))
        if s.publish_tf and s.odom_frame and s.tf_publish_rate > 0:
            io.append(self.create_timer(1.0 / s.tf_publish_rate, self._republish_map_odom))
        # Its own callback group: the request blocks until a pose is accepted while images keep arriving.
        io.append(self.create_service(Trigger, "~/relocalize", self._on_relocalize,
                                      callback_group=MutuallyExclusiveCallbackGroup()))

        hint = rectification_hint(self._image_topic, s.rectified)
        if hint:
            self.get_logger().warning(hint)
        self._worker = threading.Thread(target=self._work, name="localizer-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: map {s.map_path} on {self.device_name}; images {self._image_topic} "
            f"({converter_backend()} converter), camera info {s.camera_info_topic}; "
            f"pose {self.resolve_topic_name('~/pose')} in {s.map_frame}"
            + (f"; TF {s.map_frame} -> {s.odom_frame} at {s.tf_publish_rate:g} Hz" if s.publish_tf and s.odom_frame else "")
            + (f"; TF {s.map_frame} -> {s.base_frame or '<image frame_id>'} (allow_tf_without_odom)"
               if s.publish_tf and not s.odom_frame and s.allow_tf_without_odom else "")
            + ("; no TF (odom_frame empty; allow_tf_without_odom:=true publishes map -> base)"
               if s.publish_tf and not s.odom_frame and not s.allow_tf_without_odom else "")
            + (f"; TF lookups via {self._tf.backend}" if self._tf else "")
            + f"; mode {s.mode}")

    def _deactivate(self) -> None:
        """Stop the worker and destroy what ``_activate`` created (safe to call in any state)."""
        self._stop.set()
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None
        for entity in self._io:
            destroy = {"Subscription": self.destroy_subscription, "Publisher": self.destroy_publisher,
                       "Timer": self.destroy_timer, "Service": self.destroy_service}.get(type(entity).__name__)
            if destroy is not None:
                destroy(entity)
        self._io = []
        self._tf = None

    def _declare_parameters(self) -> dict[str, Any]:
        from rclpy.exceptions import ParameterException

        values: dict[str, Any] = {}
        for spec in PARAMETERS:
            # Doubles accept integers too (a YAML "transform_tolerance: 1" is not an error).
            descriptor = ParameterDescriptor(description=spec.description, dynamic_typing=isinstance(spec.default, float))
            try:
                values[spec.name] = self.declare_parameter(spec.name, spec.default, descriptor).value
            except ParameterException as exc:
                detail = exc.args[0] if exc.args else str(exc)  # str(exc) appends the name again
                raise StartupError(f"parameter {spec.name}: {detail}") from exc
        return values

    def _read_parameters(self) -> NodeSettings:
        try:
            return settings_from_values(self._declared)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc

    @staticmethod
    def _load_localizer(s: NodeSettings):
        from pathlib import Path

        from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
        from d2s_nerf_ros.map_bundle import MapBundleError

        if not Path(s.map_path).exists():
            raise StartupError(f"map {s.map_path} does not exist (parameter map_path)")
        config = LocalizerConfig(
            max_keypoints=s.max_keypoints, reliability_threshold=s.reliability_threshold,
            ransac_threshold_px=s.ransac_threshold_px, ransac_iterations=s.ransac_iterations,
            min_inliers=s.min_inliers, min_inlier_ratio=s.min_inlier_ratio,
            max_reprojection_rmse_px=s.max_reprojection_rmse_px, max_distance_to_mapping_m=s.max_distance_to_mapping_m,
            max_angle_to_mapping_deg=s.max_angle_to_mapping_deg, device=s.device,
            extractor_backend=s.extractor_backend, num_threads=s.num_threads)
        try:
            localizer = Localizer.from_path(s.map_path, config)
        except MapBundleError as exc:
            raise StartupError(f"cannot use map {s.map_path}: {exc}") from exc
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise StartupError(f"cannot load map {s.map_path}: {type(exc).__name__}: {exc}") from exc
        warmup = getattr(localizer, "warmup", None)
        if callable(warmup):
            try:
                warmup()
            except Exception as exc:  # a failing warm-up means the first real frame would fail too
                raise StartupError(f"map {s.map_path} loaded but the localizer failed its warm-up: {type(exc).__name__}: {exc}") from exc
        return localizer

    def _refuse_parameter_changes(self, params: list) -> SetParametersResult:
        names = ", ".join(p.name for p in params)
        return SetParametersResult(successful=False, reason=f"parameters are read at start-up; restart the node to change {names}")

    def stop(self) -> None:
        self._deactivate()

    # ------------------------------------------------------------------ ~/relocalize (its own callback group)
    def _on_relocalize(self, request: Any, response: Any) -> Any:
        s = self.settings
        done = threading.Event()
        with self._relocalize_lock:
            if self._relocalize_request is not None:
                response.success, response.message = False, "a relocalize request is already running"
                return response
            self._relocalize_request, self._relocalize_result = done, ""
            if self._gate is not None:
                self._gate.reset()  # agreeing frames again, against fresh odometry
            self._initial_pose_due = s.publish_initial_pose
        accepted = done.wait(s.relocalize_timeout)
        with self._relocalize_lock:
            self._relocalize_request = None
            result = self._relocalize_result
        with self._stats_lock:
            last_failure = self._stats.last_failure_reason
        response.success = accepted
        response.message = result if accepted else (
            f"no pose accepted in {s.relocalize_timeout:g} s: " + (last_failure or "no frame arrived"))
        return response

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_image(self, msg: Any, compressed: bool) -> None:
        now = time.monotonic()
        s = self.settings
        idle = s.mode == "on_demand" and self._relocalize_request is None
        too_soon = s.max_rate_hz > 0 and now - self._last_taken_mono < 1.0 / s.max_rate_hz
        replaced = False
        if not (idle or too_soon):
            self._last_taken_mono = now
            replaced = self._slot.put(_PendingFrame(msg, compressed, time.monotonic_ns()))
        with self._stats_lock:
            self._stats.received += 1
            self._stats.last_received_mono = now
            self._stats.image_arrivals.append(now)
            if replaced or too_soon:
                self._stats.dropped += 1
            if idle:
                self._stats.idle += 1

    def _on_camera_info(self, msg: CameraInfo) -> None:
        with self._stats_lock:
            self._stats.camera_info_arrivals.append(time.monotonic())
        self._camera_info = msg  # checked per frame, so a bad one is reported on the frames it ruins
        self._first_camera_info.set()

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while not self._stop.is_set():
            pending = self._slot.take(timeout=0.2)
            if pending is None:
                continue
            try:
                self._process(pending)
            except FrameRejected as exc:
                self._record_failure(pending, str(exc), warn_key=str(exc).split(":")[0])
            except Exception as exc:  # never let one frame take the node down
                reason = f"internal error: {type(exc).__name__}: {exc}"
                self._record_failure(pending, reason, warn_key=f"internal:{type(exc).__name__}")

    def _camera(self) -> CameraIntrinsics:
        info = self._camera_info
        if info is None:
            # A driver sends CameraInfo and image together; the very first image may win the race.
            self._first_camera_info.wait(CAMERA_INFO_WAIT_S)
            info = self._camera_info
        if info is None:
            raise FrameRejected(f"no CameraInfo received on {self.settings.camera_info_topic} yet")
        if self._camera_cache is None or self._camera_cache[0] is not info:
            try:
                result: CameraIntrinsics | FrameRejected = camera_from_camera_info(info, rectified=self.settings.rectified)
            except CameraInfoError as exc:
                result = FrameRejected(str(exc))
            self._camera_cache = (info, result)
        result = self._camera_cache[1]
        if isinstance(result, FrameRejected):
            raise result
        return result

    def _image(self, pending: _PendingFrame) -> np.ndarray:
        try:
            if pending.compressed:
                image = compressed_msg_to_numpy(pending.msg)
            else:
                image = image_msg_to_numpy(pending.msg)
        except UnsupportedEncoding as exc:
            raise FrameRejected(f"unsupported image: {exc}") from exc
        except ImageConversionError as exc:
            raise FrameRejected(f"bad image: {exc}") from exc
        return to_uint8(image)

    def _process(self, pending: _PendingFrame) -> None:
        s = self.settings
        header = pending.msg.header
        stamp_ns = stamp_to_ns(header.stamp)
        camera = self._camera()
        image = self._image(pending)
        height, width = image.shape[:2]
        if (width, height) != (camera.width, camera.height):
            raise FrameRejected(f"image size mismatch: image is {width}x{height} but CameraInfo says {camera.width}x{camera.height}")
        result = self._localizer.localize(image, camera)
        if self._debug_image_pub is not None:
            self._publish_debug_image(image, result, header)
        if not result.success:
            with self._stats_lock:
                self._stats.last_inliers, self._stats.last_keypoints = result.n_inliers, result.n_keypoints
                self._stats.last_reliable = result.n_reliable
            raise FrameRejected(f"not localized: {result.reason}")

        camera_frame = header.frame_id.lstrip("/")
        T_map_cam = np.asarray(result.T_world_cam, dtype=np.float64)
        try:  # a pose without a believable covariance is not published (never an all-zero "certain" one)
            covariance = checked_pose_covariance(result.covariance)
        except ValueError as exc:
            raise FrameRejected(f"not localized: {exc}") from exc
        target_frame, T_map_target = camera_frame, T_map_cam
        if s.base_frame:
            if not camera_frame:
                raise FrameRejected("image has no frame_id, so camera -> base_frame cannot be looked up")
            try:
                T_cam_base = self._tf.lookup(camera_frame, s.base_frame, stamp_ns, s.transform_timeout)
            except TransformLookupError as exc:
                raise FrameRejected(f"no transform {camera_frame} -> {s.base_frame}: {exc}") from exc
            target_frame, T_map_target = s.base_frame, T_map_cam @ T_cam_base
            covariance = covariance_of_offset_pose(covariance, T_map_cam, T_cam_base)

        T_odom_cam, odom_problem = self._odometry(camera_frame, stamp_ns)
        if self._gate is not None and T_odom_cam is not None:
            decision = self._gate.check(T_map_cam, T_odom_cam)
            if not decision.accepted:
                raise FrameRejected(f"rejected: {decision.reason}")
            if decision.reason.startswith("re-locked"):
                self._warn("relock", f"localisation {decision.reason} that disagreed with the previous map -> {s.odom_frame}")

        pose = PoseWithCovarianceStamped()
        pose.header.stamp = header.stamp
        pose.header.frame_id = s.map_frame
        pose_to_msg_fields(T_map_target, pose.pose.pose)
        pose.pose.covariance = covariance_to_msg_list(covariance)
        self._pose_pub.publish(pose)
        if self._initial_pose_due and self._initial_pose_pub is not None:
            self._initial_pose_due = False
            self._initial_pose_pub.publish(pose)
        with self._relocalize_lock:
            if self._relocalize_request is not None and not self._relocalize_request.is_set():
                self._relocalize_result = (f"localized: {target_frame or 'camera'} at ({T_map_target[0, 3]:.2f}, "
                                           f"{T_map_target[1, 3]:.2f}, {T_map_target[2, 3]:.2f}) m in {s.map_frame}, "
                                           f"{result.n_inliers} inliers")
                self._relocalize_request.set()
        tf_problem = ""
        if s.publish_tf:
            tf_problem = self._publish_tf(target_frame, T_map_cam, T_odom_cam, odom_problem, T_map_target, stamp_ns)

        latency_ms = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-6
        processing_ms = (time.monotonic_ns() - pending.received_ns) * 1e-6
        with self._stats_lock:
            st = self._stats
            st.processed += 1
            st.localized += 1
            st.consecutive_failures = 0
            st.last_frame_stamp_ns = stamp_ns
            st.last_frame_result = "localized"
            st.last_inliers, st.last_keypoints, st.last_reliable = result.n_inliers, result.n_keypoints, result.n_reliable
            st.tf_problem = tf_problem
            st.window.append((time.monotonic(), True, latency_ms, processing_ms))
        if tf_problem:
            self._warn("tf", f"pose published but no TF: {tf_problem}")

    def _publish_debug_image(self, image: np.ndarray, result: Any, header: Any) -> None:
        """~/debug_image for this frame; a drawing problem is a warning, never the frame's failure."""
        from d2s_nerf_ros.debug_image import draw_localization

        try:
            msg = Image(**numpy_to_image_fields(draw_localization(image, result), "rgb8"))
            msg.header = header
            self._debug_image_pub.publish(msg)
        except Exception as exc:  # noqa: BLE001 - the debug view must not cost the pose
            self._warn("debug_image", f"~/debug_image not published: {type(exc).__name__}: {exc}")

    def _odometry(self, camera_frame: str, stamp_ns: int) -> tuple[np.ndarray | None, str]:
        """``T_odom_cam`` at the image stamp (None without odom_frame or TF), and the problem if any."""
        s = self.settings
        if not s.odom_frame:
            return None, ""
        if not camera_frame:
            return None, "image has no frame_id, so odom -> camera cannot be looked up"
        try:
            return self._tf.lookup(s.odom_frame, camera_frame, stamp_ns, s.transform_timeout), ""
        except TransformLookupError as exc:
            return None, f"no transform {s.odom_frame} -> {camera_frame} at the image stamp: {exc}"

    def _publish_tf(self, target_frame: str, T_map_cam: np.ndarray, T_odom_cam: np.ndarray | None, odom_problem: str,
                    T_map_target: np.ndarray, stamp_ns: int) -> str:
        """Send the TF for this frame; returns a problem description or ''."""
        s = self.settings
        if s.odom_frame:
            if T_odom_cam is None:
                return odom_problem
            self._last_map_odom = map_to_odom(T_map_cam, T_odom_cam)
            self._send_tf(s.odom_frame, self._last_map_odom, self.get_clock().now().nanoseconds)
            return ""
        if not s.allow_tf_without_odom:
            return ""
        if not target_frame:
            return "image has no frame_id to attach the camera pose to"
        parent = self._foreign_parents.get(target_frame)
        if parent is not None:
            refusal = (f"refusing to publish {s.map_frame} -> {target_frame}: {target_frame} already has the parent {parent} "
                       f"on /tf or /tf_static, and a frame has one parent; set odom_frame (REP-105: map -> odom)")
            with self._stats_lock:
                first = not self._stats.tf_refused
                self._stats.tf_refused = refusal
            if first:
                self.get_logger().error(refusal)
            return refusal
        self._send_tf(target_frame, T_map_target, stamp_ns)
        return ""

    def _watch_parents(self, msg: TFMessage) -> None:
        for t in msg.transforms:
            parent, child = t.header.frame_id.lstrip("/"), t.child_frame_id.lstrip("/")
            if parent != self.settings.map_frame:
                self._foreign_parents[child] = parent

    def _republish_map_odom(self) -> None:
        """Timer: the last map -> odom again, stamped now + transform_tolerance (rtabmap, AMCL do the same)."""
        T = self._last_map_odom
        if T is not None:
            self._send_tf(self.settings.odom_frame, T, self.get_clock().now().nanoseconds)

    def _send_tf(self, child: str, T_map_child: np.ndarray, stamp_ns: int) -> None:
        """map -> child stamped ``stamp_ns`` + transform_tolerance."""
        t = TransformStamped()
        ns_to_stamp_fields(stamp_ns + int(self.settings.transform_tolerance * 1e9), t.header.stamp)
        t.header.frame_id = self.settings.map_frame
        t.child_frame_id = child
        transform_to_msg_fields(T_map_child, t.transform)
        self._tf_pub.publish(TFMessage(transforms=[t]))

    def _record_failure(self, pending: _PendingFrame, reason: str, warn_key: str) -> None:
        try:
            stamp_ns = stamp_to_ns(pending.msg.header.stamp)
        except Exception:
            stamp_ns = None
        with self._stats_lock:
            st = self._stats
            st.processed += 1
            st.failed += 1
            st.consecutive_failures += 1
            st.last_frame_stamp_ns = stamp_ns
            st.last_frame_result = reason
            st.last_failure_reason = reason
            st.window.append((time.monotonic(), False, None, (time.monotonic_ns() - pending.received_ns) * 1e-6))
        self._warn(warn_key, f"frame not localized: {reason}")

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warned.get(key, -math.inf) >= WARN_EVERY_S:
            self._last_warned[key] = now
            self.get_logger().warning(message)

    # ------------------------------------------------------------------ diagnostics (executor thread)
    def diagnostic_status(self) -> DiagnosticStatus:
        now = time.monotonic()
        with self._stats_lock:
            st = self._stats
            while st.window and st.window[0][0] < now - STATS_WINDOW_S:
                st.window.popleft()
            for arrivals in (st.image_arrivals, st.camera_info_arrivals):
                while arrivals and arrivals[0] < now - STATS_WINDOW_S:
                    arrivals.popleft()
            window = list(st.window)
            n_images, n_infos = len(st.image_arrivals), len(st.camera_info_arrivals)
            first_arrival = min([q[0] for q in (st.image_arrivals, st.camera_info_arrivals) if q], default=now)
            snapshot = dict(
                received=st.received, processed=st.processed, localized=st.localized, failed=st.failed,
                dropped=st.dropped, idle=st.idle, consecutive=st.consecutive_failures, last_rx=st.last_received_mono,
                stamp=st.last_frame_stamp_ns, result=st.last_frame_result, reason=st.last_failure_reason,
                inliers=st.last_inliers, keypoints=st.last_keypoints, reliable=st.last_reliable, tf_problem=st.tf_problem,
                tf_refused=st.tf_refused)
        span = min(STATS_WINDOW_S, max(now - window[0][0], 1.0)) if window else STATS_WINDOW_S
        latencies = sorted(w[2] for w in window if w[1])
        processing = sorted(w[3] for w in window)

        def pct(values: list[float], q: float) -> str:
            if not values:
                return "nan"
            return f"{values[min(len(values) - 1, int(round(q * (len(values) - 1))))]:.1f}"

        arrival_span = min(STATS_WINDOW_S, max(now - first_arrival, 1.0))
        image_rate, camera_info_rate = n_images / arrival_span, n_infos / arrival_span
        frame_loss = ""
        if n_infos >= MIN_CAMERA_INFO_FOR_LOSS and image_rate < IMAGE_LOSS_RATIO * camera_info_rate:
            frame_loss = (f"images arrive at {image_rate:.1f} Hz but CameraInfo at {camera_info_rate:.1f} Hz: "
                          f"frames are lost in transport; {FASTDDS_PROFILE_HINT}")

        status = DiagnosticStatus(name=DIAGNOSTIC_NAME, hardware_id=self.settings.map_path if self.settings else "")
        if snapshot["tf_refused"]:  # a configuration error that breaks the TF tree: ERROR until restarted
            status.level, status.message = DiagnosticStatus.ERROR, snapshot["tf_refused"]
        elif frame_loss:  # first: every other symptom (stale images, failed frames) follows from it
            status.level, status.message = DiagnosticStatus.WARN, frame_loss
        elif snapshot["received"] == 0:
            status.level, status.message = DiagnosticStatus.WARN, f"waiting for images on {self._image_topic}"
        elif snapshot["last_rx"] is not None and now - snapshot["last_rx"] > IMAGE_TIMEOUT_S:
            status.level, status.message = DiagnosticStatus.WARN, f"no image for {now - snapshot['last_rx']:.0f} s"
        elif snapshot["consecutive"] >= ERROR_AFTER_FAILURES:
            status.level = DiagnosticStatus.ERROR
            status.message = f"not localizing ({snapshot['consecutive']} frames failed in a row): {snapshot['reason']}"
        elif snapshot["consecutive"] > 0:
            status.level, status.message = DiagnosticStatus.WARN, f"last frame failed: {snapshot['reason']}"
        elif snapshot["tf_problem"]:
            status.level, status.message = DiagnosticStatus.WARN, f"localizing, but no TF: {snapshot['tf_problem']}"
        else:
            status.level, status.message = DiagnosticStatus.OK, "localizing"
        values = {
            "frames_received": snapshot["received"],
            "frames_processed": snapshot["processed"],
            "frames_localized": snapshot["localized"],
            "frames_failed": snapshot["failed"],
            "frames_dropped": snapshot["dropped"],
            "frames_idle": snapshot["idle"],
            "mode": self.settings.mode if self.settings else "",
            "consecutive_failures": snapshot["consecutive"],
            "rate_hz": f"{len(window) / span:.2f}",
            "image_rate_hz": f"{image_rate:.2f}",
            "camera_info_rate_hz": f"{camera_info_rate:.2f}",
            "localized_rate_hz": f"{sum(1 for w in window if w[1]) / span:.2f}",
            "latency_ms_p50": pct(latencies, 0.5),
            "latency_ms_p90": pct(latencies, 0.9),
            "processing_ms_p50": pct(processing, 0.5),
            "inliers": snapshot["inliers"],
            "keypoints": snapshot["keypoints"],
            "reliable_keypoints": snapshot["reliable"],
            "last_frame_stamp_ns": "" if snapshot["stamp"] is None else snapshot["stamp"],
            "last_frame_result": snapshot["result"],
            "last_failure_reason": snapshot["reason"],
            "device": self.device_name,
            "image_converter": converter_backend(),
        }
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        return status

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [self.diagnostic_status()]
        self._diag_pub.publish(msg)


# --------------------------------------------------------------------------- entry point

def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node: LocalizerNode | None = None
    try:
        try:
            node = LocalizerNode()
        except StartupError as exc:
            print(f"[{NODE_NAME}] error: {exc}", file=sys.stderr, flush=True)
            return 1
        if node.autostart:
            # Without a lifecycle manager a node that cannot configure has nothing to wait for.
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                print(f"[{NODE_NAME}] error: {node.configure_error or 'configure failed'}", file=sys.stderr, flush=True)
                return 1
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                print(f"[{NODE_NAME}] error: activation failed (see the log above)", file=sys.stderr, flush=True)
                return 1
        # Two threads: a ~/relocalize request waits while image callbacks go on.
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        return 0
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
