"""3D labels for mapping frames with KNOWN poses: COLMAP's point triangulator through pycolmap.

Steps:
1. Matches are checked against the known epipolar geometry (Sampson distance in pixels),
   which removes most wrong matches before they can join tracks.
2. A COLMAP database (cameras, rigs, frames, images, keypoints, verified two-view matches)
   and a reconstruction holding the given cameras and poses (COLMAP wants world-to-camera,
   ``cam_from_world``) are written to ``work_dir``.
3. ``pycolmap.triangulate_points`` builds tracks, triangulates, merges/completes tracks and
   runs bundle adjustment of the 3D points only: it keeps the poses of the given images fixed
   (``fix_existing_frames``) and intrinsics fixed (``refine_intrinsics=False``).
4. Our own filters then decide, per keypoint: an observation whose reprojection error exceeds
   the limit is dropped, then a point whose remaining track is too short or whose largest
   triangulation angle is too small is dropped with all its observations.

Every keypoint of every frame gets an entry: a 3D point (world, metres) and ``valid=True``, or
zeros and ``valid=False`` (zeros, not NaN, so a masked loss never meets a NaN).

Keypoints use OpenCV pixel coordinates; COLMAP's convention puts pixel centres at +0.5. The
principal point is passed in the same OpenCV convention, so both are shifted by the same
zero and the projective geometry is exactly the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from offline.sources.frames import Frame

log = logging.getLogger(__name__)

RESULT_FORMAT = "d2s_nerf_triangulation"
RESULT_VERSION = 1


@dataclass
class TriangulationConfig:
    max_reprojection_error_px: float = 4.0
    min_triangulation_angle_deg: float = 1.5
    min_track_length: int = 2
    # Matches farther than this from the epipolar line of the known poses are dropped first
    # (Sampson distance, pixels); None disables the check.
    max_epipolar_error_px: float | None = 4.0
    min_num_matches: int = 15          # pairs with fewer matches are ignored (COLMAP's min_num_matches)
    # COLMAP triangulator options (see pycolmap.IncrementalTriangulatorOptions).
    create_max_angle_error_deg: float = 2.0
    continue_max_angle_error_deg: float = 2.0
    merge_max_reprojection_error_px: float = 4.0
    complete_max_reprojection_error_px: float = 4.0
    complete_max_transitivity: int = 5
    # Few, sparse mapping frames: most tracks have two views, and they are most of the labels.
    ignore_two_view_tracks: bool = False
    global_refinements: int = 5        # rounds of point-only BA + track completion/merging
    num_threads: int = 2
    random_seed: int = 0
    verbose: bool = False              # COLMAP's INFO log on stderr

    def validate(self) -> None:
        if not self.max_reprojection_error_px > 0:
            raise ValueError(f"max_reprojection_error_px must be positive, got {self.max_reprojection_error_px}")
        if not self.min_triangulation_angle_deg >= 0:
            raise ValueError(f"min_triangulation_angle_deg must be >= 0, got {self.min_triangulation_angle_deg}")
        if self.min_track_length < 2:
            raise ValueError(f"min_track_length must be >= 2 (a point needs two views), got {self.min_track_length}")
        if self.max_epipolar_error_px is not None and not self.max_epipolar_error_px > 0:
            raise ValueError(f"max_epipolar_error_px must be positive or None, got {self.max_epipolar_error_px}")
        if self.min_num_matches < 1:
            raise ValueError(f"min_num_matches must be >= 1, got {self.min_num_matches}")
        if self.global_refinements < 1:
            raise ValueError(f"global_refinements must be >= 1, got {self.global_refinements}")


@dataclass
class TriangulationStats:
    n_frames: int = 0
    n_keypoints: int = 0
    n_pairs: int = 0                     # pairs given
    n_pairs_used: int = 0                # pairs with >= min_num_matches after the epipolar check
    n_matches: int = 0                   # matches given (after de-duplication)
    n_matches_epipolar: int = 0          # matches kept by the epipolar check
    n_keypoints_matched: int = 0         # keypoints in at least one match of a used pair
    # Keypoints COLMAP attached to a 3D point. COLMAP applies the same reprojection/angle limits
    # while it builds and refines tracks, so n_keypoints_matched - n_observations_colmap is what
    # it rejected; our filters below are the final, exact check on its output.
    n_observations_colmap: int = 0
    n_rejected_reprojection: int = 0     # keypoints dropped by our reprojection-error filter
    n_rejected_track_length: int = 0     # ... because their point's track was too short
    n_rejected_angle: int = 0            # ... because their point's triangulation angle was too small
    n_valid: int = 0                     # keypoints with a 3D label
    n_points3D: int = 0                  # distinct 3D points behind the valid keypoints
    mean_track_length: float = 0.0
    median_reprojection_error_px: float = float("nan")
    valid_per_frame: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not np.isfinite(d["median_reprojection_error_px"]):
            d["median_reprojection_error_px"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TriangulationStats":
        d = dict(d)
        if d.get("median_reprojection_error_px") is None:
            d["median_reprojection_error_px"] = float("nan")
        return cls(**d)


Labels = dict[str, tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- input checks

def _check_inputs(
    frames: list[Frame],
    keypoints: dict[str, np.ndarray],
    matches: dict[tuple[str, str], np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Validated keypoints (float64) and matches keyed by frame indices (a < b), one-to-one."""
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        raise ValueError("frame names must be unique")
    index = {n: i for i, n in enumerate(names)}
    kps: dict[str, np.ndarray] = {}
    for f in frames:
        if f.name not in keypoints:
            raise ValueError(f"no keypoints given for frame {f.name!r} (every frame needs an entry, possibly empty)")
        k = np.asarray(keypoints[f.name], dtype=np.float64)
        if k.size == 0:
            k = k.reshape(0, 2)
        if k.ndim != 2 or k.shape[1] != 2:
            raise ValueError(f"keypoints of {f.name!r} must be (N, 2), got {k.shape}")
        if not np.all(np.isfinite(k)):
            raise ValueError(f"keypoints of {f.name!r} hold non-finite values")
        kps[f.name] = k
    unknown = sorted(set(keypoints) - set(names))
    if unknown:
        raise ValueError(f"keypoints given for frames that are not in the frame list: {unknown[:5]}")

    merged: dict[tuple[int, int], list[np.ndarray]] = {}
    for key, m in matches.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"match keys must be (name_a, name_b) tuples, got {key!r}")
        a, b = key
        if a not in index or b not in index:
            raise ValueError(f"matches for pair {key!r} name a frame that is not in the frame list")
        if a == b:
            raise ValueError(f"matches for the self pair {key!r}: a frame cannot be matched to itself")
        m = np.asarray(m)
        if m.size == 0:
            m = m.reshape(0, 2)
        if m.ndim != 2 or m.shape[1] != 2 or not np.issubdtype(m.dtype, np.integer):
            raise ValueError(f"matches of {key!r} must be an (M, 2) integer array, got {m.shape} {m.dtype}")
        m = m.astype(np.int64)
        na, nb = len(kps[a]), len(kps[b])
        if len(m) and (m.min() < 0 or m[:, 0].max() >= na or m[:, 1].max() >= nb):
            raise ValueError(f"matches of {key!r} index outside the keypoints ({na} in {a!r}, {nb} in {b!r})")
        ia, ib = index[a], index[b]
        if ia > ib:
            ia, ib, m = ib, ia, m[:, ::-1]
        merged.setdefault((ia, ib), []).append(m)

    out: dict[tuple[int, int], np.ndarray] = {}
    for key in sorted(merged):
        m = np.unique(np.concatenate(merged[key]), axis=0)
        # One-to-one: a keypoint matched twice into the same image would make a track
        # observe one image twice; keep the first match of each keypoint on each side.
        _, first_a = np.unique(m[:, 0], return_index=True)
        m = m[np.sort(first_a)]
        _, first_b = np.unique(m[:, 1], return_index=True)
        out[key] = m[np.sort(first_b)]
    return kps, out


# ----------------------------------------------------------------------------- geometry helpers

def _undistorted(frame: Frame, k: np.ndarray) -> np.ndarray:
    return frame.camera.undistort_points(k) if frame.camera.has_distortion else k


def _sampson_distance_px(fa: Frame, fb: Frame, xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Sampson distance (pixels) of correspondences to the epipolar geometry of the known poses."""
    Ta, Tb = fa.T_world_cam, fb.T_world_cam
    T_b_a = np.linalg.inv(Tb) @ Ta
    R, t = T_b_a[:3, :3], T_b_a[:3, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    F = np.linalg.inv(fb.camera.K).T @ (tx @ R) @ np.linalg.inv(fa.camera.K)
    ha = np.hstack([xa, np.ones((len(xa), 1))])
    hb = np.hstack([xb, np.ones((len(xb), 1))])
    Fa = ha @ F.T        # epipolar lines in b
    Ftb = hb @ F         # epipolar lines in a
    num = np.einsum("ij,ij->i", hb, Fa) ** 2
    den = Fa[:, 0] ** 2 + Fa[:, 1] ** 2 + Ftb[:, 0] ** 2 + Ftb[:, 1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(num / den)


def _reprojection_errors(frame: Frame, points: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    T_cam_world = np.linalg.inv(frame.T_world_cam)
    pc = points @ T_cam_world[:3, :3].T + T_cam_world[:3, 3]
    cam = frame.camera
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([cam.fx * pc[:, 0] / pc[:, 2] + cam.cx, cam.fy * pc[:, 1] / pc[:, 2] + cam.cy], axis=1)
    err = np.linalg.norm(uv - pixels, axis=1)
    err[~(pc[:, 2] > 0)] = np.inf  # behind the camera: never a valid observation
    return err


def _max_triangulation_angle_deg(point: np.ndarray, centres: np.ndarray) -> float:
    rays = centres - point
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    cos = np.clip(rays @ rays.T, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos.min())))


# ----------------------------------------------------------------------------- cache

def _fingerprint(frames, kps, matches, config: TriangulationConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    for f in frames:
        h.update(f.name.encode())
        h.update(np.ascontiguousarray(f.T_world_cam, dtype=np.float64).tobytes())
        h.update(json.dumps(f.camera.to_dict(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(kps[f.name], dtype=np.float64).tobytes())
    for (a, b), m in matches.items():
        h.update(f"{a},{b}".encode())
        h.update(np.ascontiguousarray(m, dtype=np.int64).tobytes())
    return h.hexdigest()


def _load_cached(path: Path, fingerprint: str, frames: list[Frame]) -> tuple[Labels, TriangulationStats] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != RESULT_FORMAT or meta.get("version") != RESULT_VERSION:
                return None
            if meta.get("fingerprint") != fingerprint:
                return None
            labels = {f.name: (z[f"{i}/points3D"], z[f"{i}/valid"]) for i, f in enumerate(frames)}
            return labels, TriangulationStats.from_dict(meta["stats"])
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable triangulation cache %s: %s", path, exc)
        return None


def _save(path: Path, fingerprint: str, frames: list[Frame], labels: Labels, stats: TriangulationStats) -> None:
    meta = {"format": RESULT_FORMAT, "version": RESULT_VERSION, "fingerprint": fingerprint, "stats": stats.to_dict()}
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for i, f in enumerate(frames):
        arrays[f"{i}/points3D"], arrays[f"{i}/valid"] = labels[f.name]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    (path.parent / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))


# ----------------------------------------------------------------------------- COLMAP

def _pinhole_params(frame: Frame) -> list[float]:
    c = frame.camera
    return [c.fx, c.fy, c.cx, c.cy]


def _run_colmap(
    frames: list[Frame],
    kps_undist: dict[str, np.ndarray],
    matches: dict[tuple[int, int], np.ndarray],
    config: TriangulationConfig,
    work_dir: Path,
):
    import pycolmap

    if work_dir.exists():
        shutil.rmtree(work_dir)  # a half-written database from an interrupted run must not be reused
    (work_dir / "images").mkdir(parents=True)
    (work_dir / "sparse").mkdir()
    db_path = work_dir / "database.db"

    reconstruction = pycolmap.Reconstruction()
    db = pycolmap.Database.open(str(db_path))
    try:
        for i, f in enumerate(frames):
            ident = i + 1  # COLMAP ids start at 1; one camera, rig and frame per image
            camera = pycolmap.Camera(model="PINHOLE", width=int(f.camera.width), height=int(f.camera.height),
                                     params=_pinhole_params(f), camera_id=ident)
            db.write_camera(camera, use_camera_id=True)
            rig = pycolmap.Rig(rig_id=ident)
            rig.add_ref_sensor(camera.sensor_id)
            db.write_rig(rig, use_rig_id=True)
            image = pycolmap.Image(name=f.name, camera_id=ident, image_id=ident)
            db.write_image(image, use_image_id=True)
            frame = pycolmap.Frame(frame_id=ident, rig_id=ident)
            frame.add_data_id(image.data_id)
            db.write_frame(frame, use_frame_id=True)
            db.write_keypoints(ident, np.ascontiguousarray(kps_undist[f.name], dtype=np.float32).reshape(-1, 2))

            reconstruction.add_camera_with_trivial_rig(camera)
            T_cam_world = np.linalg.inv(f.T_world_cam)
            reconstruction.add_image_with_trivial_frame(
                pycolmap.Image(name=f.name, keypoints=kps_undist[f.name], camera_id=ident, image_id=ident),
                pycolmap.Rigid3d(T_cam_world[:3, :]),
            )
        for (a, b), m in matches.items():
            m32 = np.ascontiguousarray(m, dtype=np.uint32)
            db.write_matches(a + 1, b + 1, m32)
            geometry = pycolmap.TwoViewGeometry(config=pycolmap.TwoViewGeometryConfiguration.CALIBRATED,
                                                inlier_matches=m32)
            db.write_two_view_geometry(a + 1, b + 1, geometry)
    finally:
        db.close()

    options = pycolmap.IncrementalPipelineOptions()
    options.min_num_matches = config.min_num_matches
    options.num_threads = config.num_threads
    options.random_seed = config.random_seed
    options.extract_colors = False
    options.ba_global_max_refinements = config.global_refinements
    options.mapper.filter_max_reproj_error = config.max_reprojection_error_px
    options.mapper.filter_min_tri_angle = config.min_triangulation_angle_deg
    tri = options.triangulation
    tri.min_angle = config.min_triangulation_angle_deg
    tri.create_max_angle_error = config.create_max_angle_error_deg
    tri.continue_max_angle_error = config.continue_max_angle_error_deg
    tri.merge_max_reproj_error = config.merge_max_reprojection_error_px
    tri.complete_max_reproj_error = config.complete_max_reprojection_error_px
    tri.complete_max_transitivity = config.complete_max_transitivity
    tri.ignore_two_view_tracks = config.ignore_two_view_tracks
    tri.random_seed = config.random_seed

    # COLMAP stores rotations as quaternions, so a pose that is orthonormal only to ~1e-4 (text
    # files) comes back re-normalised; compare against COLMAP's own copy taken before the run.
    poses_before = {i: reconstruction.image(i + 1).cam_from_world().matrix().copy() for i in range(len(frames))}
    previous_level = pycolmap.logging.minloglevel
    if not config.verbose:
        pycolmap.logging.minloglevel = 2  # ERROR: the triangulator is chatty at INFO
    try:
        reconstruction = pycolmap.triangulate_points(
            reconstruction, str(db_path), str(work_dir / "images"), str(work_dir / "sparse"),
            clear_points=True, options=options, refine_intrinsics=False,
        )
    finally:
        pycolmap.logging.minloglevel = previous_level

    # The poses must come back unchanged: the labels are only as good as the given poses.
    for i, f in enumerate(frames):
        image = reconstruction.image(i + 1)
        if image.name != f.name:
            raise RuntimeError(f"COLMAP image {i + 1} is {image.name!r}, expected {f.name!r}")
        drift = float(np.abs(image.cam_from_world().matrix() - poses_before[i]).max())
        if drift > 1e-6:
            raise RuntimeError(f"pycolmap moved the fixed pose of {f.name!r} by {drift:.3g}")
    return reconstruction


# ----------------------------------------------------------------------------- main entry

def triangulate_labels(
    frames: list[Frame],
    keypoints: dict[str, np.ndarray],
    matches: dict[tuple[str, str], np.ndarray],
    config: TriangulationConfig = TriangulationConfig(),
    work_dir: str | Path | None = None,
) -> tuple[Labels, TriangulationStats]:
    """3D labels per keypoint from matches between frames with known, fixed poses.

    ``keypoints[name]``: (N, 2) pixels of each frame (every frame needs an entry).
    ``matches[(name_a, name_b)]``: (M, 2) int indices into the keypoints of a and b.
    Returns ``({name: (points3D (N, 3) float32 world, valid (N,) bool)}, stats)``.
    ``work_dir`` holds the COLMAP database and model and a cache of the result: a second call
    with identical inputs returns the cached labels. None: a temporary folder.
    """
    config.validate()
    kps, pair_matches = _check_inputs(frames, keypoints, matches)
    stats = TriangulationStats(
        n_frames=len(frames),
        n_keypoints=int(sum(len(k) for k in kps.values())),
        n_pairs=len(pair_matches),
        n_matches=int(sum(len(m) for m in pair_matches.values())),
    )

    if work_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="d2s_triangulation_") as tmp:
            return _triangulate(frames, kps, pair_matches, config, Path(tmp), stats, use_cache=False)
    return _triangulate(frames, kps, pair_matches, config, Path(work_dir), stats, use_cache=True)


def _triangulate(frames, kps, pair_matches, config, work_dir: Path, stats: TriangulationStats, use_cache: bool):
    work_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(frames, kps, pair_matches, config)
    result_path = work_dir / "labels.npz"
    if use_cache:
        cached = _load_cached(result_path, fingerprint, frames)
        if cached is not None:
            log.info("triangulation: reusing %s", result_path)
            return cached

    kps_undist = {f.name: _undistorted(f, kps[f.name]) for f in frames}

    # 1. Epipolar check with the known poses, then the minimum match count per pair.
    kept: dict[tuple[int, int], np.ndarray] = {}
    for (a, b), m in pair_matches.items():
        if config.max_epipolar_error_px is not None and len(m):
            d = _sampson_distance_px(frames[a], frames[b], kps_undist[frames[a].name][m[:, 0]],
                                     kps_undist[frames[b].name][m[:, 1]])
            m = m[d <= config.max_epipolar_error_px]
        stats.n_matches_epipolar += len(m)
        if len(m) >= config.min_num_matches:
            kept[(a, b)] = m
    stats.n_pairs_used = len(kept)
    matched = {f.name: np.zeros(len(kps[f.name]), bool) for f in frames}
    for (a, b), m in kept.items():
        matched[frames[a].name][m[:, 0]] = True
        matched[frames[b].name][m[:, 1]] = True
    stats.n_keypoints_matched = int(sum(v.sum() for v in matched.values()))

    labels: Labels = {
        f.name: (np.zeros((len(kps[f.name]), 3), np.float32), np.zeros(len(kps[f.name]), bool)) for f in frames
    }
    if kept and len(frames) >= 2:
        reconstruction = _run_colmap(frames, kps_undist, kept, config, work_dir / "colmap")
        _collect_labels(frames, kps_undist, reconstruction, config, labels, stats)
    else:
        log.warning("triangulation: no pair has %d matches after the epipolar check; every keypoint is invalid",
                    config.min_num_matches)

    stats.valid_per_frame = {name: int(v.sum()) for name, (_, v) in labels.items()}
    stats.n_valid = int(sum(stats.valid_per_frame.values()))
    if use_cache:
        _save(result_path, fingerprint, frames, labels, stats)
    return labels, stats


def _collect_labels(frames, kps_undist, reconstruction, config: TriangulationConfig, labels: Labels,
                    stats: TriangulationStats) -> None:
    """Apply our filters to COLMAP's points and write the surviving labels."""
    centres = np.stack([f.T_world_cam[:3, 3] for f in frames])
    # Flatten every observation: (point row, frame index, keypoint index).
    xyz_rows: list[np.ndarray] = []
    obs_rows: list[tuple[int, int, int]] = []
    for row, (_, point) in enumerate(reconstruction.points3D.items()):
        xyz_rows.append(np.asarray(point.xyz, dtype=np.float64))
        obs_rows.extend((row, el.image_id - 1, el.point2D_idx) for el in point.track.elements)
    stats.n_observations_colmap = len(obs_rows)
    if not obs_rows:
        return
    xyz = np.stack(xyz_rows)
    obs = np.array(obs_rows, dtype=np.int64)

    # Reprojection error of every observation, one batch per frame.
    err = np.empty(len(obs))
    for i, f in enumerate(frames):
        sel = np.flatnonzero(obs[:, 1] == i)
        if len(sel):
            err[sel] = _reprojection_errors(f, xyz[obs[sel, 0]], kps_undist[f.name][obs[sel, 2]])
    good = err <= config.max_reprojection_error_px
    stats.n_rejected_reprojection = int((~good).sum())
    obs, err = obs[good], err[good]

    track_lengths: list[int] = []
    errors: list[np.ndarray] = []
    order = np.argsort(obs[:, 0], kind="stable")
    obs, err = obs[order], err[order]
    bounds = np.flatnonzero(np.diff(obs[:, 0])) + 1
    for group, group_err in zip(np.split(obs, bounds), np.split(err, bounds)):
        if not len(group):
            continue
        views = np.unique(group[:, 1])
        # Track length counts distinct frames: two keypoints of one frame do not make a baseline.
        if len(views) < config.min_track_length:
            stats.n_rejected_track_length += len(group)
            continue
        point = xyz[group[0, 0]]
        if _max_triangulation_angle_deg(point, centres[views]) < config.min_triangulation_angle_deg:
            stats.n_rejected_angle += len(group)
            continue
        track_lengths.append(len(views))
        errors.append(group_err)
        for _, i, k in group:
            pts, valid = labels[frames[i].name]
            pts[k] = point
            valid[k] = True
    stats.n_points3D = len(track_lengths)
    stats.mean_track_length = float(np.mean(track_lengths)) if track_lengths else 0.0
    if errors:
        stats.median_reprojection_error_px = float(np.median(np.concatenate(errors)))
