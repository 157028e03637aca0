"""3D labels from a depth map: back-project each keypoint with the frame's camera and pose.

The depth map holds z-depth (distance along the optical axis) in metres, NaN where invalid,
and is assumed registered to the colour image the keypoints come from. A depth map of another
resolution is sampled at the keypoint scaled to it (pixel-centre convention kept exact).

7-Scenes: depth and colour are NOT registered there and no colour calibration ships. The data
README measured that using one focal length for both depth back-projection and PnP (525 for
both, or 585 for both) gives ~1.5 cm / 1.3 deg with depth labels, while 585 for depth and 525
for PnP gives ~17 cm. So we back-project with the frame's own camera (the colour intrinsics,
525 for 7-Scenes) and never with the depth camera's 585 from ``camera-intrinsics.txt``.

Depth edges: a keypoint whose depth neighbourhood (the 2x2 pixels of the bilinear stencil, or
the 3x3 around the nearest pixel) has an invalid pixel or spans more than
``max_discontinuity`` x depth is rejected: interpolating across a depth edge invents points
floating between the foreground and the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.sources.frames import Frame


@dataclass
class DepthLabelConfig:
    min_depth_m: float = 0.1
    max_depth_m: float = 10.0
    interpolation: str = "bilinear"     # "bilinear" | "nearest"
    max_discontinuity: float = 0.05     # relative depth spread allowed in the stencil

    def validate(self) -> None:
        if not 0 <= self.min_depth_m < self.max_depth_m:
            raise ValueError(f"need 0 <= min_depth_m < max_depth_m, got {self.min_depth_m}, {self.max_depth_m}")
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {self.interpolation!r}")
        if not self.max_discontinuity > 0:
            raise ValueError(f"max_discontinuity must be positive, got {self.max_discontinuity}")


def sample_depth(depth_m: np.ndarray, pixels: np.ndarray, config: DepthLabelConfig) -> np.ndarray:
    """Depth (metres) at pixel positions of the depth map; NaN where invalid or at a depth edge."""
    h, w = depth_m.shape
    x, y = pixels[:, 0], pixels[:, 1]
    out = np.full(len(pixels), np.nan, dtype=np.float64)
    if config.interpolation == "bilinear":
        x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
        inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
        # A keypoint exactly on the last row/column still has a valid (degenerate) stencil.
        on_edge = ~inside & (x >= 0) & (y >= 0) & (x <= w - 1) & (y <= h - 1)
        x0 = np.where(on_edge, np.minimum(x0, w - 2), x0)
        y0 = np.where(on_edge, np.minimum(y0, h - 2), y0)
        inside |= on_edge
        idx = np.flatnonzero(inside)
        x0, y0 = x0[idx], y0[idx]
        fx, fy = x[idx] - x0, y[idx] - y0
        d00, d01 = depth_m[y0, x0], depth_m[y0, x0 + 1]
        d10, d11 = depth_m[y0 + 1, x0], depth_m[y0 + 1, x0 + 1]
        stencil = np.stack([d00, d01, d10, d11], axis=1)
        value = (d00 * (1 - fx) * (1 - fy) + d01 * fx * (1 - fy) + d10 * (1 - fx) * fy + d11 * fx * fy)
    else:
        xn, yn = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        inside = (xn >= 0) & (yn >= 0) & (xn < w) & (yn < h)
        idx = np.flatnonzero(inside)
        xn, yn = xn[idx], yn[idx]
        padded = np.pad(depth_m, 1, constant_values=np.nan)
        # The 3x3 neighbourhood: an edge next to the chosen pixel makes it unreliable too.
        stencil = np.stack([padded[yn + 1 + dy, xn + 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=1)
        value = depth_m[yn, xn]
        # Image borders have no full neighbourhood: judge them by the pixels that exist.
        border = (xn == 0) | (yn == 0) | (xn == w - 1) | (yn == h - 1)
        stencil = np.where(border[:, None] & np.isnan(stencil), value[:, None], stencil)
    with np.errstate(invalid="ignore"):
        # A NaN in the stencil makes the spread NaN, and the comparison False: rejected.
        spread = stencil.max(axis=1) - stencil.min(axis=1) if len(stencil) else np.zeros(0)
        ok = np.isfinite(spread) & (spread <= config.max_discontinuity * value)
    out[idx[ok]] = value[ok]
    return out


def depth_labels(
    frame: Frame,
    keypoints: np.ndarray,
    depth_m: np.ndarray | None = None,
    config: DepthLabelConfig = DepthLabelConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """(points3D (N, 3) float32 world, valid (N,) bool) for keypoints (N, 2) in the frame's image pixels.

    ``depth_m``: z-depth in metres, NaN where invalid; None loads the frame's depth image.
    Invalid entries hold zeros (not NaN, so a masked loss never meets a NaN).
    """
    config.validate()
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size == 0:
        kp = kp.reshape(0, 2)
    if kp.ndim != 2 or kp.shape[1] != 2:
        raise ValueError(f"keypoints must be (N, 2), got {kp.shape}")
    if depth_m is None:
        depth_m = frame.load_depth_m()
        if depth_m is None:
            raise ValueError(f"frame {frame.name!r} has no depth image; depth labels need one")
    depth_m = np.asarray(depth_m, dtype=np.float64)
    if depth_m.ndim != 2:
        raise ValueError(f"depth map of {frame.name!r} must be 2-D, got shape {depth_m.shape}")

    cam = frame.camera
    h, w = depth_m.shape
    # Keypoints -> depth-map pixels (identity when the sizes agree).
    sx, sy = w / cam.width, h / cam.height
    pix_depth = np.stack([(kp[:, 0] + 0.5) * sx - 0.5, (kp[:, 1] + 0.5) * sy - 0.5], axis=1)
    z = sample_depth(depth_m, pix_depth, config)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(z) & (z >= config.min_depth_m) & (z <= config.max_depth_m) & np.all(np.isfinite(kp), axis=1)

    ideal = cam.undistort_points(kp) if cam.has_distortion else kp
    z_safe = np.where(valid, z, 0.0)
    pts_cam = np.stack([(ideal[:, 0] - cam.cx) / cam.fx * z_safe, (ideal[:, 1] - cam.cy) / cam.fy * z_safe, z_safe], axis=1)
    T = np.asarray(frame.T_world_cam, dtype=np.float64)
    pts_world = pts_cam @ T[:3, :3].T + T[:3, 3]
    pts_world[~valid] = 0.0
    return pts_world.astype(np.float32), valid
