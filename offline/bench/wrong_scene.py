"""``benchmark.py wrong-scene``: does the node publish poses for frames of a place its map is not of?

Two maps, each queried through the node process (``offline/node_process.py``, frames sent one at
a time by ``offline.ros_client.LocalizerClient``) with frames of its own scene and of the other one:

- the RedKitchen map (``--map``) with held-out RedKitchen frames (true scene) and rendered
  demo-room views (``offline/demo_scene.py``, wrong scene);
- a demo-room map (``--demo-map``, built with ``build_soak_map`` on first use) with other
  demo-room views (true scene) and the RedKitchen frames (wrong scene).

Each map runs twice: with the acceptance gates at their defaults, and with the ratio and RMSE
gates off (the node before them: any PnP result with ``min_inliers`` inliers). Wrong-scene rows
count published poses (the goal is 0 of N); true-scene rows give the recall the gates cost.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from offline.bench.common import (add_map_benchmark_arguments, fmt_pct, load_average, machine_line, publish_section,
                                  runs_and_map, shown_command, shown_path)
from offline.bench.node import NodeUnderTest, build_soak_map, demo_view, image_and_info, start_client

GATES_OFF = {"min_inlier_ratio": 0.0, "max_reprojection_rmse_px": 1000.0, "max_distance_to_mapping_m": 0.0}


@dataclass
class Query:
    name: str
    load_rgb: Callable[[], np.ndarray]
    camera: Any
    T_world_cam: np.ndarray


def redkitchen_queries(data: Path, map_dir: Path, every: int, count: int, work: Path) -> list[Query]:
    """Held-out RedKitchen frames: not the map's mapping frames, nor the frames its error model was measured on."""
    from offline.sources import open_source

    manifest = json.loads((map_dir / "manifest.json").read_text())
    used = {f["name"] for f in manifest.get("frames", [])} | set(manifest.get("error_model", {}).get("frames", []))
    frames = [f for f in open_source(data, work).frames if f.name not in used][::every][:count]
    return [Query(f.name, f.load_rgb, f.camera, np.asarray(f.T_world_cam)) for f in frames]


def demo_room_queries(count: int, camera) -> list[Query]:
    """Demo-room views between the demo map's views (a quarter step along the loop from them)."""
    from offline.demo_scene import TRAJECTORY_PERIOD_S, cached_scene

    queries = []
    for k in range(count):
        T = demo_view((k + 0.25) * TRAJECTORY_PERIOD_S / count)
        queries.append(Query(f"demo-room/view-{k:03d}", lambda T=T: cached_scene().render(T, camera)[0], camera, T))
    return queries


def through_node(map_dir: Path, params: dict[str, Any], query_sets: dict[str, list[Query]], log_path: Path,
                 answer_timeout_s: float) -> dict[str, list[dict[str, Any]]]:
    """Send every query to a fresh node process on ``map_dir``; one row per query: answer, pose, reason."""
    from offline.demo import ros_loopback_env

    env = ros_loopback_env()
    os.environ.update(env)
    # The camera pose (what the ground truth describes): no robot TF here.
    node = NodeUnderTest({"map_path": str(map_dir.resolve()), "device": "cpu", "image_qos": "reliable",
                          "odom_frame": "", "base_frame": "", **params}, log_path, env)
    driver = None
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        driver = start_client(node, "reliable")
        for set_name, queries in query_sets.items():
            driver.prime_camera_info(image_and_info(queries[0].load_rgb(), queries[0].camera)[1])
            rows[set_name] = []
            for q in queries:
                stamp = driver.send(*image_and_info(q.load_rgb(), q.camera))
                answer, _ = driver.wait_answer(stamp, answer_timeout_s)
                row: dict[str, Any] = {"name": q.name, "answer": answer}
                if answer == "pose":
                    row["T_map_cam"] = np.asarray(driver.pose(stamp).T).tolist()
                elif answer == "failed":
                    latest = driver.latest_diagnostics()
                    row["reason"] = latest.values.get("last_frame_result", "") if latest else ""
                rows[set_name].append(row)
                print(f"  {set_name} {q.name}: {answer} {row.get('reason', '')}", flush=True)
                time.sleep(0.2)
    finally:
        if driver is not None:
            driver.close()
        node.stop()
    return rows


def _score(rows: list[dict[str, Any]], queries: list[Query], same_scene: bool) -> dict[str, Any]:
    from d2s_nerf_ros.geometry import pose_error

    published = [r for r in rows if r["answer"] == "pose"]
    out: dict[str, Any] = {"sent": len(rows), "published": len(published),
                           "timeouts": sum(r["answer"] == "timeout" for r in rows)}
    reasons: dict[str, int] = {}
    for r in rows:
        if r["answer"] == "failed":
            text = r.get("reason", "")
            key = ("inlier ratio" if "inlier ratio" in text else "reprojection RMSE" if "RMSE" in text
                   else "viewpoint" if "nearest mapping camera" in text
                   else "too few inliers" if "inliers (minimum" in text else "other")
            reasons[key] = reasons.get(key, 0) + 1
    out["rejected_by"] = reasons
    if same_scene:
        truth = {q.name: q.T_world_cam for q in queries}
        errors = [pose_error(np.asarray(r["T_map_cam"]), truth[r["name"]]) for r in published]
        out["recall_5cm_5deg"] = sum(t <= 0.05 and a <= 5 for t, a in errors) / max(len(rows), 1)
        out["recall_10cm_10deg"] = sum(t <= 0.10 and a <= 10 for t, a in errors) / max(len(rows), 1)
        out["published_wrong_1m"] = sum(t > 1.0 for t, _ in errors)
    return out


def bench_wrong_scene(args) -> None:
    from d2s_nerf_ros.camera import CameraIntrinsics
    from d2s_nerf_ros.localizer import LocalizerConfig
    from offline.demo_scene import DEMO_CAMERA

    runs, map_dir = runs_and_map(args)
    demo_map = Path(args.demo_map) if args.demo_map else runs / "wrong_scene_demo_map"
    if not (demo_map / "manifest.json").is_file():
        print(f"building the demo-room map {demo_map} ({args.demo_map_frames} views, "
              f"{args.demo_train_iterations} iterations; once, reused by later runs)", flush=True)
        print("\n".join(build_soak_map(demo_map, DEMO_CAMERA, args.demo_train_iterations, args.demo_map_frames)), flush=True)
    # Demo-room queries at the demo map's own camera (the node takes any image size with its CameraInfo).
    camera = CameraIntrinsics.from_dict(json.loads((demo_map / "manifest.json").read_text())["camera"])
    kitchen = redkitchen_queries(Path(args.data), map_dir, args.query_every, args.frames, runs / "wrong_scene_source")
    room = demo_room_queries(args.frames, camera)

    load0 = load_average()
    results: dict[str, Any] = {}
    plan = [("RedKitchen", map_dir, {"RedKitchen": kitchen, "demo room": room}),
            ("demo room", demo_map, {"demo room": room, "RedKitchen": kitchen})]
    for map_name, path, sets in plan:
        for gates, params in (("default", {}), ("off", GATES_OFF)):
            tag = f"{map_name.replace(' ', '_')}_{gates}"
            rows = through_node(path, params, sets, runs / f"wrong_scene_{tag}.log", args.answer_timeout)
            for set_name, set_rows in rows.items():
                results[f"{map_name} | {set_name} | {gates}"] = {
                    "map": map_name, "frames": set_name, "gates": gates, "rows": set_rows,
                    **_score(set_rows, sets[set_name], same_scene=set_name == map_name)}
    load1 = load_average()
    (runs / "wrong_scene.json").write_text(json.dumps(results, indent=1))

    defaults = LocalizerConfig()
    table = ["| map | query frames | gates | published | 5 cm / 5° | 10 cm / 10° | published > 1 m off | rejected by (ratio / RMSE / viewpoint / count / other) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        same = r["map"] == r["frames"]
        rej = r["rejected_by"]
        table.append(
            f"| {r['map']} | {r['frames']} ({'true' if same else 'wrong'} scene) | {r['gates']} | "
            f"**{r['published']} of {r['sent']}** | {fmt_pct(r['recall_5cm_5deg']) if same else '-'} | "
            f"{fmt_pct(r['recall_10cm_10deg']) if same else '-'} | {r['published_wrong_1m'] if same else r['published']} | "
            f"{rej.get('inlier ratio', 0)} / {rej.get('reprojection RMSE', 0)} / {rej.get('viewpoint', 0)} / "
            f"{rej.get('too few inliers', 0)} / {rej.get('other', 0)} |")
    manifest = json.loads((map_dir / "manifest.json").read_text())
    shown_map = shown_path(map_dir)
    note = manifest.get("training", {}).get("note")  # e.g. a bundle made from a training checkpoint
    map_note = f" ({note})" if note else ""
    body = f"""## Wrong scene: poses the node publishes for frames of another place

- Command: `{shown_command(args, "wrong-scene", always=("map",))}`
{machine_line(load0, load1)}
- Through the node process (`python -m d2s_nerf_ros.node`, device cpu, reliable image QoS), one raw rgb8 frame at a time
  (RedKitchen 640x480, demo room {camera.width}x{camera.height}).
- Maps: RedKitchen `{shown_map}`{map_note} ({len(manifest.get('frames', []))} mapping frames); the demo room
  ({args.demo_map_frames} rendered views, depth labels, {args.demo_train_iterations} iterations, `build_soak_map`).
- Query frames: {len(kitchen)} RedKitchen frames (every {args.query_every}th held-out frame: frames of the same recording
  as the mapping frames, not the 7-Scenes test split; the map's error-model frames left out) and {len(room)} demo-room
  views between the demo map's views.
- Gates `default`: min_inliers {defaults.min_inliers}, min_inlier_ratio {defaults.min_inlier_ratio:g},
  max_reprojection_rmse_px {defaults.max_reprojection_rmse_px:g} (at 640x480), max_distance_to_mapping_m
  {defaults.max_distance_to_mapping_m:g} (a mapping camera that close, optical axes within {defaults.max_angle_to_mapping_deg:g}°).
  `off`: min_inliers {defaults.min_inliers} only (ratio 0, RMSE 1000 px, no viewpoint gate): the node before the gates.

{chr(10).join(table)}
"""
    publish_section("wrong-scene", body, args.benchmarks_file)


def add_wrong_scene_parser(sub) -> None:
    w = sub.add_parser("wrong-scene", help="poses the node publishes for frames of another scene, and the recall the gates cost")
    add_map_benchmark_arguments(w)
    w.add_argument("--demo-map", help="demo-room map (default: RUNS/wrong_scene_demo_map, built on first use)")
    w.add_argument("--demo-map-frames", type=int, default=24)
    w.add_argument("--demo-train-iterations", type=int, default=400)
    w.add_argument("--query-every", type=int, default=12, help="every N-th held-out RedKitchen frame")
    w.add_argument("--frames", type=int, default=30, help="query frames per scene")
    w.add_argument("--answer-timeout", type=float, default=30.0)
    w.set_defaults(func=bench_wrong_scene, parser=w)
