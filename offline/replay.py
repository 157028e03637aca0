"""Replay posed frames to a running localizer node over DDS and score what comes back.

    d2s-nerf replay ../shared/data/7scenes_redkitchen --rate 2 --out runs/replay --every 20

``replay()`` publishes each frame's image (``sensor_msgs/Image`` rgb8, or ``CompressedImage``
JPEG on ``<image_topic>/compressed``) and its ``CameraInfo``, both stamped with the wall
clock at sending time, at a fixed rate; it collects the node's poses (matched to frames by
stamp) and its diagnostics, and writes ``out_dir/replay.json``:

    n_sent, n_poses, n_received_by_node, median_translation_m, median_rotation_deg
    (over the frames that got a pose), recall_5cm_5deg and recall_10cm_10deg (over all frames
    sent: a frame without a pose counts as a miss), latency_ms {p50, p90, mean} (image stamp
    -> pose received, end to end through DDS), dropped (frames the node replaced before
    processing them, from its diagnostics), and one row per frame.

The node must publish the camera pose (``base_frame`` empty), since that is what the frames'
ground truth describes. Stamps are the replay's own wall-clock times, not the dataset's, so
the node's latency figures mean what they say.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import pose_error
from offline.sources.frames import Frame, FrameSet

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
DEFAULT_CAMERA_INFO_TOPIC = "/camera/camera_info"
DEFAULT_POSE_TOPIC = "/localizer/pose"
DIAGNOSTICS_TOPIC = "/diagnostics"
CAMERA_FRAME_ID = "camera"
JPEG_QUALITY = 95


def camera_info_fields(camera: CameraIntrinsics) -> dict[str, Any]:
    """The fields of a ``sensor_msgs/CameraInfo`` describing ``camera`` (no rectification)."""
    if camera.distortion_model == "none":
        model, d = "plumb_bob", [0.0] * 5
    elif camera.distortion_model in ("plumb_bob", "rational_polynomial"):
        d = [float(v) for v in camera.distortion]
        model = "rational_polynomial" if len(d) >= 8 else "plumb_bob"
    else:
        model, d = "equidistant", [float(v) for v in camera.distortion]
    fx, fy, cx, cy = float(camera.fx), float(camera.fy), float(camera.cx), float(camera.cy)
    return {
        "width": int(camera.width), "height": int(camera.height), "distortion_model": model, "d": d,
        "k": [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0],
        "r": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "p": [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0],
    }


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


class PoseCollector:
    """What a localizer node sends back, for a ROS subscriber to fill and another thread to read.

    Subscribe ``on_pose`` to the node's ``PoseWithCovarianceStamped`` topic and ``on_diagnostics``
    to ``/diagnostics``; they run on the executor's thread, so read the fields under ``lock``:

    - ``poses``: image stamp (ns) -> (4x4 pose, wall-clock ns when it arrived, 6x6 covariance as
      36 floats), so each pose is matched to the frame it answers;
    - ``diagnostics``: the key/values of the newest status named ``diagnostic_name`` (None before
      the first), and ``diagnostics_count``, how many such statuses arrived;
    - ``counter(key)``: one integer diagnostics value, None while absent or not an integer.

    ``lock`` may be replaced by a ``threading.Condition`` in a subclass that wants to wake a
    waiting thread on each arrival.
    """

    def __init__(self, diagnostic_name: str) -> None:
        self.lock = threading.Lock()
        self.poses: dict[int, tuple[np.ndarray, int, list[float]]] = {}  # stamp -> (T, received ns, covariance)
        self.diagnostics: dict[str, str] | None = None
        self.diagnostics_count = 0
        self.diagnostic_name = diagnostic_name

    def on_pose(self, msg: Any) -> None:
        from d2s_nerf_ros.tf_math import pose_from_msg, stamp_to_ns

        received = time.time_ns()
        try:
            T = pose_from_msg(msg.pose.pose)
        except ValueError:
            return
        with self.lock:
            self.poses[stamp_to_ns(msg.header.stamp)] = (T, received, list(msg.pose.covariance))

    def on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == self.diagnostic_name:
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}
                    self.diagnostics_count += 1

    def counter(self, key: str) -> int | None:
        with self.lock:
            if self.diagnostics is None or key not in self.diagnostics:
                return None
            try:
                return int(self.diagnostics[key])
            except ValueError:
                return None


def replay(
    frames: FrameSet | Sequence[Frame],
    out_dir: Path | str,
    rate_hz: float,
    image_topic: str = DEFAULT_IMAGE_TOPIC,
    camera_info_topic: str = DEFAULT_CAMERA_INFO_TOPIC,
    compressed: bool = False,
    pose_topic: str = DEFAULT_POSE_TOPIC,
    timeout_s: float = 30.0,
    discovery_timeout_s: float = 30.0,
    log=print,
) -> dict[str, Any]:
    """Publish ``frames`` at ``rate_hz`` to a running localizer, score its poses, write replay.json.

    ``timeout_s``: how long to wait for outstanding poses after the last frame was sent.
    ``discovery_timeout_s``: how long to wait for the node's subscriptions to match ours;
    ``RuntimeError`` when no node shows up. Returns the dict written to ``out_dir/replay.json``.
    """
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    from d2s_nerf_ros.image_conversion import numpy_to_image_fields
    from d2s_nerf_ros.node import DIAGNOSTIC_NAME
    from d2s_nerf_ros.tf_math import ns_to_stamp_fields

    frame_list = list(frames.frames if isinstance(frames, FrameSet) else frames)
    if not frame_list:
        raise ValueError("replay needs at least one frame")
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate must be a positive number of frames per second, got {rate_hz!r}")
    if not (math.isfinite(timeout_s) and timeout_s >= 0):
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout_s!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    send_topic = image_topic.rstrip("/") + "/compressed" if compressed else image_topic

    context = Context()
    rclpy.init(context=context)
    collector = PoseCollector(DIAGNOSTIC_NAME)
    executor = None
    spin_thread = None
    try:
        node = rclpy.create_node(f"d2s_replay_{os.getpid()}", context=context)
        # Reliable publishers match both reliable and best-effort (sensor-data) subscribers.
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = node.create_publisher(CompressedImage if compressed else Image, send_topic, qos)
        info_pub = node.create_publisher(CameraInfo, camera_info_topic, qos)
        pose_sub = node.create_subscription(PoseWithCovarianceStamped, pose_topic, collector.on_pose, 50)
        node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC, collector.on_diagnostics, 10)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        spin_thread = threading.Thread(target=executor.spin, name="replay-spin", daemon=True)
        spin_thread.start()

        deadline = time.monotonic() + discovery_timeout_s
        while image_pub.get_subscription_count() == 0 or pose_sub.get_publisher_count() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no localizer found after {discovery_timeout_s:.0f} s: subscribers on {send_topic}: "
                    f"{image_pub.get_subscription_count()}, publishers on {pose_topic}: {pose_sub.get_publisher_count()} "
                    f"(is the node running with the same ROS_DOMAIN_ID and topics?)")
            time.sleep(0.05)
        # Counters before we start, so earlier traffic is not charged to this run.
        first_diag_deadline = time.monotonic() + 2.5
        while collector.counter("frames_dropped") is None and time.monotonic() < first_diag_deadline:
            time.sleep(0.05)
        base = {key: collector.counter(key) or 0 for key in ("frames_dropped", "frames_received", "frames_processed")}

        # The node uses the newest CameraInfo: give it one before the first image races it.
        first_info = CameraInfo(**camera_info_fields(frame_list[0].camera))
        ns_to_stamp_fields(time.time_ns(), first_info.header.stamp)
        first_info.header.frame_id = CAMERA_FRAME_ID
        info_pub.publish(first_info)
        time.sleep(0.3)

        log(f"replaying {len(frame_list)} frames at {rate_hz:g} Hz on {send_topic}")
        sent: list[tuple[Frame, int]] = []
        period_ns = int(1e9 / rate_hz)
        start_ns = time.monotonic_ns()
        last_stamp = 0
        for i, frame in enumerate(frame_list):
            rgb = frame.load_rgb()
            if compressed:
                import cv2

                ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise RuntimeError(f"cannot JPEG-encode frame {frame.name}")
                image_msg = CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
            else:
                image_msg = Image(**numpy_to_image_fields(rgb, "rgb8"))
            info_msg = CameraInfo(**camera_info_fields(frame.camera))
            wait_ns = start_ns + i * period_ns - time.monotonic_ns()
            if wait_ns > 0:
                time.sleep(wait_ns * 1e-9)
            stamp_ns = max(time.time_ns(), last_stamp + 1)  # unique stamps: poses are matched by stamp
            last_stamp = stamp_ns
            for msg in (info_msg, image_msg):
                ns_to_stamp_fields(stamp_ns, msg.header.stamp)
                msg.header.frame_id = CAMERA_FRAME_ID
            info_pub.publish(info_msg)
            image_pub.publish(image_msg)
            sent.append((frame, stamp_ns))
        send_duration_s = (time.monotonic_ns() - start_ns) * 1e-9

        # Wait for the outstanding poses, or until the node's counters show every frame accounted for.
        wanted = {stamp for _, stamp in sent}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with collector.lock:
                have = wanted <= set(collector.poses)
                diag = dict(collector.diagnostics or {})
            if have:
                break
            if diag.get("last_frame_stamp_ns") == str(last_stamp):
                time.sleep(0.3)  # the last pose may still be in flight
                break
            received = collector.counter("frames_received")
            processed = collector.counter("frames_processed")
            dropped_now = collector.counter("frames_dropped")
            if None not in (received, processed, dropped_now):
                got = received - base["frames_received"]
                if got >= len(sent) and (processed - base["frames_processed"]) + (dropped_now - base["frames_dropped"]) >= got:
                    time.sleep(0.3)
                    break
            time.sleep(0.05)
        # One more diagnostics message so the drop counter includes the end of the run.
        count = collector.diagnostics_count
        settle = time.monotonic() + 1.5
        while collector.diagnostics_count == count and time.monotonic() < settle:
            time.sleep(0.05)
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if spin_thread is not None:
            spin_thread.join(timeout=2.0)
        rclpy.try_shutdown(context=context)

    with collector.lock:
        poses = dict(collector.poses)
    rows = []
    for frame, stamp in sent:
        row: dict[str, Any] = {"name": frame.name, "stamp_ns": stamp, "localized": stamp in poses}
        if stamp in poses:
            T, received_ns, covariance = poses[stamp]
            t_err, r_err = pose_error(T, frame.T_world_cam)
            row.update(translation_error_m=t_err, rotation_error_deg=r_err, latency_ms=(received_ns - stamp) * 1e-6,
                       position_std_m=[math.sqrt(max(covariance[i * 7], 0.0)) for i in range(3)])
        rows.append(row)
    hits = [r for r in rows if r["localized"]]
    t_errs = [r["translation_error_m"] for r in hits]
    r_errs = [r["rotation_error_deg"] for r in hits]
    latencies = [r["latency_ms"] for r in hits]

    def recall(t_max: float, r_max: float) -> float:
        return sum(1 for r in hits if r["translation_error_m"] <= t_max and r["rotation_error_deg"] <= r_max) / len(rows)

    dropped = collector.counter("frames_dropped")
    received = collector.counter("frames_received")
    # A counter that went down belongs to another (restarted) node: no honest delta then.
    dropped = None if dropped is None or dropped < base["frames_dropped"] else dropped
    received = None if received is None or received < base["frames_received"] else received
    result = {
        "n_sent": len(rows),
        "n_poses": len(hits),
        "n_received_by_node": None if received is None else received - base["frames_received"],
        "median_translation_m": _percentile(t_errs, 50),
        "median_rotation_deg": _percentile(r_errs, 50),
        "recall_5cm_5deg": recall(0.05, 5.0),
        "recall_10cm_10deg": recall(0.10, 10.0),
        "latency_ms": {"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                       "mean": float(np.mean(latencies)) if latencies else None},
        "dropped": None if dropped is None else dropped - base["frames_dropped"],
        "rate_hz": rate_hz,
        "send_duration_s": send_duration_s,
        "compressed": compressed,
        "topics": {"image": send_topic, "camera_info": camera_info_topic, "pose": pose_topic},
        "frames": rows,
    }
    path = out_dir / "replay.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False))
    os.replace(tmp, path)
    log(f"replay: {len(hits)}/{len(rows)} poses, recall 5cm/5deg {result['recall_5cm_5deg']:.2f}, "
        f"latency p50 {result['latency_ms']['p50']} ms, dropped {result['dropped']} -> {path}")
    return result
