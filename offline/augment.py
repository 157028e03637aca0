"""The D2S augmentation bank: in-plane rotation and scale, features re-extracted.

Each mapping image is warped by a rotation about the principal point and an isotropic
scale, done in normalised camera coordinates:

    x' = c + diag(s fx, s fy) R(theta) diag(1/fx, 1/fy) (x - c)

That is exactly the pinhole image of the same camera rotated by theta about its optical
axis, with focal lengths scaled by s (cameras with lens distortion are undistorted first).
So every augmented image comes with its exact CameraIntrinsics and T_world_cam, and the
reprojection loss stays exact on it.

Features are re-extracted on the warped image (descriptors of real detections, not of
warped keypoints). A new keypoint is mapped back into the original image and takes the
3D label of the nearest valid labelled original keypoint within ``label_radius_px``
(original pixels); otherwise it is invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
from scipy.spatial import cKDTree

from d2s_nerf_ros.camera import CameraIntrinsics
from offline.labelled import LabelledImage


class _Extractor(Protocol):
    def extract(self, image: np.ndarray) -> Any: ...


@dataclass
class AugmentConfig:
    n_per_image: int = 2
    max_rotation_deg: float = 30.0
    scale_range: tuple[float, float] = (2.0 / 3.0, 3.0 / 2.0)
    label_radius_px: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.scale_range = (float(self.scale_range[0]), float(self.scale_range[1]))
        if self.n_per_image < 0:
            raise ValueError(f"n_per_image must be >= 0, got {self.n_per_image}")
        if not 0 <= self.max_rotation_deg <= 180:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {self.scale_range}")
        if not self.label_radius_px > 0:
            raise ValueError(f"label_radius_px must be positive, got {self.label_radius_px}")


@dataclass(frozen=True)
class InPlaneWarp:
    """The pixel map of one augmentation and the camera it produces."""
    affine: np.ndarray          # (2, 3) original (undistorted) pixels -> augmented pixels
    camera: CameraIntrinsics    # augmented camera (pinhole)
    R_new_old: np.ndarray       # (3, 3) rotation from original to augmented camera axes

    def to_original(self, pixels: np.ndarray) -> np.ndarray:
        """Augmented pixels (N, 2) -> original undistorted pixels."""
        inverse = cv2.invertAffineTransform(self.affine)
        return np.asarray(pixels, dtype=np.float64) @ inverse[:, :2].T + inverse[:, 2]


def in_plane_warp(camera: CameraIntrinsics, angle_deg: float, scale: float) -> InPlaneWarp:
    theta = math.radians(angle_deg)
    R2 = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    linear = np.diag([scale * camera.fx, scale * camera.fy]) @ R2 @ np.diag([1.0 / camera.fx, 1.0 / camera.fy])
    c = np.array([camera.cx, camera.cy])
    affine = np.hstack([linear, (c - linear @ c)[:, None]])
    new_camera = CameraIntrinsics(
        width=camera.width, height=camera.height, fx=camera.fx * scale, fy=camera.fy * scale,
        cx=camera.cx, cy=camera.cy)
    R_new_old = np.eye(3)
    R_new_old[:2, :2] = R2
    return InPlaneWarp(affine=affine, camera=new_camera, R_new_old=R_new_old)


def undistort_image(image: np.ndarray, camera: CameraIntrinsics) -> np.ndarray:
    """The pinhole image with the same K (identity for cameras without distortion)."""
    if not camera.has_distortion:
        return image
    D = np.asarray(camera.distortion, dtype=np.float64)
    if camera.distortion_model == "equidistant":
        return cv2.fisheye.undistortImage(image, camera.K, D, Knew=camera.K)
    return cv2.undistort(image, camera.K, D)


def _image_of(item: Any) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    if hasattr(item, "load_rgb"):
        return item.load_rgb()
    raise TypeError(f"expected an image array or a Frame, got {type(item).__name__}")


def augment_image(image: np.ndarray, labelled: LabelledImage, extractor: _Extractor,
                  angle_deg: float, scale: float, label_radius_px: float, name: str) -> LabelledImage:
    """One augmented copy of ``image`` (whose keypoints and labels are ``labelled``)."""
    camera = labelled.camera
    h, w = image.shape[:2]
    if (w, h) != (camera.width, camera.height):
        raise ValueError(
            f"{labelled.name}: image is {w}x{h} but its camera is {camera.width}x{camera.height}")
    warp = in_plane_warp(camera, angle_deg, scale)
    warped = cv2.warpAffine(undistort_image(image, camera), warp.affine, (w, h),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    features = extractor.extract(warped)
    keypoints = np.asarray(features.keypoints, dtype=np.float32).reshape(-1, 2)
    descriptors = np.asarray(features.descriptors, dtype=np.float32)
    n = len(keypoints)

    points3D = np.zeros((n, 3), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    labelled_ids = np.flatnonzero(labelled.valid)
    if n and len(labelled_ids):
        original = camera.undistort_points(labelled.keypoints[labelled_ids])
        distance, nearest = cKDTree(original).query(warp.to_original(keypoints), k=1,
                                                    distance_upper_bound=label_radius_px)
        valid = np.isfinite(distance)
        points3D[valid] = labelled.points3D[labelled_ids[nearest[valid]]]

    # p_new = R_new_old p_old  =>  T_world_new = T_world_old R_new_old^T
    R4 = np.eye(4)
    R4[:3, :3] = warp.R_new_old.T
    T_world_cam = np.asarray(labelled.T_world_cam, dtype=np.float64) @ R4
    return LabelledImage(name=name, keypoints=keypoints, descriptors=descriptors, points3D=points3D,
                         valid=valid, camera=warp.camera, T_world_cam=T_world_cam, source="augmented")


def augment_images(frames_and_labels: Sequence[tuple[Any, LabelledImage]], extractor: _Extractor,
                   config: AugmentConfig) -> list[LabelledImage]:
    """``config.n_per_image`` augmented copies of every (image or Frame, LabelledImage) pair.

    Rotation uniform in +-max_rotation_deg, scale log-uniform in scale_range; the draws
    depend only on (seed, image index), so a rerun gives the same bank.
    """
    out: list[LabelledImage] = []
    log_lo, log_hi = (math.log(s) for s in config.scale_range)
    for i, (item, labelled) in enumerate(frames_and_labels):
        if config.n_per_image == 0:
            break
        image = _image_of(item)
        rng = np.random.default_rng((config.seed, i))
        for k in range(config.n_per_image):
            angle = float(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
            scale = float(math.exp(rng.uniform(log_lo, log_hi)))
            out.append(augment_image(image, labelled, extractor, angle, scale, config.label_radius_px,
                                     name=f"{labelled.name}#aug{k}"))
    return out
