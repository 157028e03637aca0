"""Structure-based baseline, what a user would otherwise pick (hloc-like): retrieve the
mapping frames that share the most mutual-nearest-neighbour descriptors with the query,
match the query to their labelled keypoints, and solve PnP with the same RANSAC as D2S.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.localizer import LocalizationResult
from d2s_nerf_ros.pnp import PnPConfig, solve_pnp_ransac


@dataclass
class MatchingBaselineConfig:
    retrieval_top_k: int = 3
    matcher: str = "auto"  # LightGlue where the extractor has weights for it, else mutual NN
    ransac_threshold_px: float = 12.0
    ransac_iterations: int = 10000
    min_inliers: int = 15
    device: str = "auto"


@dataclass
class MapFrameFeatures:
    keypoints: np.ndarray
    descriptors: np.ndarray
    points3D: np.ndarray
    valid: np.ndarray
    image_size: tuple[int, int]


def load_map_points(map_path: Path) -> list[MapFrameFeatures]:
    from safetensors.numpy import load_file

    from d2s_nerf_ros.map_bundle import MapBundle

    bundle = MapBundle.load(map_path, device="cpu")  # verifies hashes of every file
    path = Path(map_path) / "map_points.safetensors"
    if not path.exists():
        raise ValueError(f"{map_path} has no map_points.safetensors: rebuild the map to use the matching baseline")
    arrays = load_file(str(path))
    cam = bundle.manifest["camera"]
    n = len({k.split(".")[0] for k in arrays})
    frames = []
    for i in range(n):
        frames.append(MapFrameFeatures(
            keypoints=arrays[f"{i}.keypoints"], descriptors=arrays[f"{i}.descriptors"].astype(np.float32),
            points3D=arrays[f"{i}.points3D"], valid=arrays[f"{i}.valid"].astype(bool),
            image_size=(int(cam["width"]), int(cam["height"]))))
    return frames


def mutual_nn_count(desc_q: np.ndarray, desc_m: np.ndarray) -> int:
    if len(desc_q) == 0 or len(desc_m) == 0:
        return 0
    sim = desc_q @ desc_m.T
    nn_qm = sim.argmax(1)
    nn_mq = sim.argmax(0)
    return int((nn_mq[nn_qm] == np.arange(len(desc_q))).sum())


class MatchingBaseline:
    def __init__(self, map_path: Path, config: MatchingBaselineConfig = MatchingBaselineConfig()):
        from d2s_nerf_ros.features import extractor_from_config
        from d2s_nerf_ros.map_bundle import MapBundle
        from offline.matching import make_matcher

        self.config = config
        bundle = MapBundle.load(map_path, device="cpu")
        self.extractor = extractor_from_config(bundle.manifest["extractor"], device=config.device)
        self.matcher = make_matcher(config.matcher, self.extractor.name, device=config.device)
        self.map_frames = load_map_points(map_path)
        self.pnp = PnPConfig(threshold_px=config.ransac_threshold_px, iterations=config.ransac_iterations,
                             min_inliers=config.min_inliers)

    def localize(self, image: np.ndarray, camera: CameraIntrinsics) -> LocalizationResult:
        from d2s_nerf_ros.features.base import Features

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            feats = self.extractor.extract(image)
            t1 = time.perf_counter()
            timings["extract"] = (t1 - t0) * 1e3
            counts = [mutual_nn_count(feats.descriptors, m.descriptors) for m in self.map_frames]
            top = np.argsort(counts)[::-1][: self.config.retrieval_top_k]
            p2d, p3d = [], []
            for j in top:
                m = self.map_frames[j]
                mf = Features(keypoints=m.keypoints, descriptors=m.descriptors,
                              scores=np.ones(len(m.keypoints), np.float32), image_size=m.image_size)
                res = self.matcher.match(feats, mf)
                idx = res.indices
                ok = m.valid[idx[:, 1]]
                p2d.append(feats.keypoints[idx[ok, 0]])
                p3d.append(m.points3D[idx[ok, 1]])
            t2 = time.perf_counter()
            timings["match"] = (t2 - t1) * 1e3
            pts2d = camera.undistort_points(np.concatenate(p2d)) if p2d else np.zeros((0, 2))
            pts3d = np.concatenate(p3d) if p3d else np.zeros((0, 3))
            pnp = solve_pnp_ransac(pts2d, pts3d, camera, self.pnp)
            t3 = time.perf_counter()
            timings["pnp"] = (t3 - t2) * 1e3
            timings["total"] = (t3 - t0) * 1e3
            return LocalizationResult(
                success=bool(pnp.success), reason=pnp.reason, T_world_cam=pnp.T_world_cam if pnp.success else None,
                covariance=pnp.covariance if pnp.success else None, n_keypoints=len(feats.keypoints),
                n_reliable=len(pts2d), n_inliers=int(pnp.n_inliers), timings_ms=timings)
        except Exception as exc:  # a bad query must not end an evaluation run
            timings["total"] = (time.perf_counter() - t0) * 1e3
            return LocalizationResult(success=False, reason=f"{type(exc).__name__}: {exc}", T_world_cam=None,
                                      covariance=None, n_keypoints=0, n_reliable=0, n_inliers=0, timings_ms=timings)
