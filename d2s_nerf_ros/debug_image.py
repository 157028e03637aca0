"""The frame as the localizer saw it: keypoints by role and one status line (the node's ~/debug_image).

Colours (RGB): green = PnP inlier, red = given to PnP but an outlier, grey = below the D2S
reliability threshold (not used). The band at the top says whether the frame was accepted,
with the numbers the acceptance gates look at, or why it was not. Drawing is for people: the
image is a copy, the keypoints are those the extractor returned (the distorted image's pixels).

Onboard only: numpy and OpenCV.
"""

from __future__ import annotations

import numpy as np

from d2s_nerf_ros.localizer import KEYPOINT_INLIER, KEYPOINT_OUTLIER, KEYPOINT_UNUSED, LocalizationResult

INLIER_RGB = (0, 220, 0)
OUTLIER_RGB = (235, 30, 30)
UNUSED_RGB = (150, 150, 150)
BAND_RGB = (0, 0, 0)
TEXT_RGB = (255, 255, 255)
# Status line longer than this is cut (reasons can quote long numbers).
MAX_STATUS_CHARS = 110


def status_line(result: LocalizationResult) -> str:
    """One line: accepted with inliers / correspondences / ratio / RMSE, or the reason it was not."""
    numbers = f"{result.n_inliers} inliers of {result.n_correspondences}"
    if result.n_correspondences:
        numbers += f" ({result.inlier_ratio:.2f})"
    if np.isfinite(result.reprojection_rmse_px):
        numbers += f", RMSE {result.reprojection_rmse_px:.1f} px"
    total_ms = result.timings_ms.get("total")
    timing = f", {total_ms:.0f} ms" if total_ms is not None else ""
    if result.success:
        line = f"localized: {numbers}{timing}"
    else:
        line = f"not localized: {result.reason}" + (f" [{numbers}]" if result.n_correspondences else "") + timing
    return line if len(line) <= MAX_STATUS_CHARS else line[:MAX_STATUS_CHARS - 3] + "..."


def draw_localization(image: np.ndarray, result: LocalizationResult) -> np.ndarray:
    """An RGB uint8 copy of ``image`` (RGB or grey uint8) with ``result``'s keypoints and status line."""
    import cv2

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"draw_localization needs an RGB HxWx3 or grey HxW uint8 image, got {image.dtype} {image.shape}")
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    height, width = canvas.shape[:2]
    scale = max(1.0, min(width, height) / 480.0)  # marks and text readable on large frames too
    radius = max(2, int(round(3 * scale)))
    if result.keypoints_px is not None and result.keypoint_roles is not None:
        points = np.round(np.asarray(result.keypoints_px, dtype=np.float64)).astype(np.int64)
        roles = np.asarray(result.keypoint_roles)
        # Unused first, inliers last, so that the interesting marks stay on top.
        for role, colour, size, thickness in ((KEYPOINT_UNUSED, UNUSED_RGB, 1, -1),
                                              (KEYPOINT_OUTLIER, OUTLIER_RGB, radius, 2),
                                              (KEYPOINT_INLIER, INLIER_RGB, radius, -1)):
            for x, y in points[roles == role]:
                if 0 <= x < width and 0 <= y < height:
                    cv2.circle(canvas, (int(x), int(y)), size, colour, thickness, lineType=cv2.LINE_AA)
    font_scale = 0.45 * scale
    band = int(round(20 * scale))
    canvas[:min(band, height)] = BAND_RGB
    cv2.putText(canvas, status_line(result), (4, int(round(14 * scale))), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                TEXT_RGB, 1, lineType=cv2.LINE_AA)
    return canvas
