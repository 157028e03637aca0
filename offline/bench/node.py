"""``benchmark.py node-latency`` and ``soak``: the localizer node as its own process, fed over DDS."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

from offline.bench.common import (BENCH_MD, DEFAULT_DATA, REPO, fmt_deg, fmt_m, fmt_ms, fmt_pct, load_average,
                                  held_out_frames, machine, machine_line, percentile, publish_section,
                                  shown_command)
from offline.node_process import LocalizerNodeProcess, localizer_node_command

NODE_READY_TIMEOUT_S = 180.0   # torch import + map load + warm-up on 2 busy cores
SOAK_MAP_FRAMES = 60           # demo-room views the soak map is built from (depth-labelled, exact poses)
SOAK_CYCLE_VIEWS = 60          # distinct held-out demo-room views the soak cycles through


def proc_rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line (is the process a zombie?)")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")



class NodeUnderTest(LocalizerNodeProcess):
    """``python -m d2s_nerf_ros.node`` as a child process (its own PID, so /proc gives its RSS and CPU time);
    stdout and stderr together in ``log_path``."""

    def __init__(self, params: dict[str, object], log_path: Path, env: dict[str, str]) -> None:
        print("$", shlex.join(localizer_node_command(params)), flush=True)
        super().__init__(params, log_path, env=env, cwd=REPO)
        self.log_path = log_path

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def image_and_info(rgb, camera) -> tuple[dict, dict]:
    """``Image`` (rgb8) and ``CameraInfo`` fields of one frame, for ``LocalizerClient.send``."""
    from offline.replay import camera_info_fields
    from offline.ros_client import image_fields

    return image_fields(rgb), camera_info_fields(camera)


def start_client(node: NodeUnderTest, image_qos: str, timeout_s: float = NODE_READY_TIMEOUT_S):
    """A ``LocalizerClient`` once ``node`` (loaded and warmed up) subscribes to its topics and sends
    diagnostics; the node's log tail in the error when it does not."""
    from offline.ros_client import LocalizerClient, NodeNotReady

    client = LocalizerClient(image_qos=image_qos, name="d2s_bench")
    try:
        client.wait_ready(timeout_s, node_alive=node.alive, hardware_id=node.params["map_path"])
    except NodeNotReady as exc:
        client.close()
        raise RuntimeError(f"{exc} (node status {node.returncode}):\n{node.log_tail()}") from exc
    return client


def run_node_latency(params: dict[str, object], queries, args, runs: Path, tag: str) -> dict:
    """One node process with ``params``, the ``queries`` sent one at a time; its latency, accuracy and costs."""
    import numpy as np

    from d2s_nerf_ros.geometry import pose_error
    from offline.demo import ros_loopback_env

    env = ros_loopback_env()
    os.environ.update(env)
    load0 = load_average()
    node = NodeUnderTest(params, runs / f"node_latency_node{tag}.log", env)
    driver = None
    rows = []
    try:
        t_start = time.monotonic()
        driver = start_client(node, args.image_qos)
        startup_s = time.monotonic() - t_start
        rss_start = proc_rss_kib(node.pid)
        driver.prime_camera_info(image_and_info(queries[0].load_rgb(), queries[0].camera)[1])
        base = driver.counters()
        cpu0 = proc_cpu_s(node.pid)
        next_send = time.monotonic()
        for i, frame in enumerate(queries):
            image, info = image_and_info(frame.load_rgb(), frame.camera)
            time.sleep(max(0.0, next_send - time.monotonic()))
            stamp = driver.send(image, info)
            sent_mono = time.monotonic()
            answer, received_ns = driver.wait_answer(stamp, args.answer_timeout)
            row = {"name": frame.name, "stamp_ns": stamp, "answer": answer}
            if answer == "pose":
                t_err, r_err = pose_error(driver.pose(stamp).T, frame.T_world_cam)
                row.update(latency_ms=(received_ns - stamp) * 1e-6, translation_error_m=t_err, rotation_error_deg=r_err)
            rows.append(row)
            print(f"  {tag.strip('-') or 'node'} {i + 1}/{len(queries)} {frame.name}: {answer}"
                  + (f" {row['latency_ms']:.0f} ms, {100 * row['translation_error_m']:.1f} cm" if answer == "pose" else ""),
                  flush=True)
            # The next frame no sooner than 1/rate after this one and an idle gap after its answer.
            next_send = max(sent_mono + 1.0 / args.rate, time.monotonic() + args.gap)
        cpu_s = proc_cpu_s(node.pid) - cpu0
        rss_end = proc_rss_kib(node.pid)
        time.sleep(1.5)  # one more diagnostics message after the last frame
        latest = driver.latest_diagnostics()
        counters, diag = driver.counters(), dict(latest.values) if latest else {}
    finally:
        if driver is not None:
            driver.close()
        rc = node.stop()
    load1 = load_average()
    if rc not in (0, None):
        print(f"warning: the node exited with status {rc}; see {node.log_path}", file=sys.stderr)

    hits = [r for r in rows if r["answer"] == "pose"]
    latencies = [r["latency_ms"] for r in hits]
    t_errs = [r["translation_error_m"] for r in hits]
    r_errs = [r["rotation_error_deg"] for r in hits]
    delta = {k: (None if counters[k] is None or base[k] is None else counters[k] - base[k]) for k in counters}
    return {
        "params": params, "load_before": load0, "load_after": load1,
        "n_sent": len(rows), "n_poses": len(hits), "n_failed": sum(r["answer"] == "failed" for r in rows),
        "n_timeouts": sum(r["answer"] == "timeout" for r in rows), "node_counters": delta,
        "latency_ms": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                       "mean": float(np.mean(latencies)) if latencies else None, "max": max(latencies, default=None)},
        "median_translation_m": percentile(t_errs, 50), "median_rotation_deg": percentile(r_errs, 50),
        "recall_5cm_5deg": sum(t <= 0.05 and r <= 5 for t, r in zip(t_errs, r_errs)) / len(rows),
        "recall_10cm_10deg": sum(t <= 0.10 and r <= 10 for t, r in zip(t_errs, r_errs)) / len(rows),
        "node_cpu_s_per_frame": cpu_s / len(rows), "node_rss_mib": {"start": rss_start / 1024, "end": rss_end / 1024},
        "node_startup_s": startup_s, "last_diagnostics": diag, "frames": rows,
    }


def bench_node_latency(args) -> None:
    """End-to-end latency of the node process on held-out RedKitchen frames (640x480 raw rgb8 over DDS),
    one node process per extractor backend, all on the same frames."""
    from offline.sources import open_source

    map_dir = Path(args.map)
    if not (map_dir / "manifest.json").is_file():
        sys.exit(f"no map at {map_dir}: build it first with `.venv/bin/python scripts/benchmark.py core` "
                 f"(writes runs/bench/core_map), or name one with --map")
    if args.num_threads < 0:
        sys.exit(f"--num-threads must be >= 0, got {args.num_threads}")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((map_dir / "manifest.json").read_text())
    mapping_names = {f["name"] for f in manifest.get("frames", [])}
    frameset = open_source(args.data, runs / "node_latency_source")
    queries = held_out_frames(frameset.frames, manifest, args.query_every, args.frames)
    if not queries:
        sys.exit(f"no held-out frames in {args.data} (all {len(frameset)} are mapping frames of {map_dir})")
    size = {(f.camera.width, f.camera.height) for f in queries}
    backends = list(dict.fromkeys(args.extractor_backends))
    results: dict[str, dict] = {}
    for backend in backends:
        # The camera pose (what the ground truth describes): no robot TF here.
        params = {"map_path": str(map_dir.resolve()), "device": "cpu", "image_qos": args.image_qos,
                  "odom_frame": "", "base_frame": "", "extractor_backend": backend, "num_threads": args.num_threads}
        tag = f"-{backend}" if len(backends) > 1 else ""
        result = run_node_latency(params, queries, args, runs, tag)
        if not args.no_stages:
            result["in_process_stage_ms"] = localizer_stage_timings(map_dir, queries, backend, args.num_threads)
        results[backend] = result
    (runs / "node_latency.json").write_text(json.dumps(results, indent=1))

    size_text = ", ".join(f"{w}x{h}" for w, h in sorted(size))
    date = datetime.date.today().isoformat()
    command = shown_command(args, "node-latency", always=("map", "data"))
    shown_map = os.path.relpath(map_dir.resolve(), REPO) if map_dir.resolve().is_relative_to(REPO) else str(map_dir)
    extractor = manifest.get("extractor", {}).get("name", "?")
    threads_text = f"{args.num_threads}" if args.num_threads else "0 (the libraries' defaults: every core)"
    rows_md = "\n".join(
        f"| {b} | {r['n_sent']} | {r['n_poses']} | {r['n_failed']} | {r['n_timeouts']} | {fmt_ms(r['latency_ms']['p50'])} | "
        f"{fmt_ms(r['latency_ms']['p90'])} | {fmt_ms(r['latency_ms']['max'])} | {fmt_m(r['median_translation_m'])} | "
        f"{fmt_deg(r['median_rotation_deg'])} | {fmt_pct(r['recall_5cm_5deg'])} | {fmt_pct(r['recall_10cm_10deg'])} | "
        f"{r['node_cpu_s_per_frame']:.2f} s |" for b, r in results.items())
    node_lines = []
    for b, r in results.items():
        delta, diag = r["node_counters"], r["last_diagnostics"]
        line = (f"- `{b}`: load average {r['load_before']:.1f} before, {r['load_after']:.1f} after; start-up (imports, map load, "
                f"warm-up{', ONNX export on first use' if b != 'torch' else ''}) {r['node_startup_s']:.0f} s; "
                f"RSS {r['node_rss_mib']['start']:.0f} -> {r['node_rss_mib']['end']:.0f} MiB; counters: received {delta['frames_received']}, "
                f"localized {delta['frames_localized']}, failed {delta['frames_failed']}, dropped {delta['frames_dropped']}; "
                f"diagnostics (last 10 s): latency p50 {diag.get('latency_ms_p50', 'n/a')} ms, processing p50 {diag.get('processing_ms_p50', 'n/a')} ms.")
        stages = r.get("in_process_stage_ms")
        if stages:
            line += (" In-process stage medians (`Localizer.localize`, same frames and parameters, after the node stopped): "
                     + ", ".join(f"{k} {v['p50']:.0f} ms" for k, v in stages.items()) + ".")
        node_lines.append(line)
    ratio = ""
    if {"torch", "onnxruntime"} <= set(results):
        p50_torch, p50_ort = results["torch"]["latency_ms"]["p50"], results["onnxruntime"]["latency_ms"]["p50"]
        if p50_torch and p50_ort:
            ratio = f"\n- onnxruntime / torch end-to-end p50: **{p50_ort / p50_torch:.2f}x** (same frames, same run).\n"
    body = f"""## ROS 2 node: end-to-end latency on this CPU ({size_text}, raw rgb8 over DDS)

- Command: `{command}`
  (node: `python -m d2s_nerf_ros.node --ros-args -p map_path:=<map> -p device:=cpu -p image_qos:={args.image_qos} -p odom_frame:='' -p base_frame:='' -p extractor_backend:=<backend> -p num_threads:={args.num_threads}`,
  its own process, one per backend, one after the other on the same frames; sender and node with the Fast DDS profile
  `config/fastdds_shm_large.xml`, whose shared-memory segment holds raw 640x480 rgb8 frames)
- Machine: {machine()}; date {date}; shared CPU (other jobs running: noisy, see the load per backend below);
  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; node num_threads {threads_text}
- Map: `{shown_map}` ({len(mapping_names)} mapping frames, {extractor}); queries: every {args.query_every}th held-out frame ({len(queries)} frames)
  of the same RedKitchen recording as the mapping frames (not the 7-Scenes test split).
  One frame at a time: the next is sent {args.gap:g} s after the node answered the previous one (and no faster than {args.rate:g} Hz),
  so the node is never backlogged and the latency has no queueing in it.
- Latency = image stamp (wall clock at sending) -> pose received by the sender, end to end through DDS.

| extractor backend | frames sent | poses | failed | no answer | latency p50 | latency p90 | max | median t | median R | 5 cm / 5° | 10 cm / 10° | node CPU per frame |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{rows_md}
{ratio}
""" + "\n".join(node_lines) + "\n"
    publish_section("node-latency", body, args.benchmarks_file)


def localizer_stage_timings(map_dir: Path, frames, backend: str = "auto", num_threads: int = 0) -> dict[str, dict[str, float]]:
    """Per-stage times (extract, d2s, pnp, total) of the node's localizer with the node's default
    parameters (and this backend and thread count) on ``frames``, in this process: the node's
    diagnostics give only its totals."""
    from d2s_nerf_ros.localizer import Localizer, LocalizerConfig
    from d2s_nerf_ros.node import PARAMETER_DEFAULTS as P

    config = LocalizerConfig(max_keypoints=P["max_keypoints"], reliability_threshold=P["reliability_threshold"],
                             ransac_threshold_px=P["ransac_threshold_px"], ransac_iterations=P["ransac_iterations"],
                             min_inliers=P["min_inliers"], device="cpu", extractor_backend=backend,
                             num_threads=num_threads)
    localizer = Localizer.from_path(map_dir, config)
    localizer.warmup()
    per_stage: dict[str, list[float]] = {}
    for frame in frames:
        for stage, ms in localizer.localize(frame.load_rgb(), frame.camera).timings_ms.items():
            per_stage.setdefault(stage, []).append(ms)
    return {stage: {"p50": percentile(v, 50), "p90": percentile(v, 90)} for stage, v in per_stage.items()}


# --------------------------------------------------------------------------- soak

def demo_view(t_s: float):
    """``T_world_cam`` of the demo rig's camera ``t_s`` seconds into its loop around the room."""
    from offline.demo_scene import base_pose_at, base_to_camera

    return base_pose_at(t_s) @ base_to_camera()


def build_soak_map(map_dir: Path, camera, train_iterations: int, n_frames: int = SOAK_MAP_FRAMES) -> list[str]:
    """A small map of the generated demo room with the project's build code (fast profile, no
    synthesis, depth labels from the exact rendered depth, ``train_iterations`` steps), from
    ``n_frames`` views rendered with ``camera``. The soak needs a map that localises, not an
    accurate one. Returns the build summary lines."""
    import cv2
    import numpy as np

    from offline.build import build_map, profile_config
    from offline.demo_scene import render_demo_frames
    from offline.sources.frames import Frame, FrameSet

    frames_dir = map_dir.with_name(map_dir.name + ".frames")
    frames_dir.mkdir(parents=True, exist_ok=True)
    _, stamps, _, _, cams, images, depths = render_demo_frames(n_frames, camera=camera)
    frames = []
    for i, (T, rgb, depth) in enumerate(zip(cams, images, depths)):
        image_path, depth_path = frames_dir / f"map-{i:03d}.png", frames_dir / f"map-{i:03d}.depth.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(depth_path), np.clip(np.rint(depth * 1000.0), 1, 65534).astype(np.uint16))  # mm
        frames.append(Frame(name=f"demo/map-{i:03d}", image_path=image_path, T_world_cam=T, camera=camera,
                            depth_path=depth_path, depth_scale=1000.0, stamp_ns=stamps[i]))
    frameset = FrameSet(frames, {"source": "offline.demo_scene, rendered for the soak benchmark"})
    frameset.save(frames_dir / "frames.json")
    config = profile_config("fast")
    config.synthesis, config.train_iterations, config.device, config.labels = False, train_iterations, "cpu", "depth"
    summary = build_map(frameset, map_dir, config, work_dir=map_dir.with_name(map_dir.name + ".work"), progress=False)
    return summary.lines()


def bench_soak(args) -> None:
    """Thousands of small frames through the node process, one at a time; its RSS sampled from /proc."""
    from d2s_nerf_ros.geometry import pose_error
    from offline.demo_scene import DEMO_CAMERA, TRAJECTORY_PERIOD_S, cached_scene

    if args.frames < 20:
        sys.exit(f"--frames must be at least 20 (warm-up is the first 10 %), got {args.frames}")
    if args.width < 32 or args.width % 4:
        sys.exit(f"--width must be a multiple of 4 and >= 32 (height is 3/4 of it), got {args.width}")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    camera = DEMO_CAMERA.scaled_to(args.width, args.width * 3 // 4)
    map_dir = Path(args.map) if args.map else runs / f"soak_map_{camera.width}x{camera.height}"
    build_s = None
    if not (map_dir / "manifest.json").is_file():
        if args.map:
            sys.exit(f"no map at {map_dir}; leave --map out to build the demo-room soak map")
        print(f"building the demo-room soak map {map_dir} ({SOAK_MAP_FRAMES} views at {camera.width}x{camera.height}, "
              f"{args.train_iterations} training iterations; once, reused by later runs)", flush=True)
        t0 = time.monotonic()
        print("\n".join(build_soak_map(map_dir, camera, args.train_iterations)), flush=True)
        build_s = time.monotonic() - t0
    map_manifest = json.loads((map_dir / "manifest.json").read_text())

    # Held-out views: half-way between the stamps the map's views were rendered at.
    scene = cached_scene(0)
    views = [demo_view((k + 0.5) * TRAJECTORY_PERIOD_S / SOAK_CYCLE_VIEWS) for k in range(SOAK_CYCLE_VIEWS)]
    messages = [image_and_info(scene.render(T, camera)[0], camera) for T in views]

    from offline.demo import ros_loopback_env

    env = ros_loopback_env()
    os.environ.update(env)
    # The camera pose (what the ground truth describes): no robot TF here.
    params = {"map_path": str(map_dir.resolve()), "device": "cpu", "image_qos": args.image_qos, "odom_frame": "", "base_frame": ""}
    sample_every = args.sample_every or max(1, args.frames // 100)
    warmup_frames = max(1, args.frames // 10)
    load0 = load_average()
    node = NodeUnderTest(params, runs / "soak_node.log", env)
    driver = None
    samples: list[dict[str, float]] = []   # {frame, rss_mib, cpu_s, t_s}
    answers = {"pose": 0, "failed": 0, "timeout": 0}
    latencies, t_errs = [], []
    waiting: dict[int, int] = {}  # stamp -> view, frames that got no answer in time (a late pose still counts)
    late_poses = 0
    try:
        driver = start_client(node, args.image_qos)
        driver.prime_camera_info(messages[0][1])
        base = driver.counters()
        t0 = time.monotonic()

        def sample(frame_index: int) -> None:
            samples.append({"frame": frame_index, "rss_mib": proc_rss_kib(node.pid) / 1024,
                            "cpu_s": proc_cpu_s(node.pid), "t_s": time.monotonic() - t0})

        sample(0)
        for i in range(args.frames):
            k = i % len(messages)
            stamp = driver.send(*messages[k])
            # A failed frame publishes no pose and shows up only in the 1 Hz diagnostics: rather than
            # wait for those, move on once the pose is clearly overdue (3x the recent median latency).
            # The node then still holds that frame or is done with it; its counters say which.
            recent = latencies[-50:]
            patience = min(args.answer_timeout, max(0.25, 3e-3 * percentile(recent, 50))) if len(recent) >= 5 else args.answer_timeout
            answer, received_ns = driver.wait_answer(stamp, patience)
            answers[answer] += 1
            if answer == "pose":
                latencies.append((received_ns - stamp) * 1e-6)
                t_errs.append(pose_error(driver.pose(stamp).T, views[k])[0])
                driver.forget(stamp)
            elif answer == "timeout":
                waiting[stamp] = k
            for late in [s for s in waiting if driver.pose(s) is not None]:
                t_errs.append(pose_error(driver.pose(late).T, views[waiting.pop(late)])[0])
                driver.forget(late)
                late_poses += 1
            if (i + 1) % sample_every == 0 or i + 1 == args.frames:
                sample(i + 1)
                if not node.alive():
                    raise RuntimeError(f"the localizer node died after {i + 1} frames:\n{node.log_tail()}")
            if (i + 1) % max(1, args.frames // 20) == 0:
                s = samples[-1]
                print(f"  {i + 1}/{args.frames} frames, {s['t_s']:.0f} s, node RSS {s['rss_mib']:.1f} MiB, "
                      f"answers {answers}, late poses {late_poses}", flush=True)
        wall_s = time.monotonic() - t0
        time.sleep(1.5)  # one more diagnostics message after the last frame
        counters = driver.counters()
        late_poses += sum(1 for s in waiting if driver.pose(s) is not None)
    finally:
        if driver is not None:
            driver.close()
        rc = node.stop()
    load1 = load_average()

    delta = {k: (None if counters[k] is None or base[k] is None else counters[k] - base[k]) for k in counters}
    # Growth is a trend, not one sample: the allocator takes and returns tens of MiB from frame to
    # frame. So compare the median RSS of the samples just after warm-up (the next 10 % of the frames)
    # with the median over the last 10 %; the highest single sample is reported beside it.
    after_warmup = [s for s in samples if s["frame"] >= warmup_frames]
    early = [s["rss_mib"] for s in after_warmup if s["frame"] <= 2 * warmup_frames]
    late = [s["rss_mib"] for s in samples if s["frame"] >= args.frames - warmup_frames]
    baseline_mib, end_mib = percentile(early, 50), percentile(late, 50)
    peak = max(after_warmup, key=lambda s: s["rss_mib"])
    growth_end = end_mib / baseline_mib - 1.0
    growth_peak = peak["rss_mib"] / baseline_mib - 1.0
    passed = growth_end <= args.max_growth
    cpu_per_frame_ms = (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / args.frames * 1e3
    result = {
        "n_sent": args.frames, "answers": answers, "late_poses": late_poses, "node_counters": delta,
        "node_exit_status": rc, "wall_s": wall_s, "frames_per_s": args.frames / wall_s,
        "query_size": [camera.width, camera.height],
        "latency_ms": {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90)},
        "median_translation_m": percentile(t_errs, 50), "node_cpu_ms_per_frame": cpu_per_frame_ms,
        "warmup_frames": warmup_frames, "rss_mib": {"start": samples[0]["rss_mib"], "after_warmup": baseline_mib,
                                                    "end": end_mib, "max_after_warmup": peak["rss_mib"]},
        "growth_end": growth_end, "growth_max": growth_peak, "max_growth_allowed": args.max_growth, "passed": passed,
        "samples": samples, "map": str(map_dir), "map_build_s": build_s,
    }
    (runs / "soak.json").write_text(json.dumps(result, indent=1))

    command = shown_command(args, "soak", always=("frames", "width"))
    trend_points = samples[:: max(1, len(samples) // 10)]
    if trend_points[-1] is not samples[-1]:
        trend_points.append(samples[-1])
    trend = ", ".join(f"{s['frame']}: {s['rss_mib']:.1f}" for s in trend_points)
    verdict = "PASS" if passed else "FAIL"
    training = map_manifest.get("training", {})
    n_poses = answers["pose"] + late_poses
    body = f"""## ROS 2 node: {args.frames}-frame soak (memory)

- Command: `{command}`
  (node: `python -m d2s_nerf_ros.node --ros-args -p map_path:=<soak map> -p device:=cpu -p image_qos:={args.image_qos}`, its own process)
{machine_line(load0, load1)} (shared CPU);
  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}
- Map: the generated demo room (`offline/demo_scene.py`), {len(map_manifest.get('frames', []))} views rendered at {camera.width}x{camera.height} with exact depth,
  built by `offline.build.build_map` (fast profile, no synthesis, depth labels, {training.get('config', {}).get('iterations', '?')} training iterations){f', in {build_s / 60:.1f} min' if build_s else ''}:
  a map that localises, not a tuned one.
- Frames: {SOAK_CYCLE_VIEWS} other views of the room ({camera.width}x{camera.height} raw rgb8 + CameraInfo), sent in a cycle, one at a time:
  the next frame goes out when the node has answered (pose, or a failure named in its diagnostics) or its pose is overdue
  (3x the recent median latency), so nearly every frame goes through the whole processing path and nothing queues.
- Sent {args.frames}; node received {delta['frames_received']}, processed {delta['frames_processed']} (localized {delta['frames_localized']},
  failed {delta['frames_failed']}), dropped {delta['frames_dropped']}; poses received {n_poses} ({late_poses} after the sender moved on).
  Wall time {wall_s / 60:.1f} min ({args.frames / wall_s:.1f} frames/s); end-to-end latency p50 {fmt_ms(result['latency_ms']['p50'])}, p90 {fmt_ms(result['latency_ms']['p90'])};
  node CPU time {cpu_per_frame_ms:.0f} ms per frame; median position error {fmt_m(result['median_translation_m'])}.
- Node RSS (VmRSS from /proc, sampled every {sample_every} frames; warm-up = the first {warmup_frames} frames):
  start {samples[0]['rss_mib']:.1f} MiB; after warm-up {baseline_mib:.1f} MiB (median of frames {warmup_frames}-{2 * warmup_frames}); end {end_mib:.1f} MiB
  (median of the last {warmup_frames} frames) -> growth **{100 * growth_end:+.1f} %**; highest sample {peak['rss_mib']:.1f} MiB at frame {peak['frame']}
  ({100 * growth_peak:+.1f} %). **{verdict}** (criterion: growth after warm-up at most {100 * args.max_growth:.0f} %).
- RSS trend (frame: MiB): {trend}
"""
    publish_section("node-soak", body, args.benchmarks_file)
    if rc not in (0, None):
        print(f"warning: the node exited with status {rc}; see {node.log_path}", file=sys.stderr)


def add_node_benchmark_parsers(sub) -> None:
    """The ``node-latency`` and ``soak`` subcommands (the ROS 2 node as its own process)."""
    n = sub.add_parser("node-latency", help="end-to-end latency of the node process on held-out RedKitchen frames")
    n.add_argument("--map", default=str(REPO / "runs" / "bench" / "core_map"),
                   help="map bundle (default: the one `benchmark.py core` builds)")
    n.add_argument("--data", default=str(DEFAULT_DATA))
    n.add_argument("--runs", default=str(REPO / "runs" / "bench"), help="where the raw JSON and the node's log go")
    # 12 and 40: the same held-out frames as `benchmark.py core` evaluates in-process
    n.add_argument("--query-every", type=int, default=12, help="every N-th frame not used for mapping")
    n.add_argument("--frames", type=int, default=40, help="at most this many query frames (0: all selected)")
    n.add_argument("--rate", type=float, default=0.5, help="send no faster than this many frames per second")
    n.add_argument("--gap", type=float, default=0.5, help="idle seconds between the node's answer and the next frame")
    n.add_argument("--answer-timeout", type=float, default=30.0, help="seconds to wait for the node's answer to a frame")
    n.add_argument("--no-stages", action="store_true", help="skip the in-process per-stage timing pass")
    n.add_argument("--image-qos", choices=["sensor_data", "reliable"], default="sensor_data",
                   help="QoS of the image publisher and the node's subscription (sensor_data: best effort, as on a robot)")
    n.add_argument("--extractor-backends", nargs="+", choices=["auto", "torch", "onnxruntime"], default=["auto"],
                   help="one node process per backend, in this order, on the same frames")
    n.add_argument("--num-threads", type=int, default=0, help="the node's num_threads (0: the libraries' defaults)")
    n.add_argument("--benchmarks-file", default=str(BENCH_MD), help="markdown file whose section is rewritten")
    n.set_defaults(func=bench_node_latency, parser=n)

    s = sub.add_parser("soak", help="many small frames through the node process; its memory (RSS) must not grow")
    s.add_argument("--frames", type=int, default=5000)
    s.add_argument("--width", type=int, default=160, help="image width of the map and the queries (height 3/4 of it)")
    s.add_argument("--map", help="map bundle (default: RUNS/soak_map_WxH, built from the demo room on first use)")
    s.add_argument("--runs", default=str(REPO / "runs" / "bench"))
    s.add_argument("--train-iterations", type=int, default=3000, help="training steps when the soak map is built")
    s.add_argument("--sample-every", type=int, help="RSS sample interval in frames (default: 1 %% of --frames)")
    s.add_argument("--answer-timeout", type=float, default=10.0,
                   help="longest wait for the node's answer to a frame (less once the latency is known)")
    s.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    s.add_argument("--image-qos", choices=["sensor_data", "reliable"], default="sensor_data",
                   help="QoS of the image publisher and the node's subscription (sensor_data: best effort, as on a robot)")
    s.add_argument("--benchmarks-file", default=str(BENCH_MD), help="markdown file whose section is rewritten")
    s.set_defaults(func=bench_soak, parser=s)
