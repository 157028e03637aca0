"""The onboard localizer: one image + intrinsics -> camera pose in the map, or a reason why not.

Pipeline: check the image -> local features with the map's extractor -> D2S scene
coordinates and reliabilities -> keep the reliable ones -> undistort the keypoints ->
PnP-RANSAC (``d2s_nerf_ros.pnp``) -> acceptance gates (inlier count, inlier ratio, reprojection
RMSE) -> covariance from the map's error model (``d2s_nerf_ros.error_model``).
``Localizer.localize`` never raises: anything that goes
wrong with a frame becomes ``success=False`` with a reason, so a node can keep running
whatever the camera sends.

Onboard only: torch, numpy, OpenCV, poselib (no nerfstudio, pycolmap, rosbags).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.device import resolve_device, set_torch_threads
from d2s_nerf_ros.errors import FrameRejected
from d2s_nerf_ros.features.base import Features
from d2s_nerf_ros.features.onnx_runtime import BACKEND_CHOICES
from d2s_nerf_ros.map_bundle import MapBundle
from d2s_nerf_ros.models.d2s import reliability
from d2s_nerf_ros.error_model import ErrorModel
from d2s_nerf_ros.pnp import REFERENCE_DIAGONAL_PX, PnPConfig, solve_pnp_ransac

# Smallest image side the localizer accepts; below this no extractor finds useful structure.
MIN_IMAGE_SIDE_PX = 16


@dataclass
class LocalizerConfig:
    max_keypoints: int = 1024
    reliability_threshold: float = 0.5
    ransac_threshold_px: float = 12.0  # at 640x480, scaled with the image diagonal
    ransac_iterations: int = 10000
    min_inliers: int = 15
    # Acceptance gates against confident wrong poses (frames of another place, blank walls): RANSAC
    # always finds some consistent subset, so the count alone is not evidence.
    # Measured (docs/BENCHMARKS.md, wrong-scene): held-out RedKitchen frames 0.11-0.41, demo-room
    # frames against the RedKitchen map 0.026-0.039 at 21-30 inliers (the count alone cannot tell).
    min_inlier_ratio: float = 0.07            # n_inliers / correspondences given to PnP
    # Inlier RMSE is ~7 px for true and wrong frames alike at the 12 px threshold (RANSAC fills
    # the threshold either way): only a sanity bound, not what tells scenes apart.
    max_reprojection_rmse_px: float = 9.0     # at 640x480, scaled with the image diagonal
    # Viewpoint support: D2S regresses coordinates only for views like those it was trained on, so
    # a pose with no mapping camera within this distance that looks the same way (optical axes
    # within max_angle_to_mapping_deg) is not this map's scene. Measured (docs/BENCHMARKS.md,
    # wrong-scene): held-out RedKitchen poses 0.03-0.17 m from such a camera; every wrong-scene
    # pose that passed the other gates 1.15-14 m or none looking that way. 0 turns the gate off.
    max_distance_to_mapping_m: float = 1.0
    max_angle_to_mapping_deg: float = 45.0
    device: str = "auto"
    extractor_backend: str = "auto"  # auto | torch | onnxruntime (auto: onnxruntime on the CPU, torch on CUDA)
    num_threads: int = 0             # torch and onnxruntime intra/inter-op threads; 0: the libraries' defaults

    def validate(self) -> None:
        if isinstance(self.max_keypoints, bool) or int(self.max_keypoints) < 4:
            raise ValueError(f"max_keypoints must be an integer >= 4, got {self.max_keypoints!r}")
        if not (math.isfinite(self.reliability_threshold) and 0.0 <= self.reliability_threshold <= 1.0):
            raise ValueError(f"reliability_threshold must be in [0, 1], got {self.reliability_threshold}")
        if not (math.isfinite(self.ransac_threshold_px) and self.ransac_threshold_px > 0):
            raise ValueError(f"ransac_threshold_px must be positive, got {self.ransac_threshold_px}")
        if int(self.ransac_iterations) < 1:
            raise ValueError(f"ransac_iterations must be >= 1, got {self.ransac_iterations}")
        if int(self.min_inliers) < 4:
            raise ValueError(f"min_inliers must be >= 4, got {self.min_inliers}")
        if self.extractor_backend not in BACKEND_CHOICES:
            raise ValueError(f"extractor_backend must be one of {', '.join(BACKEND_CHOICES)}, "
                             f"got {self.extractor_backend!r}")
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0 (0: library default), got {self.num_threads!r}")
        if not (math.isfinite(self.min_inlier_ratio) and 0.0 <= self.min_inlier_ratio <= 1.0):
            raise ValueError(f"min_inlier_ratio must be in [0, 1], got {self.min_inlier_ratio}")
        if not (math.isfinite(self.max_reprojection_rmse_px) and self.max_reprojection_rmse_px > 0):
            raise ValueError(f"max_reprojection_rmse_px must be positive, got {self.max_reprojection_rmse_px}")
        if not (math.isfinite(self.max_distance_to_mapping_m) and self.max_distance_to_mapping_m >= 0):
            raise ValueError(f"max_distance_to_mapping_m must be >= 0 (0: off), got {self.max_distance_to_mapping_m}")
        if not (math.isfinite(self.max_angle_to_mapping_deg) and 0 < self.max_angle_to_mapping_deg <= 180):
            raise ValueError(f"max_angle_to_mapping_deg must be in (0, 180], got {self.max_angle_to_mapping_deg}")

    def pnp_config(self) -> PnPConfig:
        return PnPConfig(threshold_px=float(self.ransac_threshold_px), iterations=int(self.ransac_iterations),
                         min_inliers=int(self.min_inliers))

    @property
    def fallback_top_k(self) -> int:
        """How many of the most reliable predictions PnP gets when too few pass the threshold."""
        return max(4 * int(self.min_inliers), 100)


@dataclass
class LocalizationResult:
    success: bool
    reason: str                         # "" on success
    T_world_cam: np.ndarray | None      # 4x4 camera-to-world in the map frame; None on failure
    covariance: np.ndarray | None       # 6x6 (x y z rx ry rz) of the camera pose in world (pnp.py), from the map's error model
    n_keypoints: int
    n_reliable: int                     # predictions that passed the reliability threshold
    n_inliers: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # extract, d2s, pnp, total (stages reached)
    used_fallback: bool = False         # too few reliable predictions: PnP got the top-k most reliable
    reprojection_rmse_px: float = float("nan")
    n_correspondences: int = 0          # 2D-3D pairs given to PnP
    inlier_ratio: float = float("nan")  # n_inliers / n_correspondences (also on a gated failure)
    # PnP's pose even when a gate refused it (None when PnP found none): for measuring the gates.
    rejected_T_world_cam: np.ndarray | None = None
    inliers_2d: np.ndarray | None = None  # (n, 2) undistorted pixels of the PnP inliers (success only)
    inliers_3d: np.ndarray | None = None  # (n, 3) their regressed world coordinates
    # Every detected keypoint (image pixels, as detected) and its role, once D2S has run (success
    # or a gated failure): KEYPOINT_UNUSED / KEYPOINT_OUTLIER / KEYPOINT_INLIER. For ~/debug_image.
    keypoints_px: np.ndarray | None = None
    keypoint_roles: np.ndarray | None = None


# Roles of a keypoint in one localisation (LocalizationResult.keypoint_roles).
KEYPOINT_UNUSED = 0    # its D2S reliability was below the threshold: not given to PnP
KEYPOINT_OUTLIER = 1   # given to PnP, outside the RANSAC inlier set
KEYPOINT_INLIER = 2    # a PnP inlier


def check_frame(image: object, camera: object) -> np.ndarray:
    """The image as uint8 (RGB HxWx3 or grey HxW) matching ``camera``, or ``FrameRejected``."""
    if image is None:
        raise FrameRejected("no image")
    if not isinstance(image, np.ndarray):
        raise FrameRejected(f"image must be a numpy array, got {type(image).__name__}")
    if not isinstance(camera, CameraIntrinsics):
        raise FrameRejected(f"camera must be CameraIntrinsics, got {type(camera).__name__}")
    if image.dtype not in (np.uint8, np.uint16):
        raise FrameRejected(f"image dtype {image.dtype} is not supported (uint8 or uint16)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise FrameRejected(f"image must be grey HxW or RGB HxWx3, got shape {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise FrameRejected(f"image is empty ({width}x{height})")
    if (width, height) != (int(camera.width), int(camera.height)):
        raise FrameRejected(f"image size {width}x{height} does not match camera info {camera.width}x{camera.height}")
    if min(width, height) < MIN_IMAGE_SIDE_PX:
        raise FrameRejected(f"image {width}x{height} is too small (minimum side {MIN_IMAGE_SIDE_PX} px)")
    if image.dtype == np.uint16:
        from d2s_nerf_ros.image_conversion import to_uint8

        image = to_uint8(image)
    return np.ascontiguousarray(image)


class Localizer:
    def __init__(self, bundle: MapBundle, config: LocalizerConfig | None = None) -> None:
        from d2s_nerf_ros.features import extractor_from_config

        self.config = config or LocalizerConfig()
        self.config.validate()
        self.bundle = bundle
        self.device = resolve_device(self.config.device)
        set_torch_threads(int(self.config.num_threads))
        # The map fixes the feature type; the runtime chooses how many keypoints to spend and
        # how the network runs (backend, threads).
        extractor_config = dict(bundle.extractor_config)
        extractor_config["max_keypoints"] = int(self.config.max_keypoints)
        self.extractor = extractor_from_config(extractor_config, device=str(self.device.type),
                                               backend=self.config.extractor_backend,
                                               num_threads=int(self.config.num_threads))
        self.model = bundle.build_model(self.device)
        model_dim = int(self.model.config.descriptor_dim)
        if int(self.extractor.descriptor_dim) != model_dim:
            raise ValueError(f"the map's D2S model expects {model_dim}-d descriptors but its extractor "
                             f"{extractor_config.get('name')!r} gives {self.extractor.descriptor_dim}-d ones")
        self.pnp_config = self.config.pnp_config()
        # How wrong the regressed coordinates are, measured when the map was built (or the
        # documented fallback for maps without one): it turns PnP's fit into a pose covariance.
        self.error_model = ErrorModel.from_manifest(bundle.manifest)
        # Where the mapping cameras stood and looked (the viewpoint-support gate).
        self.mapping_centres, self.mapping_axes = mapping_viewpoints(bundle.manifest)

    @classmethod
    def from_path(cls, map_path: Path | str, config: LocalizerConfig | None = None) -> "Localizer":
        return cls(MapBundle.load(Path(map_path), device="cpu"), config or LocalizerConfig())

    # ------------------------------------------------------------------ public
    def localize(self, image: np.ndarray, camera: CameraIntrinsics) -> LocalizationResult:
        """Never raises: every problem with the frame is a failed result with a reason."""
        timings: dict[str, float] = {}
        counts = {"n_keypoints": 0, "n_reliable": 0, "n_inliers": 0}
        t_start = time.perf_counter()
        try:
            result = self._localize(image, camera, timings, counts)
        except FrameRejected as exc:
            result = self._failure(str(exc), counts, timings)
        except Exception as exc:  # noqa: BLE001 - the contract: a bad frame never takes the caller down
            result = self._failure(f"{type(exc).__name__}: {exc}", counts, timings)
        result.timings_ms["total"] = (time.perf_counter() - t_start) * 1e3
        return result

    def localize_features(self, features: Features, camera: CameraIntrinsics) -> LocalizationResult:
        """``localize`` from features already extracted with this map's extractor settings (an
        offline evaluation's query cache); never raises either."""
        timings: dict[str, float] = {}
        counts = {"n_keypoints": 0, "n_reliable": 0, "n_inliers": 0}
        t_start = time.perf_counter()
        try:
            if not isinstance(features, Features):
                raise FrameRejected(f"features must be Features, got {type(features).__name__}")
            if not isinstance(camera, CameraIntrinsics):
                raise FrameRejected(f"camera must be CameraIntrinsics, got {type(camera).__name__}")
            if tuple(features.image_size) != (int(camera.width), int(camera.height)):
                raise FrameRejected(f"features of a {features.image_size[0]}x{features.image_size[1]} image do not "
                                    f"match camera info {camera.width}x{camera.height}")
            if len(features) and features.descriptor_dim != int(self.model.config.descriptor_dim):
                raise FrameRejected(f"{features.descriptor_dim}-d descriptors; the map's D2S model expects "
                                    f"{self.model.config.descriptor_dim}-d ones")
            result = self._localize_features(features, camera, timings, counts)
        except FrameRejected as exc:
            result = self._failure(str(exc), counts, timings)
        except Exception as exc:  # noqa: BLE001 - same contract as localize()
            result = self._failure(f"{type(exc).__name__}: {exc}", counts, timings)
        result.timings_ms["total"] = (time.perf_counter() - t_start) * 1e3
        return result

    def warmup(self) -> LocalizationResult:
        """Run one synthetic frame so that lazy initialisation and kernel selection happen now."""
        camera = self.bundle.camera
        rng = np.random.default_rng(0)
        # Smoothed noise: textured enough for every extractor to fire.
        import cv2

        noise = rng.integers(0, 256, (camera.height, camera.width, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(noise, (5, 5), 1.5)
        return self.localize(image, camera)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _failure(reason: str, counts: dict[str, int], timings: dict[str, float]) -> LocalizationResult:
        return LocalizationResult(success=False, reason=reason, T_world_cam=None, covariance=None,
                                  n_keypoints=counts["n_keypoints"], n_reliable=counts["n_reliable"],
                                  n_inliers=counts["n_inliers"], timings_ms=timings)

    def _localize(self, image: object, camera: object, timings: dict[str, float],
                  counts: dict[str, int]) -> LocalizationResult:
        image = check_frame(image, camera)
        assert isinstance(camera, CameraIntrinsics)

        t0 = time.perf_counter()
        features = self.extractor.extract(image)
        timings["extract"] = (time.perf_counter() - t0) * 1e3
        return self._localize_features(features, camera, timings, counts)

    def _localize_features(self, features: Features, camera: CameraIntrinsics, timings: dict[str, float],
                           counts: dict[str, int]) -> LocalizationResult:
        min_inliers = int(self.config.min_inliers)
        n_keypoints = len(features.keypoints)
        counts["n_keypoints"] = n_keypoints
        if n_keypoints < min_inliers:
            raise FrameRejected(f"only {n_keypoints} keypoints detected (need at least {min_inliers})")

        t0 = time.perf_counter()
        with torch.inference_mode():
            descriptors = torch.from_numpy(features.descriptors).to(self.device)[None]
            mask = torch.ones(descriptors.shape[:2], dtype=torch.bool, device=self.device)
            xyz_t, u_t = self.model(descriptors, mask)
            r_t = reliability(u_t[0])
            xyz = xyz_t[0].float().cpu().numpy().astype(np.float64)
            r = r_t.float().cpu().numpy().astype(np.float64)
        timings["d2s"] = (time.perf_counter() - t0) * 1e3

        finite = np.isfinite(xyz).all(axis=1) & np.isfinite(r)
        reliable = finite & (r >= float(self.config.reliability_threshold))
        n_reliable = int(reliable.sum())
        counts["n_reliable"] = n_reliable
        used_fallback = False
        if n_reliable >= min_inliers:
            selected = np.flatnonzero(reliable)
        else:
            # Too few confident predictions: let RANSAC sort out the most reliable ones anyway.
            candidates = np.flatnonzero(finite)
            order = np.argsort(-r[candidates], kind="stable")
            selected = candidates[order[: self.config.fallback_top_k]]
            used_fallback = True

        t0 = time.perf_counter()
        points2D = camera.undistort_points(features.keypoints[selected].astype(np.float64))
        pnp = solve_pnp_ransac(points2D, xyz[selected], camera, self.pnp_config)
        timings["pnp"] = (time.perf_counter() - t0) * 1e3
        counts["n_inliers"] = int(pnp.n_inliers)

        n_correspondences = len(selected)
        inlier_ratio = pnp.n_inliers / n_correspondences if n_correspondences else float("nan")
        roles = np.full(n_keypoints, KEYPOINT_UNUSED, dtype=np.uint8)
        roles[selected] = KEYPOINT_OUTLIER
        if len(pnp.inlier_mask) == len(selected):
            roles[selected[pnp.inlier_mask]] = KEYPOINT_INLIER
        reason = pnp.reason
        if pnp.success:
            reason = self._gate(pnp.n_inliers, inlier_ratio, float(pnp.reprojection_rmse_px), camera, pnp.T_world_cam)
        if used_fallback:
            note = (f"only {n_reliable} predictions with reliability >= {self.config.reliability_threshold:g}; "
                    f"used the {len(selected)} most reliable")
            reason = f"{reason} ({note})" if reason else ""
        if reason:
            result = self._failure(reason, counts, timings)
            result.used_fallback = used_fallback
            result.n_correspondences, result.inlier_ratio = n_correspondences, inlier_ratio
            result.reprojection_rmse_px = float(pnp.reprojection_rmse_px)
            result.rejected_T_world_cam = pnp.T_world_cam
            result.keypoints_px, result.keypoint_roles = features.keypoints, roles
            return result
        inliers_2d, inliers_3d = points2D[pnp.inlier_mask], xyz[selected][pnp.inlier_mask]
        try:
            covariance = self.error_model.pose_covariance(pnp.T_world_cam, inliers_2d, inliers_3d, camera)
        except np.linalg.LinAlgError as exc:
            result = self._failure(f"degenerate solution: {exc}", counts, timings)
            result.n_correspondences, result.inlier_ratio = n_correspondences, inlier_ratio
            return result
        return LocalizationResult(
            success=True, reason="", T_world_cam=pnp.T_world_cam, covariance=covariance,
            n_keypoints=n_keypoints, n_reliable=n_reliable, n_inliers=int(pnp.n_inliers), timings_ms=timings,
            used_fallback=used_fallback, reprojection_rmse_px=float(pnp.reprojection_rmse_px),
            n_correspondences=n_correspondences, inlier_ratio=inlier_ratio,
            inliers_2d=inliers_2d, inliers_3d=inliers_3d, keypoints_px=features.keypoints, keypoint_roles=roles,
        )

    def _gate(self, n_inliers: int, inlier_ratio: float, rmse_px: float, camera: CameraIntrinsics,
              T_world_cam: np.ndarray) -> str:
        """'' when a PnP pose passes the acceptance gates, else why it does not."""
        c = self.config
        if n_inliers < int(c.min_inliers):
            return f"only {n_inliers} inliers (minimum {c.min_inliers})"
        if not inlier_ratio >= float(c.min_inlier_ratio):
            return (f"inlier ratio {inlier_ratio:.3f} below {c.min_inlier_ratio:g} ({n_inliers} inliers): "
                    "probably not this map's scene")
        max_rmse = float(c.max_reprojection_rmse_px) * math.hypot(camera.width, camera.height) / REFERENCE_DIAGONAL_PX
        if not rmse_px <= max_rmse:
            return f"inlier reprojection RMSE {rmse_px:.2f} px above {max_rmse:.2f} px"
        if c.max_distance_to_mapping_m > 0 and len(self.mapping_centres):
            distance = distance_to_mapping(T_world_cam, self.mapping_centres, self.mapping_axes,
                                           float(c.max_angle_to_mapping_deg))
            if not distance <= float(c.max_distance_to_mapping_m):
                return (f"camera {distance:.2f} m from the nearest mapping camera looking within "
                        f"{c.max_angle_to_mapping_deg:g} deg of it (limit {c.max_distance_to_mapping_m:g} m): "
                        "probably not this map's scene")
        return ""


def mapping_viewpoints(manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """Centres (N, 3) and optical axes (N, 3, unit) of the manifest's mapping frames, in the map frame.

    Frames without a finite 4x4 ``T_world_cam`` are left out (a map without any: both empty, and
    the viewpoint gate does not apply).
    """
    centres, axes = [], []
    for frame in manifest.get("frames", []) or []:
        try:
            T = np.asarray(frame.get("T_world_cam"), dtype=np.float64)
        except (TypeError, ValueError, AttributeError):
            continue
        if T.shape != (4, 4) or not np.isfinite(T).all():
            continue
        axis = T[:3, 2]
        norm = np.linalg.norm(axis)
        if norm < 1e-9:
            continue
        centres.append(T[:3, 3])
        axes.append(axis / norm)
    return np.asarray(centres, dtype=np.float64).reshape(-1, 3), np.asarray(axes, dtype=np.float64).reshape(-1, 3)


def distance_to_mapping(T_world_cam: np.ndarray, centres: np.ndarray, axes: np.ndarray, max_angle_deg: float) -> float:
    """Distance (m) from the camera of ``T_world_cam`` to the nearest mapping camera whose optical
    axis is within ``max_angle_deg`` of its own (inf when none looks that way)."""
    axis = T_world_cam[:3, 2] / np.linalg.norm(T_world_cam[:3, 2])
    similar = axes @ axis >= math.cos(math.radians(max_angle_deg)) - 1e-12
    if not similar.any():
        return math.inf
    return float(np.linalg.norm(centres[similar] - T_world_cam[:3, 3], axis=1).min())
