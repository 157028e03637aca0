"""The ROS 2 node ``localizer``: images + CameraInfo in, pose + TF + diagnostics out.

    ros2 run d2s_nerf_ros localizer --ros-args -p map_path:=/maps/kitchen
    python -m d2s_nerf_ros.node --ros-args -p map_path:=/maps/kitchen      (pip environment)

Topics (node name ``localizer``; relative names resolve in the node's namespace)
    in   <image_topic>                sensor_msgs/Image (mono8, mono16, rgb8, bgr8, rgba8, bgra8)
    in   <image_topic>/compressed     sensor_msgs/CompressedImage, instead, when use_compressed
    in   <camera_info_topic>          sensor_msgs/CameraInfo (plumb_bob, rational_polynomial, equidistant)
    in   /tf, /tf_static              only when odom_frame or base_frame is set
    out  ~/pose                       geometry_msgs/PoseWithCovarianceStamped in map_frame, image stamp
    out  /tf                          map_frame -> odom_frame | base_frame | the image's frame_id
    out  /diagnostics                 diagnostic_msgs/DiagnosticArray, once a second

Behaviour
- Images use sensor-data QoS (best effort) unless ``image_qos: reliable``. With Fast DDS's
  default transports a best-effort reader never receives a sample larger than the
  shared-memory segment (512 KiB; a raw 640x480 rgb8 image is 900 KiB): use compressed
  images, ``image_qos: reliable``, or give the camera driver a Fast DDS profile with a
  larger ``segment_size``.
- Only the newest frame is processed: the image callback parks the message in a one-slot
  mailbox; a worker thread takes it. A frame replaced before the worker took it is counted
  as dropped, so a slow frame never builds a backlog.
- A frame that cannot be used (bad encoding, size mismatch, no or invalid CameraInfo, no
  localisation) publishes no pose, is counted and named in diagnostics, and logs a warning
  at most every 5 s per kind of problem. Nothing a frame contains stops the node.
- Pose: the camera optical frame (the image's frame_id), or ``base_frame`` when set (then
  camera -> base_frame comes from TF and the covariance is carried over to the base).
- TF (REP-105): odom_frame empty -> map_frame -> base_frame (or the camera frame);
  odom_frame set -> map_frame -> odom_frame = T_map_cam * inv(T_odom_cam), odom -> camera
  looked up at the image stamp. Stamped image time + transform_tolerance, like AMCL; when a
  frame fails, the last map -> odom is re-sent with the new stamp so TF users never stall.
- Start-up faults (missing/corrupted/incompatible map, invalid parameter values, device
  ``cuda`` without a GPU) print one line ``[localizer] error: ...`` on stderr and exit with
  status 1. ``device: auto`` is the fallback mode: CUDA when present, else the CPU.
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
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from tf2_msgs.msg import TFMessage

from d2s_nerf_ros.camera import CameraInfoError, CameraIntrinsics, camera_from_camera_info, rectification_hint
from d2s_nerf_ros.errors import FrameRejected
from d2s_nerf_ros.image_conversion import (
    ImageConversionError,
    UnsupportedEncoding,
    compressed_msg_to_numpy,
    converter_backend,
    image_msg_to_numpy,
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
    ParameterSpec("image_qos", "sensor_data", "QoS of the image subscription: sensor_data (best effort, accepts any publisher) or reliable "
                  "(needs a reliable publisher; use it for raw images over ~0.5 MB with Fast DDS's default shared-memory segment, "
                  "which a best-effort reader never receives whole)."),
    ParameterSpec("device", "auto", "auto | cuda | cpu. auto takes CUDA when present, else the CPU; cuda without a GPU is a start-up error."),
    ParameterSpec("max_keypoints", 1024, "Keypoints extracted per image (>= 4)."),
    ParameterSpec("reliability_threshold", 0.5, "Keypoints whose D2S reliability is below this are not used for PnP, in [0, 1]."),
    ParameterSpec("ransac_threshold_px", 12.0, "PnP-RANSAC inlier threshold in pixels at 640x480; scaled with the image diagonal (> 0)."),
    ParameterSpec("ransac_iterations", 10000, "Maximum PnP-RANSAC iterations (> 0)."),
    ParameterSpec("min_inliers", 15, "A pose needs at least this many PnP inliers (>= 4)."),
    ParameterSpec("min_inlier_ratio", 0.07, "A pose needs at least this share of the PnP correspondences as inliers, in [0, 1] "
                  "(frames of another scene gave 0.03-0.04, held-out RedKitchen frames 0.11-0.41; docs/BENCHMARKS.md, wrong-scene)."),
    ParameterSpec("max_reprojection_rmse_px", 9.0, "A pose needs an inlier reprojection RMSE of at most this many pixels at 640x480, "
                  "scaled with the image diagonal (> 0); a sanity bound (true and wrong frames both give ~7 px at the 12 px threshold)."),
    ParameterSpec("map_frame", "map", "Frame of the map (REP-105); the pose and TF are expressed in it."),
    ParameterSpec("odom_frame", "", "Odometry frame. Empty: publish map -> camera (or base_frame). Set: publish map -> odom using odom -> camera from TF."),
    ParameterSpec("base_frame", "", "Robot base frame. Empty: the pose is the camera's (the image frame_id). Set: pose and TF are of this frame, camera -> base from TF."),
    ParameterSpec("publish_tf", True, "Publish the localisation on /tf."),
    ParameterSpec("transform_tolerance", 0.1, "Seconds added to the image stamp of the published TF, like AMCL (>= 0)."),
    ParameterSpec("transform_timeout", 0.1, "Seconds to wait for odom/base -> camera transforms at the image stamp (>= 0)."),
)
PARAMETER_DEFAULTS = {p.name: p.default for p in PARAMETERS}
IMAGE_QOS_CHOICES = ("sensor_data", "reliable")


@dataclass(frozen=True)
class NodeSettings:
    map_path: str
    image_topic: str
    camera_info_topic: str
    rectified: bool
    use_compressed: bool
    image_qos: str
    device: str
    max_keypoints: int
    reliability_threshold: float
    ransac_threshold_px: float
    ransac_iterations: int
    min_inliers: int
    min_inlier_ratio: float
    max_reprojection_rmse_px: float
    map_frame: str
    odom_frame: str
    base_frame: str
    publish_tf: bool
    transform_tolerance: float
    transform_timeout: float


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
    frames = {name: text(name).lstrip("/") for name in ("map_frame", "odom_frame", "base_frame")}
    if not frames["map_frame"]:
        raise ValueError("parameter map_frame must not be empty")
    if frames["odom_frame"] and frames["odom_frame"] == frames["map_frame"]:
        raise ValueError(f"parameter odom_frame must differ from map_frame, both are {frames['map_frame']!r}")
    if frames["base_frame"] and frames["base_frame"] in (frames["map_frame"], frames["odom_frame"]):
        raise ValueError(f"parameter base_frame {frames['base_frame']!r} must differ from map_frame and odom_frame")
    return NodeSettings(
        map_path=map_path,
        image_topic=topics["image_topic"],
        camera_info_topic=topics["camera_info_topic"],
        rectified=flag("rectified"),
        use_compressed=flag("use_compressed"),
        image_qos=image_qos,
        device=device,
        max_keypoints=integer("max_keypoints", 4),
        reliability_threshold=number("reliability_threshold", 0.0, 1.0),
        ransac_threshold_px=number("ransac_threshold_px", 0.0, low_open=True),
        ransac_iterations=integer("ransac_iterations", 1),
        min_inliers=integer("min_inliers", 4),
        min_inlier_ratio=number("min_inlier_ratio", 0.0, 1.0),
        max_reprojection_rmse_px=number("max_reprojection_rmse_px", 0.0, low_open=True),
        map_frame=frames["map_frame"],
        odom_frame=frames["odom_frame"],
        base_frame=frames["base_frame"],
        publish_tf=flag("publish_tf"),
        transform_tolerance=number("transform_tolerance", 0.0),
        transform_timeout=number("transform_timeout", 0.0),
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
    consecutive_failures: int = 0
    last_received_mono: float | None = None
    last_frame_stamp_ns: int | None = None
    last_frame_result: str = ""
    last_failure_reason: str = ""
    last_inliers: int = 0
    last_keypoints: int = 0
    last_reliable: int = 0
    tf_problem: str = ""
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


# --------------------------------------------------------------------------- the node

class StartupError(Exception):
    """The node cannot start; the message is printed as one line."""


class LocalizerNode(Node):
    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.settings: NodeSettings | None = None
        self._localizer = None
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._slot = LatestSlot()
        self._camera_info: CameraInfo | None = None
        self._camera_cache: tuple[Any, CameraIntrinsics | FrameRejected] | None = None
        self._last_warned: dict[str, float] = {}
        self._last_map_odom: np.ndarray | None = None
        self._tf: _TfLookup | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._first_camera_info = threading.Event()
        self.device_name = ""

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        """Declare and check parameters, load the map, wire topics, start the worker. Raises StartupError."""
        self.settings = self._read_parameters()
        s = self.settings
        try:
            from d2s_nerf_ros.device import resolve_device

            self.device_name = str(resolve_device(s.device))
        except (RuntimeError, ValueError) as exc:
            raise StartupError(f"{exc} (use device:=auto to fall back to the CPU)") from exc
        self._localizer = self._load_localizer(s)

        self._tf = _TfLookup(self) if (s.odom_frame or s.base_frame) else None
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", 10)
        self._tf_pub = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        image_qos = qos_profile_sensor_data if s.image_qos == "sensor_data" else QoSProfile(
            depth=qos_profile_sensor_data.depth, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        if s.use_compressed:
            self._image_topic = s.image_topic.rstrip("/") + "/compressed"
            self.create_subscription(CompressedImage, self._image_topic, lambda m: self._on_image(m, True), image_qos)
        else:
            self._image_topic = s.image_topic
            self.create_subscription(Image, self._image_topic, lambda m: self._on_image(m, False), image_qos)
        self.create_subscription(CameraInfo, s.camera_info_topic, self._on_camera_info, qos_profile_sensor_data)
        self.create_timer(1.0, self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._refuse_parameter_changes)

        hint = rectification_hint(self._image_topic, s.rectified)
        if hint:
            self.get_logger().warning(hint)
        self._worker = threading.Thread(target=self._work, name="localizer-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: map {s.map_path} on {self.device_name}; images {self._image_topic} "
            f"({converter_backend()} converter), camera info {s.camera_info_topic}; "
            f"pose {self.resolve_topic_name('~/pose')} in {s.map_frame}"
            + (f"; TF {s.map_frame} -> {s.odom_frame or s.base_frame or '<image frame_id>'}" if s.publish_tf else "")
            + (f"; TF lookups via {self._tf.backend}" if self._tf else ""))

    def _read_parameters(self) -> NodeSettings:
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
        try:
            return settings_from_values(values)
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
            max_reprojection_rmse_px=s.max_reprojection_rmse_px, device=s.device)
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
        self._stop.set()
        self._slot.close()
        if self._worker is not None:
            self._worker.join(timeout=10.0)

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_image(self, msg: Any, compressed: bool) -> None:
        now = time.monotonic()
        replaced = self._slot.put(_PendingFrame(msg, compressed, time.monotonic_ns()))
        with self._stats_lock:
            self._stats.received += 1
            self._stats.last_received_mono = now
            if replaced:
                self._stats.dropped += 1

    def _on_camera_info(self, msg: CameraInfo) -> None:
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

        pose = PoseWithCovarianceStamped()
        pose.header.stamp = header.stamp
        pose.header.frame_id = s.map_frame
        pose_to_msg_fields(T_map_target, pose.pose.pose)
        pose.pose.covariance = covariance_to_msg_list(covariance)
        self._pose_pub.publish(pose)
        tf_problem = self._publish_tf(camera_frame, target_frame, T_map_cam, T_map_target, stamp_ns) if s.publish_tf else ""

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

    def _publish_tf(self, camera_frame: str, target_frame: str, T_map_cam: np.ndarray, T_map_target: np.ndarray,
                    stamp_ns: int) -> str:
        """Send the TF for this frame; returns a problem description or ''."""
        s = self.settings
        if s.odom_frame:
            if not camera_frame:
                return "image has no frame_id, so odom -> camera cannot be looked up"
            try:
                T_odom_cam = self._tf.lookup(s.odom_frame, camera_frame, stamp_ns, s.transform_timeout)
            except TransformLookupError as exc:
                return f"no transform {s.odom_frame} -> {camera_frame} at the image stamp: {exc}"
            self._last_map_odom = map_to_odom(T_map_cam, T_odom_cam)
            self._send_tf(s.odom_frame, self._last_map_odom, stamp_ns)
            return ""
        if not target_frame:
            return "image has no frame_id to attach the camera pose to"
        self._send_tf(target_frame, T_map_target, stamp_ns)
        return ""

    def _send_tf(self, child: str, T_map_child: np.ndarray, stamp_ns: int) -> None:
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
        # Keep map -> odom alive through failed frames (AMCL re-sends its last estimate too).
        if self.settings.publish_tf and self.settings.odom_frame and self._last_map_odom is not None and stamp_ns:
            try:
                self._send_tf(self.settings.odom_frame, self._last_map_odom, stamp_ns)
            except Exception:
                pass
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
            window = list(st.window)
            snapshot = dict(
                received=st.received, processed=st.processed, localized=st.localized, failed=st.failed,
                dropped=st.dropped, consecutive=st.consecutive_failures, last_rx=st.last_received_mono,
                stamp=st.last_frame_stamp_ns, result=st.last_frame_result, reason=st.last_failure_reason,
                inliers=st.last_inliers, keypoints=st.last_keypoints, reliable=st.last_reliable, tf_problem=st.tf_problem)
        span = min(STATS_WINDOW_S, max(now - window[0][0], 1.0)) if window else STATS_WINDOW_S
        latencies = sorted(w[2] for w in window if w[1])
        processing = sorted(w[3] for w in window)

        def pct(values: list[float], q: float) -> str:
            if not values:
                return "nan"
            return f"{values[min(len(values) - 1, int(round(q * (len(values) - 1))))]:.1f}"

        status = DiagnosticStatus(name=DIAGNOSTIC_NAME, hardware_id=self.settings.map_path if self.settings else "")
        if snapshot["received"] == 0:
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
            "consecutive_failures": snapshot["consecutive"],
            "rate_hz": f"{len(window) / span:.2f}",
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
        node = LocalizerNode()
        try:
            node.start()
        except StartupError as exc:
            print(f"[{NODE_NAME}] error: {exc}", file=sys.stderr, flush=True)
            return 1
        executor = SingleThreadedExecutor()
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
