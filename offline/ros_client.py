"""The one rclpy client of the localizer node: send camera frames, collect what comes back.

Used by ``d2s-nerf replay`` (``offline/replay.py``), the node benchmarks (``offline/bench/``)
and the DDS tests. It is a ROS node of its own, in its own rclpy context and executor thread,
so it can live beside other rclpy users in one process:

    with LocalizerClient(image_qos="sensor_data") as client:
        client.wait_ready(node_alive=node.alive)          # the node subscribed and sent diagnostics
        client.send_info(camera_info_fields(camera))      # CameraInfo first: the node uses the newest
        stamp = client.send(image_fields(rgb), camera_info_fields(camera))
        answer = client.wait_answer(stamp, timeout_s=30)  # "pose" | "failed" | "timeout"

What it records (read under ``client.lock``, a ``threading.Condition`` notified on every arrival):

- ``poses``: image stamp (ns) -> ``PoseRecord`` (4x4 pose, wall-clock ns at arrival, covariance,
  the message), so every pose is matched to the frame it answers;
- ``diagnostics``: the newest ``DIAGNOSTICS_KEPT`` statuses named ``diagnostic_name`` as
  ``DiagnosticRecord`` (level, message, hardware_id, key/values), and ``diagnostics_count``;
- ``transforms``: the newest ``TRANSFORMS_KEPT`` transforms seen on /tf (only with ``record_tf``).

Image QoS: ``sensor_data`` (best effort, as camera drivers publish: what a robot does) or
``reliable``. Stamps are the wall clock at sending time, unique per frame, so latency figures
mean what they say. Failures name the node's state; nothing here hides a missing answer.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
DEFAULT_CAMERA_INFO_TOPIC = "/camera/camera_info"
DEFAULT_POSE_TOPIC = "/localizer/pose"
DIAGNOSTICS_TOPIC = "/diagnostics"
CAMERA_FRAME_ID = "camera"
IMAGE_QOS_CHOICES = ("sensor_data", "reliable")
DIAGNOSTICS_KEPT = 1000   # about 17 min of the node's 1 Hz diagnostics
TRANSFORMS_KEPT = 5000
POSE_IN_FLIGHT_S = 1.0    # diagnostics said "localized": its pose is this long on its way at most
COUNTER_KEYS = ("frames_received", "frames_processed", "frames_localized", "frames_failed", "frames_dropped")


class NodeNotReady(RuntimeError):
    """The localizer did not show up (or died) before the deadline; the message says what was missing."""


@dataclass(frozen=True)
class PoseRecord:
    T: np.ndarray              # 4x4 pose in the map frame
    received_ns: int           # wall clock when it arrived here
    covariance: list[float]    # 36 floats, row-major 6x6
    msg: Any                   # the PoseWithCovarianceStamped itself


@dataclass(frozen=True)
class DiagnosticRecord:
    level: int                 # 0 OK, 1 WARN, 2 ERROR, 3 STALE
    message: str
    hardware_id: str
    values: dict[str, str]


def image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> dict[str, Any]:
    """``sensor_msgs/Image`` fields of an RGB (or mono) array, in ``encoding`` (rgb8, bgr8, mono8, mono16...)."""
    from d2s_nerf_ros.image_conversion import numpy_to_image_fields

    if encoding == "bgr8":
        rgb = np.ascontiguousarray(rgb[:, :, ::-1])
    return numpy_to_image_fields(rgb, encoding)


def jpeg_fields(rgb: np.ndarray, quality: int = 95) -> dict[str, Any]:
    """``sensor_msgs/CompressedImage`` fields of an RGB array, JPEG-encoded as image_transport does."""
    import cv2

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cannot JPEG-encode the image")
    return {"format": "rgb8; jpeg compressed bgr8", "data": jpeg.tobytes()}


def _level(value: Any) -> int:
    return int.from_bytes(value, "little") if isinstance(value, bytes) else int(value)


class LocalizerClient:
    """A ROS node (own context) that publishes image + CameraInfo and records poses, diagnostics, TF.

    ``image_qos``: ``sensor_data`` (best effort, depth 5) or ``reliable`` (depth 10) for both the
    raw and the compressed image publishers; CameraInfo and TF are always reliable. The raw
    publisher goes on ``image_topic``, the compressed one on ``image_topic/compressed``.
    ``record_tf``: also subscribe /tf and keep the transforms (tests; off for long runs).
    """

    def __init__(self, image_topic: str = DEFAULT_IMAGE_TOPIC, camera_info_topic: str = DEFAULT_CAMERA_INFO_TOPIC,
                 pose_topic: str = DEFAULT_POSE_TOPIC, image_qos: str = "sensor_data", record_tf: bool = False,
                 diagnostic_name: str | None = None, name: str = "d2s_client") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo
        from tf2_msgs.msg import TFMessage

        from d2s_nerf_ros.node import DIAGNOSTIC_NAME

        if image_qos not in IMAGE_QOS_CHOICES:
            raise ValueError(f"image_qos must be one of {IMAGE_QOS_CHOICES}, got {image_qos!r}")
        self.image_topic, self.camera_info_topic, self.pose_topic = image_topic, camera_info_topic, pose_topic
        self.image_qos = image_qos
        self.diagnostic_name = diagnostic_name or DIAGNOSTIC_NAME
        self.lock = threading.Condition()
        self.poses: dict[int, PoseRecord] = {}
        self.diagnostics: deque[DiagnosticRecord] = deque(maxlen=DIAGNOSTICS_KEPT)
        self.diagnostics_count = 0
        self.transforms: deque[Any] = deque(maxlen=TRANSFORMS_KEPT)
        self._last_stamp = 0

        self.context = Context()
        rclpy.init(context=self.context)
        try:
            self.node = rclpy.create_node(f"{name}_{os.getpid()}_{uuid.uuid4().hex[:6]}", context=self.context)
            if image_qos == "sensor_data":
                self._image_qos_profile = qos_profile_sensor_data
            else:
                self._image_qos_profile = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            self._image_pubs: dict[bool, Any] = {}
            self.info_pub = self.node.create_publisher(CameraInfo, camera_info_topic, reliable)
            self.tf_pub = self.node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
            self.tf_static_pub = self.node.create_publisher(TFMessage, "/tf_static", QoSProfile(
                depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            self.pose_sub = self.node.create_subscription(PoseWithCovarianceStamped, pose_topic, self._on_pose, 50)
            self.node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC, self._on_diagnostics, 10)
            if record_tf:
                self.node.create_subscription(TFMessage, "/tf", self._on_tf, QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
            self._thread = threading.Thread(target=self.executor.spin, name="d2s-client-spin", daemon=True)
            self._thread.start()
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=1.0)
        self._thread.join(timeout=5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> "LocalizerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ subscriptions (executor thread)
    def _on_pose(self, msg: Any) -> None:
        from d2s_nerf_ros.tf_math import pose_from_msg, stamp_to_ns

        received = time.time_ns()
        try:
            T = pose_from_msg(msg.pose.pose)
        except ValueError:
            return
        with self.lock:
            self.poses[stamp_to_ns(msg.header.stamp)] = PoseRecord(T, received, list(msg.pose.covariance), msg)
            self.lock.notify_all()

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == self.diagnostic_name:
                record = DiagnosticRecord(_level(status.level), status.message, status.hardware_id,
                                          {kv.key: kv.value for kv in status.values})
                with self.lock:
                    self.diagnostics.append(record)
                    self.diagnostics_count += 1
                    self.lock.notify_all()

    def _on_tf(self, msg: Any) -> None:
        with self.lock:
            self.transforms.extend(msg.transforms)
            self.lock.notify_all()

    # ------------------------------------------------------------------ reading
    def latest_diagnostics(self) -> DiagnosticRecord | None:
        with self.lock:
            return self.diagnostics[-1] if self.diagnostics else None

    def counters(self) -> dict[str, int | None]:
        """The node's frame counters from its newest diagnostics (None where absent)."""
        record = self.latest_diagnostics()
        out: dict[str, int | None] = {}
        for key in COUNTER_KEYS:
            try:
                out[key] = int(record.values[key]) if record is not None else None
            except (KeyError, ValueError):
                out[key] = None
        return out

    def pose(self, stamp_ns: int) -> PoseRecord | None:
        with self.lock:
            return self.poses.get(stamp_ns)

    def forget(self, stamp_ns: int) -> None:
        """Drop a scored pose, so a long run does not grow this process's memory."""
        with self.lock:
            self.poses.pop(stamp_ns, None)

    # ------------------------------------------------------------------ waiting
    def wait_until(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """The first truthy ``predicate()`` (evaluated under the lock, on every arrival and every
        0.1 s); ``TimeoutError`` naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
                self.lock.wait(min(left, 0.1))

    def wait_ready(self, timeout_s: float = 120.0, node_alive: Callable[[], bool] | None = None,
                   hardware_id: str | None = None, compressed: bool = False, need_diagnostics: bool = True) -> None:
        """Until the node subscribes to our image and CameraInfo topics, publishes poses and (with
        ``need_diagnostics``) diagnostics, from the map ``hardware_id`` when given (not a node still
        shutting down). ``node_alive``: checked meanwhile, so a node that exits fails at once.
        ``NodeNotReady`` says which of these was missing."""
        image_pub = self.image_publisher(compressed)
        deadline = time.monotonic() + timeout_s
        while True:
            if node_alive is not None and not node_alive():
                raise NodeNotReady("the localizer node exited before it was ready")
            with self.lock:
                diagnostics = any(hardware_id is None or d.hardware_id == hardware_id for d in self.diagnostics)
            missing = []
            if image_pub.get_subscription_count() == 0:
                missing.append(f"a subscriber on {image_pub.topic_name}")
            if self.info_pub.get_subscription_count() == 0:
                missing.append(f"a subscriber on {self.camera_info_topic}")
            if self.pose_sub.get_publisher_count() == 0:
                missing.append(f"a publisher on {self.pose_topic}")
            if need_diagnostics and not diagnostics:
                missing.append("its diagnostics" + (f" for map {hardware_id}" if hardware_id else ""))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise NodeNotReady(f"no localizer found after {timeout_s:.0f} s: missing {', '.join(missing)} "
                                   f"(is the node running with the same ROS_DOMAIN_ID and topics?)")
            time.sleep(0.05)

    def wait_verdict(self, stamp_ns: int, timeout_s: float) -> DiagnosticRecord:
        """The first diagnostics that name the frame ``stamp_ns`` as the node's last frame."""
        text = str(stamp_ns)
        return self.wait_until(
            lambda: next((d for d in reversed(self.diagnostics) if d.values.get("last_frame_stamp_ns") == text), None),
            timeout_s, f"the node's verdict on the frame stamped {stamp_ns}")

    def wait_answer(self, stamp_ns: int, timeout_s: float) -> tuple[str, int | None]:
        """("pose", arrival ns) | ("failed", None) when diagnostics name this frame without a pose
        (after a short grace for a pose still in flight) | ("timeout", None)."""
        deadline = time.monotonic() + timeout_s
        grace_until = None
        text = str(stamp_ns)
        with self.lock:
            while True:
                record = self.poses.get(stamp_ns)
                if record is not None:
                    return "pose", record.received_ns
                latest = self.diagnostics[-1] if self.diagnostics else None
                if latest is not None and latest.values.get("last_frame_stamp_ns") == text:
                    if latest.values.get("last_frame_result") != "localized":
                        return "failed", None
                    grace_until = grace_until or time.monotonic() + POSE_IN_FLIGHT_S
                now = time.monotonic()
                if now >= deadline or (grace_until is not None and now >= grace_until):
                    return "timeout", None
                self.lock.wait(min(deadline, grace_until or deadline) - now)

    def wait_settled(self, stamps: list[int], base: Mapping[str, int | None], timeout_s: float) -> None:
        """After sending ``stamps``: until every one has a pose, or the node names the last one in
        its diagnostics, or its counters (against ``base``) account for every frame it received
        (processed or dropped) and it received them all; then one more diagnostics message so
        the counters include the end of the run. Returns at ``timeout_s`` regardless."""
        wanted, last = set(stamps), str(max(stamps))
        deadline = time.monotonic() + timeout_s

        def settled() -> bool:
            if wanted <= set(self.poses):
                return True
            latest = self.diagnostics[-1] if self.diagnostics else None
            if latest is None:
                return False
            if latest.values.get("last_frame_stamp_ns") == last:
                return True
            try:
                got = int(latest.values["frames_received"]) - (base.get("frames_received") or 0)
                done = (int(latest.values["frames_processed"]) - (base.get("frames_processed") or 0)
                        + int(latest.values["frames_dropped"]) - (base.get("frames_dropped") or 0))
            except (KeyError, ValueError):
                return False
            return got >= len(wanted) and done >= got

        try:
            self.wait_until(settled, max(0.0, deadline - time.monotonic()), "the node to settle")
            time.sleep(0.3)  # a pose may still be in flight behind the diagnostics that named its frame
        except TimeoutError:
            pass
        count = self.diagnostics_count
        try:
            self.wait_until(lambda: self.diagnostics_count > count, 1.5, "one more diagnostics message")
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ sending
    def image_publisher(self, compressed: bool = False):
        """The raw (``image_topic``) or compressed (``image_topic/compressed``) image publisher."""
        if compressed not in self._image_pubs:
            from sensor_msgs.msg import CompressedImage, Image

            topic = self.image_topic.rstrip("/") + "/compressed" if compressed else self.image_topic
            self._image_pubs[compressed] = self.node.create_publisher(
                CompressedImage if compressed else Image, topic, self._image_qos_profile)
        return self._image_pubs[compressed]

    def next_stamp(self) -> int:
        """The wall clock now in ns, later than any stamp sent before (answers are matched by stamp)."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    @staticmethod
    def _stamped(msg: Any, stamp_ns: int, frame_id: str) -> Any:
        from d2s_nerf_ros.tf_math import ns_to_stamp_fields

        ns_to_stamp_fields(stamp_ns, msg.header.stamp)
        msg.header.frame_id = frame_id
        return msg

    def send_info(self, info_fields: Mapping[str, Any], stamp_ns: int | None = None,
                  frame_id: str = CAMERA_FRAME_ID) -> int:
        """Publish one CameraInfo (fields as for ``sensor_msgs/CameraInfo``); returns its stamp."""
        from sensor_msgs.msg import CameraInfo

        stamp_ns = stamp_ns or self.next_stamp()
        self.info_pub.publish(self._stamped(CameraInfo(**info_fields), stamp_ns, frame_id))
        return stamp_ns

    def prime_camera_info(self, info_fields: Mapping[str, Any], settle_s: float = 0.3) -> None:
        """Give the node a CameraInfo before the first image races it (it uses the newest one)."""
        self.send_info(info_fields)
        time.sleep(settle_s)

    def send_image(self, fields: Mapping[str, Any], compressed: bool = False, stamp_ns: int | None = None,
                   frame_id: str = CAMERA_FRAME_ID) -> int:
        """Publish one image (``Image`` fields, or ``CompressedImage`` fields with ``compressed``); returns its stamp."""
        from sensor_msgs.msg import CompressedImage, Image

        stamp_ns = stamp_ns or self.next_stamp()
        msg = (CompressedImage if compressed else Image)(**fields)
        self.image_publisher(compressed).publish(self._stamped(msg, stamp_ns, frame_id))
        return stamp_ns

    def send(self, image: Mapping[str, Any], info_fields: Mapping[str, Any], compressed: bool = False,
             frame_id: str = CAMERA_FRAME_ID) -> int:
        """One camera frame as a driver sends it: CameraInfo then the image, one stamp; returns it."""
        stamp_ns = self.next_stamp()
        self.send_info(info_fields, stamp_ns, frame_id)
        return self.send_image(image, compressed, stamp_ns, frame_id)

    def frame_result(self, fields: Mapping[str, Any], compressed: bool = False, attempts: int = 3,
                     timeout_s: float = 30.0) -> str:
        """Send one image and return the node's verdict on it (diagnostics' ``last_frame_result``).

        A best-effort image may be lost on a busy machine (and a reliable one replaced by a newer
        frame in the node's one-slot mailbox): after ``timeout_s`` it is re-sent with a new stamp.
        """
        for _ in range(attempts):
            stamp = self.send_image(fields, compressed)
            try:
                return self.wait_verdict(stamp, timeout_s).values["last_frame_result"]
            except TimeoutError:
                continue
        raise TimeoutError(f"the node gave no verdict on {attempts} frames in a row; "
                           f"last diagnostics: {self.latest_diagnostics()}")


__all__ = ["CAMERA_FRAME_ID", "DEFAULT_CAMERA_INFO_TOPIC", "DEFAULT_IMAGE_TOPIC", "DEFAULT_POSE_TOPIC",
           "DiagnosticRecord", "IMAGE_QOS_CHOICES", "LocalizerClient", "NodeNotReady", "PoseRecord", "image_fields",
           "jpeg_fields"]
