"""Pinhole camera intrinsics with optional lens distortion.

Pixel convention everywhere in this package: OpenCV's, pixel centres at integer
coordinates, x right, y down. Camera axes: OpenCV's (x right, y down, z forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DISTORTION_MODELS = ("none", "plumb_bob", "rational_polynomial", "equidistant")
# Coefficient counts each model accepts (OpenCV's order: k1 k2 p1 p2 [k3 [k4 k5 k6 [s1 s2 s3 s4 [tx ty]]]]).
# plumb_bob keeps 8 for maps written before rational_polynomial had its own name; OpenCV reads
# both the same way.
DISTORTION_COEFFICIENTS = {"none": (0,), "plumb_bob": (4, 5, 8), "rational_polynomial": (8, 12, 14),
                           "equidistant": (4,)}
# CameraInfo distortion_model names (sensor_msgs/distortion_models.hpp) -> ours.
_CAMERA_INFO_MODELS = {"plumb_bob": "plumb_bob", "rational_polynomial": "rational_polynomial",
                       "equidistant": "equidistant", "fisheye": "equidistant"}
# Topic names that image_proc / camera drivers give rectified images.
_RECTIFIED_TOPIC_WORDS = ("image_rect", "rect_color", "rect_mono", "rectified")


class CameraInfoError(ValueError):
    """A CameraInfo message that cannot describe the images; the message says what is wrong."""


@dataclass(frozen=True)
class CameraIntrinsics:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = "none"
    # plumb_bob: k1 k2 p1 p2 [k3]; rational_polynomial: k1 k2 p1 p2 k3 k4 k5 k6 [s1 s2 s3 s4 [tx ty]];
    # equidistant: k1 k2 k3 k4 (ROS CameraInfo order = OpenCV's).
    distortion: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        values = (self.fx, self.fy, self.cx, self.cy)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"camera intrinsics must be finite, got fx={self.fx} fy={self.fy} cx={self.cx} cy={self.cy}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"focal lengths must be positive, got fx={self.fx} fy={self.fy}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.distortion_model not in DISTORTION_MODELS:
            raise ValueError(f"unsupported distortion model {self.distortion_model!r}; supported: {', '.join(DISTORTION_MODELS)}")
        if not all(math.isfinite(float(v)) for v in self.distortion):
            raise ValueError("distortion coefficients must be finite")
        counts = DISTORTION_COEFFICIENTS[self.distortion_model]
        if self.distortion_model != "none" and len(self.distortion) not in counts:
            raise ValueError(f"{self.distortion_model} distortion needs {' or '.join(map(str, counts))} coefficients, "
                             f"got {len(self.distortion)}")

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64)

    @property
    def has_distortion(self) -> bool:
        return self.distortion_model != "none" and any(abs(float(v)) > 0 for v in self.distortion)

    def scaled_to(self, width: int, height: int) -> "CameraIntrinsics":
        """The same camera at another resolution (pixel-centre convention kept exact)."""
        sx = width / self.width
        sy = height / self.height
        return CameraIntrinsics(
            width=int(width), height=int(height),
            fx=self.fx * sx, fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5, cy=(self.cy + 0.5) * sy - 0.5,
            distortion_model=self.distortion_model, distortion=tuple(self.distortion),
        )

    def undistort_points(self, points: np.ndarray) -> np.ndarray:
        """Distorted pixel coordinates (N,2) -> ideal pinhole pixel coordinates with the same K."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if not self.has_distortion or len(pts) == 0:
            return pts.copy()
        import cv2  # local import: only cameras with distortion need OpenCV here

        D = np.asarray(self.distortion, dtype=np.float64)
        if self.distortion_model == "equidistant":
            out = cv2.fisheye.undistortPoints(pts.reshape(-1, 1, 2), self.K, D, P=self.K)
        else:
            out = cv2.undistortPoints(pts.reshape(-1, 1, 2), self.K, D, P=self.K)
        return out.reshape(-1, 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": int(self.width), "height": int(self.height),
            "fx": float(self.fx), "fy": float(self.fy), "cx": float(self.cx), "cy": float(self.cy),
            "distortion_model": self.distortion_model, "distortion": [float(v) for v in self.distortion],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CameraIntrinsics":
        return cls(
            width=int(d["width"]), height=int(d["height"]),
            fx=float(d["fx"]), fy=float(d["fy"]), cx=float(d["cx"]), cy=float(d["cy"]),
            distortion_model=str(d.get("distortion_model", "none")),
            distortion=tuple(float(v) for v in d.get("distortion", ())),
        )


# --------------------------------------------------------------------------- sensor_msgs/CameraInfo

def _info_array(msg: Any, name: str, size: int) -> np.ndarray:
    # ROS 2 spells the arrays d k r p, ROS 1 (and rosbags' ROS 1 types) D K R P.
    values = getattr(msg, name, None)
    if values is None:
        values = getattr(msg, name.upper(), None)
    try:
        arr = np.asarray([] if values is None else values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise CameraInfoError(f"CameraInfo field {name} is not numeric: {exc}") from exc
    if size and arr.size != size:
        raise CameraInfoError(f"CameraInfo field {name} has {arr.size} values, expected {size}")
    return arr


def camera_from_camera_info(msg: Any, rectified: bool = False,
                            image_size: tuple[int, int] | None = None) -> CameraIntrinsics:
    """The ``CameraIntrinsics`` of the images a ``sensor_msgs/CameraInfo`` describes.

    Duck-typed on the message fields (``width height distortion_model d k r p binning_x
    binning_y roi``, or ROS 1's upper-case arrays), so it serves rclpy messages, rosbags
    messages and plain stand-ins alike; no ROS import.

    ``rectified=False``: the images are raw; ``K`` and ``D`` describe them (D all zero: no
    distortion). ``rectified=True``: the images were already rectified (image_proc's
    ``image_rect``); their pinhole camera is ``P``'s fx, fy, cx, cy and ``D`` is ignored,
    since it describes the raw camera. ``R`` must then be the identity: a stereo
    rectification rotates the camera, and the pose would be the rotated camera's.
    ``image_size`` (width, height) fills a CameraInfo that leaves its size 0.

    Raises ``CameraInfoError`` naming what is unusable.
    """
    try:
        width, height = int(getattr(msg, "width")), int(getattr(msg, "height"))
        model_name = str(getattr(msg, "distortion_model", "")).strip().lower()
        binning = (int(getattr(msg, "binning_x", 0) or 0), int(getattr(msg, "binning_y", 0) or 0))
    except (AttributeError, TypeError, ValueError) as exc:
        raise CameraInfoError(f"not a CameraInfo message: {type(exc).__name__}: {exc}") from exc
    if (width <= 0 or height <= 0) and image_size is not None:
        width, height = int(image_size[0]), int(image_size[1])
    if width <= 0 or height <= 0:
        raise CameraInfoError(f"CameraInfo has no image size ({width}x{height})")
    if binning[0] > 1 or binning[1] > 1:
        raise CameraInfoError(f"CameraInfo binning {binning[0]}x{binning[1]} is not supported")
    roi = getattr(msg, "roi", None)
    if roi is not None and int(getattr(roi, "width", 0) or 0) and \
            (int(roi.width), int(roi.height)) != (width, height):
        raise CameraInfoError("CameraInfo region of interest (cropped images) is not supported")

    if rectified:
        P = _info_array(msg, "p", 12)
        if not (np.isfinite(P).all() and P[0] > 0 and P[5] > 0):
            raise CameraInfoError(f"rectified images need a calibrated projection matrix P, got {P.tolist()} "
                                  "(set rectified:=false if the images are raw)")
        R = _info_array(msg, "r", 0)
        if R.size == 9 and np.any(R) and np.abs(R.reshape(3, 3) - np.eye(3)).max() > 1e-6:
            raise CameraInfoError("CameraInfo R is not the identity (a stereo rectification): rectified images of a "
                                  "rotated camera are not supported; use the raw images with rectified:=false")
        fx, fy, cx, cy = float(P[0]), float(P[5]), float(P[2]), float(P[6])
        model, coefficients = "none", ()
    else:
        K = _info_array(msg, "k", 9)  # its values are checked by CameraIntrinsics below
        fx, fy, cx, cy = float(K[0]), float(K[4]), float(K[2]), float(K[5])
        D = _info_array(msg, "d", 0)
        # An unknown model is refused even with zero coefficients: the driver means a lens we cannot model.
        if model_name not in _CAMERA_INFO_MODELS and model_name not in ("", "none"):
            raise CameraInfoError(
                f"CameraInfo distortion model {getattr(msg, 'distortion_model', '')!r} is not supported "
                f"(plumb_bob, rational_polynomial, equidistant); rectify the images (image_proc) and set rectified:=true")
        if D.size == 0 or not np.any(D) or model_name in ("", "none"):
            model, coefficients = "none", ()
        else:
            model, coefficients = _CAMERA_INFO_MODELS[model_name], tuple(float(v) for v in D)
            if model == "plumb_bob" and D.size == 8:
                model = "rational_polynomial"  # some drivers send 8 coefficients under the plumb_bob name
    try:
        return CameraIntrinsics(width=width, height=height, fx=fx, fy=fy, cx=cx, cy=cy,
                                distortion_model=model, distortion=coefficients)
    except ValueError as exc:
        raise CameraInfoError(f"invalid CameraInfo: {exc}") from exc


def rectification_hint(image_topic: str, rectified: bool) -> str:
    """A warning when the topic name and the ``rectified`` setting disagree, else ''.

    Only a hint: the name never decides, since topic names are remapped freely.
    """
    name = image_topic.lower()
    looks_rectified = any(word in name for word in _RECTIFIED_TOPIC_WORDS)
    if looks_rectified and not rectified:
        return (f"image topic {image_topic!r} looks rectified but rectified is false: CameraInfo K and D "
                "(the raw camera) will be applied again; set rectified:=true if these images are rectified")
    if rectified and "image_raw" in name:
        return (f"image topic {image_topic!r} looks raw but rectified is true: lens distortion will be ignored; "
                "set rectified:=false if these images are not rectified")
    return ""
