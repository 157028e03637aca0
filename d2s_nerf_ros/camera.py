"""Pinhole camera intrinsics with optional lens distortion.

Pixel convention everywhere in this package: OpenCV's, pixel centres at integer
coordinates, x right, y down. Camera axes: OpenCV's (x right, y down, z forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DISTORTION_MODELS = ("none", "plumb_bob", "equidistant")


@dataclass(frozen=True)
class CameraIntrinsics:
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = "none"
    # plumb_bob: k1 k2 p1 p2 [k3]; equidistant: k1 k2 k3 k4 (ROS CameraInfo order).
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
        if self.distortion_model == "equidistant" and len(self.distortion) != 4:
            raise ValueError("equidistant distortion needs exactly 4 coefficients (k1 k2 k3 k4)")
        if self.distortion_model == "plumb_bob" and len(self.distortion) not in (4, 5, 8):
            raise ValueError("plumb_bob distortion needs 4, 5 or 8 coefficients")

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
