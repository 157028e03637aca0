"""Camera poses for frames WITHOUT poses: incremental structure-from-motion with pycolmap.

Used by ``--pose-source sfm`` for bags that carry images but no tf or pose topic.

Steps (all COLMAP, through pycolmap, CPU):
1. SIFT features of every image (``pycolmap.extract_features``) with the camera given to us:
   one shared camera with fixed intrinsics (COLMAP model PINHOLE, OPENCV, FULL_OPENCV or
   OPENCV_FISHEYE after our distortion model);
2. matching with geometric verification: exhaustive for short sequences, sequential (each
   image against its next ``sequential_overlap`` neighbours) for long ones;
3. incremental mapping. The intrinsics stay fixed unless ``refine_intrinsics`` is set: the
   calibration of a bag's CameraInfo is usually better than what a few frames can estimate.

SIFT needs no network weights and runs on CPU; 20 frames of 320x240 take ~10 s on 2 cores.

Output convention: OpenCV camera-to-world poses ``T_world_cam`` (as every ``Frame``) in a
frame chosen here, since SfM alone fixes neither the frame nor the scale:
- gauge: the world frame is the camera frame of the FIRST registered image (its pose is the
  identity);
- scale: translations are divided so that the camera centres' RMS distance from their
  centroid is 1 unit. The unit is NOT a metre; ``known_distance_scale`` or a given scale
  factor turn it into metres (see ``offline/sources/rosbag_source.py``).
Images COLMAP cannot register get ``None``. Only the largest model is used when COLMAP
splits the sequence into several; images only in the others count as unregistered.

COLMAP puts pixel centres at +0.5, our convention (OpenCV's) at integer coordinates: the
principal point is shifted by +0.5 on the way in and -0.5 on the way out.

``work_dir`` keeps the COLMAP database and model, and a cache of the result keyed by the
images' content, the camera and the options: rerunning with only a new scale is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import invert_pose
from d2s_nerf_ros.map_bundle import sha256_file

log = logging.getLogger(__name__)

MATCHING_MODES = ("auto", "exhaustive", "sequential")
RESULT_FORMAT = "d2s_nerf_sfm"
RESULT_VERSION = 1
RESULT_FILE = "sfm_result.json"  # in work_dir, written after a successful run


class SfmError(ValueError):
    """Structure-from-motion could not pose the images; the message says what to change."""


@dataclass
class SfmConfig:
    max_num_features: int = 4096        # SIFT features per image
    max_image_size: int = 1600          # larger images are downscaled for feature extraction
    matching: str = "auto"              # MATCHING_MODES; auto: exhaustive up to exhaustive_max_images
    exhaustive_max_images: int = 60     # exhaustive matching is O(n^2): beyond this, sequential
    sequential_overlap: int = 10        # sequential matching: each image with its next N
    min_num_matches: int = 15           # image pairs with fewer verified matches are ignored
    refine_intrinsics: bool = False     # let bundle adjustment refine focal length and distortion
    # Fewer registered images than either limit is an error rather than a thin map.
    min_registered_images: int = 3
    min_registered_fraction: float = 0.5
    num_threads: int = -1               # -1: all cores
    random_seed: int = 0
    verbose: bool = False               # COLMAP's INFO log on stderr

    def validate(self) -> None:
        if self.matching not in MATCHING_MODES:
            raise SfmError(f"SfM matching must be one of {', '.join(MATCHING_MODES)}, got {self.matching!r}")
        for name in ("max_num_features", "max_image_size", "exhaustive_max_images", "sequential_overlap", "min_num_matches"):
            if int(getattr(self, name)) < 1:
                raise SfmError(f"SfM option {name} must be >= 1, got {getattr(self, name)}")
        if self.min_registered_images < 2:
            raise SfmError(f"min_registered_images must be >= 2 (a relative pose needs two images), got {self.min_registered_images}")
        if not 0.0 <= self.min_registered_fraction <= 1.0:
            raise SfmError(f"min_registered_fraction must be in [0, 1], got {self.min_registered_fraction}")

    def cache_fields(self) -> dict[str, Any]:
        """The options that change the reconstruction (not threads, logging or acceptance limits)."""
        d = asdict(self)
        for name in ("num_threads", "verbose", "min_registered_images", "min_registered_fraction"):
            d.pop(name)
        return d


@dataclass
class SfmResult:
    poses: list[np.ndarray | None]      # per input image: T_world_cam (gauge and unit above) or None
    camera: CameraIntrinsics            # the given camera, or the refined one with refine_intrinsics
    n_images: int = 0
    n_registered: int = 0
    n_models: int = 0                   # models COLMAP made; only the largest is used
    n_points3D: int = 0
    mean_reprojection_error_px: float = float("nan")
    matching: str = ""                  # exhaustive | sequential
    timings_s: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    @property
    def unregistered(self) -> list[int]:
        return [i for i, T in enumerate(self.poses) if T is None]

    def summary(self) -> dict[str, Any]:
        """For a frame set's metadata (JSON-safe)."""
        error = self.mean_reprojection_error_px
        return {
            "images": self.n_images, "registered": self.n_registered, "unregistered": self.n_images - self.n_registered,
            "models": self.n_models, "points3D": self.n_points3D,
            "mean_reprojection_error_px": round(error, 4) if math.isfinite(error) else None,
            "matching": self.matching, "camera": self.camera.to_dict(), "cached": self.cached,
            "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()},
            "gauge": "first registered frame is the identity; camera centres' RMS distance from their centroid is 1 unit",
        }


# --- cameras ----------------------------------------------------------------------------------

def colmap_camera_params(camera: CameraIntrinsics) -> tuple[str, list[float]]:
    """(COLMAP model name, params) of our camera, principal point shifted to COLMAP's +0.5 pixels."""
    fx, fy, cx, cy = camera.fx, camera.fy, camera.cx + 0.5, camera.cy + 0.5
    d = [float(v) for v in camera.distortion]
    if not camera.has_distortion:
        return "PINHOLE", [fx, fy, cx, cy]
    if camera.distortion_model == "equidistant":
        return "OPENCV_FISHEYE", [fx, fy, cx, cy, *d]
    if len(d) == 4:  # k1 k2 p1 p2
        return "OPENCV", [fx, fy, cx, cy, *d]
    # k1 k2 p1 p2 k3 [k4 k5 k6]: OpenCV's rational model, which COLMAP calls FULL_OPENCV.
    return "FULL_OPENCV", [fx, fy, cx, cy, *(d + [0.0] * (8 - len(d)))]


def _camera_from_params(camera: CameraIntrinsics, model: str, params: Sequence[float]) -> CameraIntrinsics:
    p = [float(v) for v in params]
    if model == "PINHOLE":
        dist_model, dist = "none", ()
    elif model == "OPENCV_FISHEYE":
        dist_model, dist = "equidistant", tuple(p[4:8])
    elif model == "OPENCV":
        dist_model, dist = "plumb_bob", tuple(p[4:8])
    else:  # FULL_OPENCV: keep as many coefficients as the given camera had
        dist_model, dist = "plumb_bob", tuple(p[4:4 + len(camera.distortion)])
    return CameraIntrinsics(width=camera.width, height=camera.height, fx=p[0], fy=p[1], cx=p[2] - 0.5, cy=p[3] - 0.5,
                            distortion_model=dist_model, distortion=dist)


# --- gauge and scale --------------------------------------------------------------------------

def _gauge(poses: list[np.ndarray | None]) -> list[np.ndarray | None]:
    """First registered camera = identity; camera centres' RMS distance from their centroid = 1."""
    first = next(T for T in poses if T is not None)
    to_first = invert_pose(first)
    moved = [None if T is None else to_first @ T for T in poses]
    centres = np.array([T[:3, 3] for T in moved if T is not None])
    rms = float(np.sqrt(((centres - centres.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if not rms > 1e-9:
        raise SfmError("the registered cameras did not move: SfM needs the camera to translate, not only turn")
    for T in moved:
        if T is not None:
            T[:3, 3] /= rms
    return moved


def scale_poses(poses: Sequence[np.ndarray | None], factor: float) -> list[np.ndarray | None]:
    """The same poses with translations multiplied by ``factor`` (a similarity about the origin)."""
    if not (math.isfinite(factor) and factor > 0):
        raise SfmError(f"a scale factor must be a positive number, got {factor}")
    out: list[np.ndarray | None] = []
    for T in poses:
        if T is None:
            out.append(None)
            continue
        S = np.array(T, dtype=np.float64, copy=True)
        S[:3, 3] *= factor
        out.append(S)
    return out


def known_distance_scale(T_a: np.ndarray, T_b: np.ndarray, distance_m: float) -> float:
    """The factor that puts the camera centres of ``T_a`` and ``T_b`` ``distance_m`` apart."""
    if not (math.isfinite(distance_m) and distance_m > 0):
        raise SfmError(f"a known distance must be a positive number of metres, got {distance_m}")
    apart = float(np.linalg.norm(np.asarray(T_a)[:3, 3] - np.asarray(T_b)[:3, 3]))
    # The map's unit is the trajectory's RMS spread; two centres much closer than that give a
    # scale dominated by reconstruction noise.
    if apart < 1e-3:
        raise SfmError(
            f"the two cameras are only {apart:.2g} map units apart (the trajectory spread is 1 unit): "
            "too close to carry a scale; pick two frames farther apart"
        )
    return distance_m / apart


# --- the reconstruction -----------------------------------------------------------------------

def _cache_key(image_paths: Sequence[Path], camera: CameraIntrinsics, config: SfmConfig) -> str:
    doc = {
        "version": RESULT_VERSION,
        "images": [(p.name, sha256_file(p)) for p in image_paths],
        "camera": camera.to_dict(),
        "config": config.cache_fields(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _save_result(path: Path, key: str, result: SfmResult) -> None:
    doc = {
        "format": RESULT_FORMAT, "version": RESULT_VERSION, "key": key,
        "poses": [None if T is None else np.asarray(T).tolist() for T in result.poses],
        "camera": result.camera.to_dict(),
        "stats": {k: getattr(result, k) for k in ("n_images", "n_registered", "n_models", "n_points3D", "matching", "timings_s")},
        "mean_reprojection_error_px": result.mean_reprojection_error_px if math.isfinite(result.mean_reprojection_error_px) else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _load_result(path: Path, key: str) -> SfmResult | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if doc.get("format") != RESULT_FORMAT or doc.get("version") != RESULT_VERSION or doc.get("key") != key:
        return None
    error = doc.get("mean_reprojection_error_px")
    return SfmResult(
        poses=[None if T is None else np.asarray(T, dtype=np.float64) for T in doc["poses"]],
        camera=CameraIntrinsics.from_dict(doc["camera"]),
        mean_reprojection_error_px=float("nan") if error is None else float(error),
        cached=True, **doc["stats"],
    )


def _image_root(image_paths: Sequence[Path], work_dir: Path) -> tuple[Path, list[str]]:
    """A folder holding every image and their names in it: their own folder when they share
    one, else links in ``work_dir/images`` (COLMAP reads images by name under one root)."""
    parents = {p.parent.resolve() for p in image_paths}
    if len(parents) == 1:
        return parents.pop(), [p.name for p in image_paths]
    root = work_dir / "images"
    root.mkdir(parents=True)
    names = []
    for i, p in enumerate(image_paths):
        name = f"{i:06d}{p.suffix}"
        try:
            os.symlink(p.resolve(), root / name)
        except OSError:  # file systems without links
            shutil.copyfile(p, root / name)
        names.append(name)
    return root, names


def _run_colmap(image_paths: list[Path], camera: CameraIntrinsics, work_dir: Path, config: SfmConfig) -> SfmResult:
    import pycolmap

    if work_dir.exists():
        shutil.rmtree(work_dir)  # a database from an earlier run would hold stale images and matches
    work_dir.mkdir(parents=True)
    db_path = work_dir / "database.db"
    image_root, names = _image_root(image_paths, work_dir)
    index_of = {name: i for i, name in enumerate(names)}
    model, params = colmap_camera_params(camera)
    timings: dict[str, float] = {}

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = model
    reader.camera_params = ",".join(repr(v) for v in params)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = config.num_threads
    extraction.max_image_size = config.max_image_size
    extraction.sift.max_num_features = config.max_num_features
    matching_options = pycolmap.FeatureMatchingOptions()
    matching_options.num_threads = config.num_threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = config.random_seed
    matching = config.matching
    if matching == "auto":
        matching = "exhaustive" if len(image_paths) <= config.exhaustive_max_images else "sequential"

    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.min_num_matches = config.min_num_matches
    mapping.num_threads = config.num_threads
    mapping.random_seed = config.random_seed
    mapping.extract_colors = False
    mapping.min_model_size = min(mapping.min_model_size, config.min_registered_images)
    mapping.ba_refine_principal_point = False  # never well constrained by a short sequence
    mapping.ba_refine_focal_length = config.refine_intrinsics
    mapping.ba_refine_extra_params = config.refine_intrinsics
    mapping.mapper.abs_pose_refine_focal_length = config.refine_intrinsics
    mapping.mapper.abs_pose_refine_extra_params = config.refine_intrinsics

    previous_level = pycolmap.logging.minloglevel
    if not config.verbose:
        pycolmap.logging.minloglevel = 2  # ERROR: COLMAP logs every image at INFO
    try:
        t0 = time.perf_counter()
        pycolmap.extract_features(db_path, image_root, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
        timings["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if matching == "exhaustive":
            pycolmap.match_exhaustive(db_path, matching_options=matching_options, verification_options=verification,
                                      device=pycolmap.Device.cpu)
        else:
            pairing = pycolmap.SequentialPairingOptions()
            pairing.overlap = config.sequential_overlap
            pycolmap.match_sequential(db_path, matching_options=matching_options, pairing_options=pairing,
                                      verification_options=verification, device=pycolmap.Device.cpu)
        timings["matching"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        (work_dir / "sparse").mkdir()
        models = pycolmap.incremental_mapping(db_path, image_root, work_dir / "sparse", options=mapping)
        timings["mapping"] = time.perf_counter() - t0
    finally:
        pycolmap.logging.minloglevel = previous_level

    result = SfmResult(poses=[None] * len(image_paths), camera=camera, n_images=len(image_paths),
                       n_models=len(models), matching=matching, timings_s=timings)
    if not models:
        return result
    best = max(models.values(), key=lambda r: r.num_reg_images())
    poses: list[np.ndarray | None] = [None] * len(image_paths)
    for image in best.images.values():
        if image.has_pose:
            cam_from_world = np.vstack([np.asarray(image.cam_from_world().matrix(), dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])
            poses[index_of[image.name]] = invert_pose(cam_from_world)
    colmap_camera = next(iter(best.cameras.values()))
    refined = np.asarray(colmap_camera.params, dtype=np.float64)
    if not config.refine_intrinsics and np.abs(refined - np.asarray(params)).max() > 1e-9:
        raise RuntimeError(f"pycolmap changed the fixed intrinsics {params} to {refined.tolist()}")
    result.camera = _camera_from_params(camera, model, refined) if config.refine_intrinsics else camera
    result.n_registered = sum(T is not None for T in poses)
    result.poses = _gauge(poses) if result.n_registered >= 2 else poses
    result.n_points3D = int(best.num_points3D())
    result.mean_reprojection_error_px = float(best.compute_mean_reprojection_error()) if result.n_points3D else float("nan")
    return result


def reconstruct_poses(image_paths: Sequence[str | Path], camera: CameraIntrinsics, work_dir: str | Path,
                      config: SfmConfig | None = None) -> SfmResult:
    """Poses of ``image_paths`` (one camera, images in sequence order) by incremental SfM.

    Returns poses in the gauge and unit of the module docstring, ``None`` for images that were
    not registered. Raises ``SfmError`` when fewer images than the config's limits register.
    """
    config = config or SfmConfig()
    config.validate()
    paths = [Path(p) for p in image_paths]
    if len(paths) < 2:
        raise SfmError(f"structure-from-motion needs at least 2 images, got {len(paths)}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SfmError(f"{len(missing)} image(s) for SfM do not exist, e.g. {missing[0]}")
    if len({p.resolve() for p in paths}) != len(paths):
        raise SfmError("an image is given twice to SfM")
    work_dir = Path(work_dir)
    key = _cache_key(paths, camera, config)
    result_path = work_dir / RESULT_FILE
    result = _load_result(result_path, key)
    if result is None:
        result = _run_colmap(paths, camera, work_dir, config)
        _save_result(result_path, key, result)
    else:
        log.info("SfM result for %d images reused from %s", len(paths), result_path)

    needed = max(config.min_registered_images, math.ceil(config.min_registered_fraction * len(paths)))
    if result.n_registered < needed:
        raise SfmError(
            f"SfM registered {result.n_registered} of {len(paths)} images (needs at least {needed}; "
            f"{result.n_models} model(s)). The frames may be too far apart or too alike: select more of them "
            "(a smaller --every or a larger --fraction), and check that the images are sharp and textured"
        )
    log.info("SfM registered %d of %d images (%s matching, %d points, %.2f px mean reprojection error)",
             result.n_registered, len(paths), result.matching, result.n_points3D, result.mean_reprojection_error_px)
    return result


__all__ = ["SfmConfig", "SfmError", "SfmResult", "reconstruct_poses", "scale_poses", "known_distance_scale",
           "colmap_camera_params", "MATCHING_MODES"]
