"""The RGB-D warp renderer on the generated room, whose renders and depth are exact."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from offline.demo_scene import DEMO_CAMERA, render_demo_frames
from offline.nerf.renderer import Renderer, render_psnr
from offline.sources.frames import Frame
from offline.synthesis.rgbd_warp import RGBDWarpConfig, RGBDWarpRenderer


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """The 48 views of the demo loop as RGB-D frames (PNG colour, uint16 mm depth)."""
    root = tmp_path_factory.mktemp("warp")
    scene, _, _, _, poses, images, depths = render_demo_frames(48)
    frames = []
    for i, (T, rgb, z) in enumerate(zip(poses, images, depths)):
        image_path, depth_path = root / f"{i:03d}.png", root / f"{i:03d}.depth.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        mm = np.where(np.isfinite(z) & (z > 0), np.round(z * 1000.0), 0).clip(0, 65534).astype(np.uint16)
        cv2.imwrite(str(depth_path), mm)
        frames.append(Frame(f"{i:03d}", image_path, np.asarray(T), DEMO_CAMERA, depth_path=depth_path))
    return scene, frames, depths


def test_a_source_rendered_at_its_own_pose_is_itself(room):
    _, frames, depths = room
    renderer = RGBDWarpRenderer([frames[0]], RGBDWarpConfig(n_sources=1, splat=1))
    out = renderer.render(frames[0].T_world_cam, frames[0].camera)
    valid = np.isfinite(depths[0]) & (depths[0] > 0.1)
    assert out.accumulation[valid].mean() > 0.99
    assert np.array_equal(out.rgb[valid], frames[0].load_rgb()[valid])
    assert np.abs(out.depth_m[valid] - depths[0][valid]).max() < 1e-3  # millimetre depth PNG
    assert np.all(out.accumulation[~valid] == 0)


def test_a_view_between_two_sources_matches_the_true_render(room):
    scene, frames, depths = room
    sources, middle = [frames[5], frames[7]], frames[6]   # the middle view is not a source
    renderer = RGBDWarpRenderer(sources)
    assert isinstance(renderer, Renderer)
    out = renderer.render(middle.T_world_cam, middle.camera)
    truth_rgb, truth_z = scene.render(middle.T_world_cam, middle.camera)
    covered = out.accumulation > 0
    assert covered.mean() > 0.9
    # Warped geometry is the true geometry: depth within a few mm where both see a surface.
    both = covered & np.isfinite(truth_z) & (truth_z > 0)
    assert np.median(np.abs(out.depth_m[both] - truth_z[both])) < 0.01
    # Colours of covered pixels agree with the true view far better than a shifted source does.
    def psnr(a, b, mask):
        err = np.mean((a[mask].astype(np.float64) - b[mask].astype(np.float64)) ** 2)
        return 10 * np.log10(255.0 ** 2 / max(err, 1e-9))
    warped = psnr(out.rgb, truth_rgb, covered)
    unwarped = psnr(frames[5].load_rgb(), truth_rgb, covered)
    assert warped > 22.0 and warped > unwarped + 6.0, (warped, unwarped)
    # The interface's PSNR helper runs on it too (holes count as errors there).
    assert render_psnr(renderer, [middle])["psnr_median"] > 15.0


def test_it_renders_at_another_resolution_and_picks_the_nearest_sources(room):
    _, frames, _ = room
    renderer = RGBDWarpRenderer(frames[::2])
    small = DEMO_CAMERA.scaled_to(DEMO_CAMERA.width // 4, DEMO_CAMERA.height // 4)
    out = renderer.render(frames[1].T_world_cam, small)
    assert out.rgb.shape == (small.height, small.width, 3) and out.accumulation.mean() > 0.9
    assert len(renderer._clouds) == 2  # only the two nearest frames were loaded


def test_bad_input(room, tmp_path):
    _, frames, _ = room
    no_depth = Frame("x", frames[0].image_path, frames[0].T_world_cam, DEMO_CAMERA)
    with pytest.raises(ValueError, match="needs depth for every mapping frame; none for x"):
        RGBDWarpRenderer([frames[0], no_depth])
    with pytest.raises(ValueError, match="at least one"):
        RGBDWarpRenderer([])
    with pytest.raises(ValueError, match="finite 4x4"):
        RGBDWarpRenderer(frames[:1]).render(np.full((4, 4), np.nan), DEMO_CAMERA)
    with pytest.raises(ValueError, match="splat"):
        RGBDWarpConfig(splat=0)
    broken = tmp_path / "broken.depth.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read depth image"):
        RGBDWarpRenderer([Frame("b", frames[0].image_path, frames[0].T_world_cam, DEMO_CAMERA,
                                depth_path=broken)]).render(frames[0].T_world_cam, DEMO_CAMERA)


@pytest.mark.builds
def test_a_build_with_the_warp_renderer_trains_on_its_views(room, tmp_path):
    """build_map end to end with ``synthesis_renderer="rgbd-warp"``: no NeRF is trained, views are
    rendered at full resolution in their own stage directory, kept ones reach the training and the
    "ignored" unlabelled-keypoint setting reaches the training config."""
    from d2s_nerf_ros.map_bundle import MapBundle
    from offline.build import BuildConfig, ExtractorSettings, build_map
    from offline.sources.frames import FrameSet

    _, frames, _ = room
    config = BuildConfig(
        profile="fast", extractor=ExtractorSettings(name="sift", max_keypoints=400), matcher="mnn", labels="depth",
        augment_per_image=0, train_iterations=20, train_images_per_batch=2, train_keypoints_per_image=128,
        synthesis=True, synthesis_renderer="rgbd-warp", synthesis_max_poses=8, synthesis_keep_fraction=0.05,
        synthetic_ratio=0.5, synthetic_unlabelled="ignored", device="cpu")
    summary = build_map(FrameSet(frames[::4]), tmp_path / "map", config, progress=False, log=lambda s: None)
    work = summary.work_dir
    assert (work / "synthesis-rgbd-warp.done.json").is_file() and not (work / "synthesis").exists()
    stats = json.loads((work / "synthesis-rgbd-warp" / "synthesis_stats.json").read_text())
    assert "nerf" not in stats and stats["renderers"] == {"rgbd-warp": 8}
    assert stats["render_size"] == [DEMO_CAMERA.width, DEMO_CAMERA.height]
    assert stats["n_kept"] > 0 and summary.n_synthetic_images == stats["n_kept"]
    manifest = MapBundle.load(tmp_path / "map").manifest
    assert manifest["synthesis"]["renderer"] == "rgbd-warp"
    assert manifest["training"]["config"]["synthetic_unlabelled"] == "ignored"
    assert manifest["training"]["n_synthetic_images"] == stats["n_kept"]
