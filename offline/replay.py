"""Replay posed frames to a running localizer node over DDS and score what comes back.

    d2s-nerf replay ../shared/data/7scenes_redkitchen --rate 2 --out runs/replay --every 20

``replay()`` publishes each frame's image (``sensor_msgs/Image`` rgb8, or ``CompressedImage``
JPEG on ``<image_topic>/compressed``) and its ``CameraInfo``, both stamped with the wall
clock at sending time, at a fixed rate; it collects the node's poses (matched to frames by
stamp) and its diagnostics through ``offline.ros_client.LocalizerClient``, and writes ``out_dir/replay.json``:

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
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import pose_error
from offline.ros_client import DEFAULT_CAMERA_INFO_TOPIC, DEFAULT_IMAGE_TOPIC, DEFAULT_POSE_TOPIC
from offline.sources.frames import Frame, FrameSet

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
    image_qos: str = "sensor_data",
    log=print,
) -> dict[str, Any]:
    """Publish ``frames`` at ``rate_hz`` to a running localizer, score its poses, write replay.json.

    ``image_qos``: ``sensor_data`` (best effort, as a camera driver publishes) or ``reliable``.
    Raw images of 640x480 and more reach a best-effort reader only with the Fast DDS profile
    exported (``offline.demo.ros_loopback_env``; ``d2s-nerf replay`` does that).
    ``timeout_s``: how long to wait for outstanding poses after the last frame was sent.
    ``discovery_timeout_s``: how long to wait for the node's subscriptions to match ours;
    ``NodeNotReady`` (a ``RuntimeError``) when no node shows up. Returns the dict written to
    ``out_dir/replay.json``.
    """
    from offline.ros_client import LocalizerClient, image_fields, jpeg_fields

    frame_list = list(frames.frames if isinstance(frames, FrameSet) else frames)
    if not frame_list:
        raise ValueError("replay needs at least one frame")
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate must be a positive number of frames per second, got {rate_hz!r}")
    if not (math.isfinite(timeout_s) and timeout_s >= 0):
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout_s!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with LocalizerClient(image_topic, camera_info_topic, pose_topic, image_qos=image_qos, name="d2s_replay") as client:
        send_topic = client.image_publisher(compressed).topic_name
        client.wait_ready(discovery_timeout_s, compressed=compressed, need_diagnostics=False)
        # Counters before we start, so earlier traffic is not charged to this run.
        try:
            client.wait_until(lambda: client.diagnostics, 2.5, "the node's diagnostics")
        except TimeoutError:
            pass
        base = {key: value or 0 for key, value in client.counters().items()}
        client.prime_camera_info(camera_info_fields(frame_list[0].camera))

        log(f"replaying {len(frame_list)} frames at {rate_hz:g} Hz on {send_topic} ({image_qos})")
        sent: list[tuple[Frame, int]] = []
        period_ns = int(1e9 / rate_hz)
        start_ns = time.monotonic_ns()
        for i, frame in enumerate(frame_list):
            rgb = frame.load_rgb()
            image = jpeg_fields(rgb, JPEG_QUALITY) if compressed else image_fields(rgb)
            info = camera_info_fields(frame.camera)
            wait_ns = start_ns + i * period_ns - time.monotonic_ns()
            if wait_ns > 0:
                time.sleep(wait_ns * 1e-9)
            sent.append((frame, client.send(image, info, compressed=compressed)))
        send_duration_s = (time.monotonic_ns() - start_ns) * 1e-9
        client.wait_settled([stamp for _, stamp in sent], base, timeout_s)
        poses = {stamp: client.pose(stamp) for _, stamp in sent}
        counters = client.counters()

    rows = []
    for frame, stamp in sent:
        row: dict[str, Any] = {"name": frame.name, "stamp_ns": stamp, "localized": poses[stamp] is not None}
        record = poses[stamp]
        if record is not None:
            t_err, r_err = pose_error(record.T, frame.T_world_cam)
            row.update(translation_error_m=t_err, rotation_error_deg=r_err, latency_ms=(record.received_ns - stamp) * 1e-6,
                       position_std_m=[math.sqrt(max(record.covariance[i * 7], 0.0)) for i in range(3)])
        rows.append(row)
    hits = [r for r in rows if r["localized"]]
    t_errs = [r["translation_error_m"] for r in hits]
    r_errs = [r["rotation_error_deg"] for r in hits]
    latencies = [r["latency_ms"] for r in hits]

    def recall(t_max: float, r_max: float) -> float:
        return sum(1 for r in hits if r["translation_error_m"] <= t_max and r["rotation_error_deg"] <= r_max) / len(rows)

    dropped, received = counters["frames_dropped"], counters["frames_received"]
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
        "image_qos": image_qos,
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
