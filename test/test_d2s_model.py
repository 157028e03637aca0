"""D2SNet: shapes, padding masks, message passing, reliability, config round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet, reliability

torch.set_num_threads(2)


def small_model(seed: int = 0, **kwargs) -> D2SNet:
    torch.manual_seed(seed)
    return D2SNet(D2SConfig(descriptor_dim=32, head_dims=(64, 128, 64), **kwargs)).eval()


def test_paper_architecture_sizes():
    model = D2SNet(D2SConfig(descriptor_dim=128))
    assert len(model.layers) == 5
    layer = model.layers[0]
    assert layer.n_heads == 4
    linears = [m for m in layer.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 256), (256, 128)]
    head = [m for m in model.head if isinstance(m, torch.nn.Linear)] + [model.head_out]
    assert [(m.in_features, m.out_features) for m in head] == [
        (128, 512), (512, 1024), (1024, 1024), (1024, 512), (512, 4)]


def test_output_shapes():
    model = small_model()
    xyz, u = model(torch.randn(3, 11, 32), torch.ones(3, 11, dtype=torch.bool))
    assert xyz.shape == (3, 11, 3) and u.shape == (3, 11)
    assert xyz.dtype == torch.float32 and torch.isfinite(xyz).all() and torch.isfinite(u).all()


def test_padding_does_not_change_real_keypoints():
    model = small_model()
    a, b = torch.randn(1, 7, 32), torch.randn(1, 12, 32)
    xyz_a, u_a = model(a, torch.ones(1, 7, dtype=torch.bool))
    xyz_b, u_b = model(b, torch.ones(1, 12, dtype=torch.bool))
    # Same images in one batch, image a padded with large garbage.
    padded = torch.cat([torch.cat([a, 50 * torch.randn(1, 5, 32)], 1), b])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    xyz, u = model(padded, mask)
    torch.testing.assert_close(xyz[0, :7], xyz_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u[0, :7], u_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xyz[1], xyz_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u[1], u_b[0], atol=1e-5, rtol=1e-5)


def test_image_without_keypoints_gives_no_nan_and_leaves_others_alone():
    model = small_model()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    xyz, u = model(x, mask)
    assert torch.isfinite(xyz).all() and torch.isfinite(u).all()
    xyz0, _ = model(x[:1])
    torch.testing.assert_close(xyz[0], xyz0[0], atol=1e-5, rtol=1e-5)


def test_message_passing_mixes_keypoints_and_is_permutation_equivariant():
    model = small_model()
    x = torch.randn(1, 9, 32)
    xyz, _ = model(x)
    changed = x.clone()
    changed[0, 8] = torch.randn(32)
    xyz_changed, _ = model(changed)
    # Keypoint 0 sees keypoint 8 through attention ...
    assert (xyz_changed[0, 0] - xyz[0, 0]).abs().max() > 1e-4
    # ... but not its position in the list.
    perm = torch.randperm(9)
    xyz_perm, _ = model(x[:, perm])
    torch.testing.assert_close(xyz_perm[0], xyz[0, perm], atol=1e-5, rtol=1e-5)
    # Without layers, keypoints are independent.
    independent = small_model(n_layers=0)
    a, _ = independent(x)
    b, _ = independent(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8])


def test_reliability_formula():
    u = torch.tensor([0.0, 0.01, -0.03, 1.0])
    torch.testing.assert_close(reliability(u), torch.tensor([1.0, 0.5, 0.25, 1.0 / 101.0]))


def test_coordinate_frame_is_affine_on_the_output():
    model = small_model()
    x = torch.randn(1, 5, 32)
    xyz, u = model(x)
    model.set_coordinate_frame(torch.tensor([1.0, -2.0, 3.0]), 2.5)
    xyz2, u2 = model(x)
    torch.testing.assert_close(xyz2, torch.tensor([1.0, -2.0, 3.0]) + 2.5 * xyz)
    torch.testing.assert_close(u2, u)
    with pytest.raises(ValueError):
        model.set_coordinate_frame(torch.zeros(3), 0.0)


def test_predict_single_image():
    model = small_model()
    x = torch.randn(4, 32)
    xyz, r = model.predict(x)
    xyz_b, u_b = model(x[None])
    torch.testing.assert_close(xyz, xyz_b[0])
    torch.testing.assert_close(r, reliability(u_b[0]))


def test_config_round_trip_and_validation():
    config = D2SConfig(descriptor_dim=64, n_layers=3, n_heads=2, head_dims=(32, 16))
    assert D2SConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["head_dims"] == [32, 16]
    with pytest.raises(ValueError, match="divisible"):
        D2SConfig(descriptor_dim=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        D2SConfig.from_dict({"descriptor_dim": 64, "dropout": 0.1})
    with pytest.raises(ValueError, match="descriptor_dim"):
        D2SConfig.from_dict({"n_layers": 3})


def test_bad_input_shapes():
    model = small_model()
    with pytest.raises(ValueError, match="descriptors"):
        model(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 5, 32), torch.ones(2, 4, dtype=torch.bool))


def test_onboard_import_pulls_in_no_offline_stack():
    code = (
        "import sys; import d2s_nerf_ros.models.d2s, d2s_nerf_ros.map_bundle;"
        "bad = [m for m in ('nerfstudio', 'pycolmap', 'rosbags', 'cv2', 'offline', 'scipy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
