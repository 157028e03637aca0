"""``benchmark.py delivery``: do raw camera frames reach the node? With and without the Fast DDS profile.

Two measurements, each with the package's profile (``config/fastdds_shm_large.xml`` exported as
``FASTDDS_DEFAULT_PROFILES_FILE``) and without it (Fast DDS's built-in transports), at 1, 10 and
30 Hz, 640x480 rgb8, best effort (``sensor_data``) on both sides, as a camera driver and the node
use by default:

1. transport alone: a publisher process and a subscriber process (no node), frames counted;
2. through the node: the localizer node as its own process and ``offline.replay.replay`` in
   another, sending held-out RedKitchen frames; frames the node received, poses back, pose rate.

Every process is separate because Fast DDS reads the profile once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from offline.bench.common import (BENCH_MD, DEFAULT_DATA, REPO, load_average, machine_line, publish_section,
                                  shown_command)

DELIVERY_RATES_HZ = (1.0, 10.0, 30.0)
DELIVERY_WIDTH, DELIVERY_HEIGHT = 640, 480
DISCOVERY_TIMEOUT_S = 30.0
PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"
TOPIC = "/d2s_bench/delivery"


def frames_at(rate_hz: float, seconds: float) -> int:
    return max(10, int(round(rate_hz * seconds)))


def dds_env(with_profile: bool) -> dict[str, str]:
    """Loopback DDS on this process's domain, with or without the package's Fast DDS profile."""
    from offline.demo import fastdds_profile_path, ros_loopback_env

    env = ros_loopback_env()
    env.pop(PROFILE_VARIABLE, None)
    if with_profile:
        env[PROFILE_VARIABLE] = str(fastdds_profile_path())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# --------------------------------------------------------------------------- child processes

def _subscribe(seconds: float, out: Path) -> None:
    """Count the frames arriving on TOPIC (sensor_data QoS) for ``seconds``; write the count to ``out``."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node(f"d2s_delivery_sub_{os.getpid()}")
    seen: set[str] = set()
    node.create_subscription(Image, TOPIC, lambda m: seen.add(m.header.frame_id), qos_profile_sensor_data)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    out.write_text(json.dumps({"received": len(seen)}))
    node.destroy_node()
    rclpy.shutdown()


def _publish(rate_hz: float, n_frames: int, out: Path) -> None:
    """Publish ``n_frames`` 640x480 rgb8 images on TOPIC at ``rate_hz``, best effort, once a subscriber matched."""
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node(f"d2s_delivery_pub_{os.getpid()}")
    pub = node.create_publisher(Image, TOPIC, qos_profile_sensor_data)
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while pub.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no subscriber on {TOPIC} after {DISCOVERY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    time.sleep(1.0)  # discovery of the reader's shared-memory locator completes after the match
    pixels = np.random.default_rng(0).integers(0, 256, DELIVERY_WIDTH * DELIVERY_HEIGHT * 3, dtype=np.uint8).tobytes()
    msg = Image(height=DELIVERY_HEIGHT, width=DELIVERY_WIDTH, encoding="rgb8", step=3 * DELIVERY_WIDTH, data=pixels)
    start = time.monotonic()
    for i in range(n_frames):
        time.sleep(max(0.0, start + i / rate_hz - time.monotonic()))
        msg.header.frame_id = str(i)
        pub.publish(msg)
    out.write_text(json.dumps({"sent": n_frames, "send_s": time.monotonic() - start}))
    time.sleep(1.0)  # let the last frames leave before the participant goes
    node.destroy_node()
    rclpy.shutdown()


def _replay(data: str, map_dir: str, rate_hz: float, n_frames: int, out: Path) -> None:
    """Held-out frames of ``data`` (not in the map) sent to the running node at ``rate_hz`` by ``replay``."""
    import itertools

    from offline.replay import replay
    from offline.sources.sevenscenes import load_sevenscenes

    mapping = {f["name"] for f in json.loads((Path(map_dir) / "manifest.json").read_text()).get("frames", [])}
    held_out = [f for f in load_sevenscenes(data).frames if f.name not in mapping][::12][:40]
    frames = list(itertools.islice(itertools.cycle(held_out), n_frames))
    replay(frames, out.parent / out.stem, rate_hz=rate_hz, timeout_s=20.0, image_qos="sensor_data", log=lambda *_: None)
    os.replace(out.parent / out.stem / "replay.json", out)


def _run_child(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "offline.bench.delivery", *args], env=env, stdout=f,
                                stderr=subprocess.STDOUT, cwd=REPO)


def _wait(proc: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not finish in {timeout_s:.0f} s; see {log}")
    if rc != 0:
        raise RuntimeError(f"{what} exited with status {rc}; see {log}")


# --------------------------------------------------------------------------- measurements

def measure_transport(rate_hz: float, n_frames: int, with_profile: bool, runs: Path) -> dict[str, float]:
    """Frames a best-effort subscriber process got of ``n_frames`` sent by a publisher process."""
    env = dds_env(with_profile)
    tag = f"{'profile' if with_profile else 'builtin'}_{rate_hz:g}hz"
    log = runs / f"delivery_{tag}.log"
    log.write_bytes(b"")
    listen_s = 1.0 + DISCOVERY_TIMEOUT_S / 3 + n_frames / rate_hz + 3.0
    sub_out, pub_out = runs / f"delivery_{tag}.sub.json", runs / f"delivery_{tag}.pub.json"
    sub = _run_child(["subscribe", str(listen_s), str(sub_out)], env, log)
    try:
        time.sleep(2.0)  # the subscriber's rclpy is up before the publisher starts sending
        pub = _run_child(["publish", str(rate_hz), str(n_frames), str(pub_out)], env, log)
        _wait(pub, listen_s + DISCOVERY_TIMEOUT_S, "the publisher", log)
        _wait(sub, listen_s + 30.0, "the subscriber", log)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    received = json.loads(sub_out.read_text())["received"]
    return {"sent": n_frames, "received": received, "share": received / n_frames}


def measure_node(map_dir: Path, data: Path, rate_hz: float, n_frames: int, with_profile: bool,
                 runs: Path) -> dict[str, float | None]:
    """One replay at ``rate_hz`` to a running node (started by the caller with the same environment)."""
    env = dds_env(with_profile)
    tag = f"{'profile' if with_profile else 'builtin'}_{rate_hz:g}hz"
    log = runs / f"delivery_node_{tag}.log"
    log.write_bytes(b"")
    out = runs / f"delivery_node_{tag}.json"
    proc = _run_child(["replay", str(data), str(map_dir), str(rate_hz), str(n_frames), str(out)], env, log)
    _wait(proc, 120.0 + n_frames / rate_hz, "the replay", log)
    r = json.loads(out.read_text())
    return {"sent": r["n_sent"], "received_by_node": r["n_received_by_node"], "poses": r["n_poses"],
            "pose_rate_hz": r["n_poses"] / r["send_duration_s"] if r["send_duration_s"] > 0 else None,
            "dropped": r["dropped"], "median_translation_m": r["median_translation_m"]}


def bench_delivery(args) -> None:
    from offline.bench.node import NODE_READY_TIMEOUT_S
    from offline.node_process import ChildProcess, localizer_node_command

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rates = args.rates
    load0 = load_average()
    transport: dict[tuple[bool, float], dict] = {}
    for with_profile in (True, False):
        for rate in rates:
            transport[with_profile, rate] = measure_transport(rate, frames_at(rate, args.seconds), with_profile, runs)
            print(f"transport {'profile' if with_profile else 'built-in'} {rate:g} Hz: {transport[with_profile, rate]}",
                  flush=True)

    node_rows: dict[tuple[bool, float], dict] = {}
    map_dir = Path(args.map) if args.map else None
    if map_dir is not None:
        if not (map_dir / "manifest.json").is_file():
            sys.exit(f"no map at {map_dir}")
        params = {"map_path": str(map_dir.resolve()), "device": "cpu", "odom_frame": "", "base_frame": ""}
        for with_profile in (True, False):
            node_log = runs / f"delivery_node_{'profile' if with_profile else 'builtin'}.node.log"
            node = ChildProcess(localizer_node_command(params), node_log, env=dds_env(with_profile), cwd=REPO)
            try:
                _wait_node_ready(node, node_log, NODE_READY_TIMEOUT_S)
                for rate in rates:
                    n = frames_at(rate, args.node_seconds)
                    node_rows[with_profile, rate] = measure_node(map_dir, Path(args.data), rate, n, with_profile, runs)
                    print(f"node {'profile' if with_profile else 'built-in'} {rate:g} Hz: {node_rows[with_profile, rate]}",
                          flush=True)
            finally:
                node.stop()
    load1 = load_average()
    result = {"transport": {f"{'profile' if k[0] else 'builtin'}@{k[1]:g}": v for k, v in transport.items()},
              "node": {f"{'profile' if k[0] else 'builtin'}@{k[1]:g}": v for k, v in node_rows.items()}}
    (runs / "delivery.json").write_text(json.dumps(result, indent=1))

    def cell(row: dict | None, key: str, total: str) -> str:
        if row is None or row.get(key) is None:
            return "n/a"
        return f"{row[key]}/{row[total]} ({100 * row[key] / row[total]:.0f} %)"

    lines = ["| rate | transport, profile | transport, built-in | node received, profile | node received, built-in "
             "| poses (rate), profile | poses (rate), built-in |", "|---|---|---|---|---|---|---|"]
    for rate in rates:
        cells = [f"{rate:g} Hz"]
        cells += [cell(transport[True, rate], "received", "sent"), cell(transport[False, rate], "received", "sent")]
        for with_profile in (True, False):
            cells.append(cell(node_rows.get((with_profile, rate)), "received_by_node", "sent"))
        for with_profile in (True, False):
            row = node_rows.get((with_profile, rate))
            cells.append("n/a" if row is None else f"{row['poses']}/{row['sent']} ({row['pose_rate_hz']:.2f} Hz)")
        lines.append("| " + " | ".join(cells) + " |")
    command = shown_command(args, "delivery", always=("map",) if args.map else ())
    shown_map = "" if map_dir is None else (os.path.relpath(map_dir.resolve(), REPO)
                                           if map_dir.resolve().is_relative_to(REPO) else str(map_dir))
    body = f"""## ROS 2 transport: raw 640x480 rgb8 frames with and without the Fast DDS profile

- Command: `{command}`
{machine_line(load0, load1)}
  (a shared CPU: other builds ran beside it).
- Profile: `config/fastdds_shm_large.xml` (32 MB shared-memory segment) exported as `FASTDDS_DEFAULT_PROFILES_FILE` in every
  process; built-in: the variable unset (Fast DDS's default transports, a ~0.5 MB segment). Loopback DDS, best effort
  (`sensor_data`) on both sides, as a camera driver and the node use by default.
- Transport: a publisher process sends {', '.join(f'{frames_at(r, args.seconds)} frames at {r:g} Hz' for r in rates)}
  to a subscriber process (no node); frames counted by the subscriber.
- Node: {'not measured (no --map given)' if map_dir is None else f'the localizer (`-p device:=cpu`, camera pose, no TF) with map `{shown_map}`; `offline.replay.replay` in its own process sends held-out RedKitchen frames (frames of the same recording as the mapping frames, not the 7-Scenes test split), ' + ', '.join(f'{frames_at(r, args.node_seconds)} at {r:g} Hz' for r in rates) + '. The node processes the newest frame only, so whatever arrives while it works on a frame is dropped by design and its processing time on this shared CPU bounds the pose rate (poses over the sending time).'}

{chr(10).join(lines)}
"""
    publish_section("delivery", body, args.benchmarks_file)


def _wait_node_ready(node, node_log: Path, timeout_s: float) -> None:
    """Until the node logs that it is ready (its own line), or exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.alive():
            raise RuntimeError(f"the node exited with status {node.returncode}:\n{node_log.read_text(errors='replace')[-2000:]}")
        if "ready: map" in node_log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node was not ready after {timeout_s:.0f} s; see {node_log}")


def add_delivery_parser(sub) -> None:
    d = sub.add_parser("delivery", help="raw 640x480 frames over DDS at 1/10/30 Hz, with and without the Fast DDS profile")
    d.add_argument("--map", help="map bundle: also measure the node's received frames and pose rate")
    d.add_argument("--data", default=str(DEFAULT_DATA))
    d.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    d.add_argument("--rates", type=float, nargs="+", default=list(DELIVERY_RATES_HZ))
    d.add_argument("--seconds", type=float, default=10.0, help="sending time per transport run (at least 10 frames)")
    d.add_argument("--node-seconds", type=float, default=20.0, help="sending time per node run (at least 10 frames)")
    d.add_argument("--benchmarks-file", default=str(BENCH_MD), help="markdown file whose section is rewritten")
    d.set_defaults(func=bench_delivery, parser=d)


def main(argv: list[str] | None = None) -> None:
    """Child-process roles: ``subscribe SECONDS OUT``, ``publish RATE N OUT``, ``replay DATA MAP RATE N OUT``."""
    argv = sys.argv[1:] if argv is None else argv
    role, rest = argv[0], argv[1:]
    if role == "subscribe":
        _subscribe(float(rest[0]), Path(rest[1]))
    elif role == "publish":
        _publish(float(rest[0]), int(rest[1]), Path(rest[2]))
    elif role == "replay":
        _replay(rest[0], rest[1], float(rest[2]), int(rest[3]), Path(rest[4]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
