"""~/debug_image's drawing: keypoints by role, the status line, and the roles the localizer reports."""

from __future__ import annotations

import numpy as np
import pytest

from d2s_nerf_ros.debug_image import INLIER_RGB, OUTLIER_RGB, UNUSED_RGB, draw_localization, status_line
from d2s_nerf_ros.localizer import KEYPOINT_INLIER, KEYPOINT_OUTLIER, KEYPOINT_UNUSED, LocalizationResult


def result_with(roles: list[int], success: bool = True, reason: str = "") -> LocalizationResult:
    keypoints = np.array([[40.0 + 60 * i, 100.0 + 30 * (i % 3)] for i in range(len(roles))])
    n_inliers = sum(r == KEYPOINT_INLIER for r in roles)
    n_correspondences = sum(r != KEYPOINT_UNUSED for r in roles)
    return LocalizationResult(success=success, reason=reason, T_world_cam=np.eye(4) if success else None,
                              covariance=None, n_keypoints=len(roles), n_reliable=n_correspondences,
                              n_inliers=n_inliers, timings_ms={"total": 123.4}, reprojection_rmse_px=4.25,
                              n_correspondences=n_correspondences, inlier_ratio=n_inliers / max(n_correspondences, 1),
                              keypoints_px=keypoints, keypoint_roles=np.array(roles, dtype=np.uint8))


def test_each_keypoint_is_drawn_in_the_colour_of_its_role():
    image = np.full((240, 320, 3), 90, dtype=np.uint8)
    roles = [KEYPOINT_INLIER, KEYPOINT_OUTLIER, KEYPOINT_UNUSED, KEYPOINT_INLIER]
    result = result_with(roles)
    drawn = draw_localization(image, result)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (image == 90).all(), "the frame itself is not drawn on"
    colours = {KEYPOINT_INLIER: INLIER_RGB, KEYPOINT_OUTLIER: OUTLIER_RGB, KEYPOINT_UNUSED: UNUSED_RGB}
    for (x, y), role in zip(result.keypoints_px.astype(int), roles):
        if role == KEYPOINT_OUTLIER:
            # A ring (anti-aliased): its colour around the point, the frame at its centre.
            window = drawn[y - 4:y + 5, x - 4:x + 5].reshape(-1, 3).astype(int)
            assert np.abs(window - OUTLIER_RGB).max(axis=1).min() <= 30
            assert np.abs(drawn[y, x].astype(int) - 90).max() < 30
        else:  # filled at the point
            assert tuple(drawn[y, x]) == colours[role], (role, tuple(drawn[y, x]))
    # The status band: black with white text.
    band = drawn[:20]
    assert (band == 0).all(axis=2).mean() > 0.5 and band.min(axis=2).max() > 150  # light text on black


def test_grey_frames_and_no_keypoints_are_drawn_too():
    grey = np.full((120, 160), 30, dtype=np.uint8)
    failed = LocalizationResult(success=False, reason="only 3 keypoints detected (need at least 15)", T_world_cam=None,
                                covariance=None, n_keypoints=3, n_reliable=0, n_inliers=0)
    drawn = draw_localization(grey, failed)
    assert drawn.shape == (120, 160, 3)
    assert (drawn[60:] == 30).all()


def test_bad_images_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        draw_localization(np.zeros((10, 10, 3), np.float32), result_with([]))
    with pytest.raises(ValueError, match="HxWx3"):
        draw_localization(np.zeros((10, 10, 4), np.uint8), result_with([]))


def test_status_line_names_the_numbers_or_the_reason():
    ok = status_line(result_with([KEYPOINT_INLIER] * 3 + [KEYPOINT_OUTLIER]))
    assert ok.startswith("localized: 3 inliers of 4 (0.75), RMSE 4.2 px") and ok.endswith("123 ms")
    refused = status_line(result_with([KEYPOINT_INLIER, KEYPOINT_OUTLIER], success=False,
                                      reason="inlier ratio 0.031 below 0.07 (21 inliers): probably not this map's scene"))
    assert refused.startswith("not localized: inlier ratio 0.031 below 0.07") and "[1 inliers of 2" in refused
    long = status_line(result_with([], success=False, reason="x" * 500))
    assert len(long) <= 110 and long.endswith("...")
