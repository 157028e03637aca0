"""MapBundle: round trip, atomic save, and every way a map on disk can be broken."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.map_bundle import MapBundle, MapBundleError
from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet

torch.set_num_threads(2)

CAMERA = CameraIntrinsics(640, 480, 525.0, 525.0, 320.0, 240.0, "plumb_bob", (0.1, -0.05, 0.0, 0.0, 0.01))


def make_bundle(descriptor_dim: int = 32) -> MapBundle:
    torch.manual_seed(3)
    model = D2SNet(D2SConfig(descriptor_dim=descriptor_dim, n_layers=2, head_dims=(64, 32)))
    model.set_coordinate_frame(torch.tensor([1.0, 2.0, -0.5]), 1.7)
    bundle = MapBundle.create(
        model, extractor={"name": "sift", "max_keypoints": 1024, "descriptor_dim": descriptor_dim},
        camera=CAMERA, frames=[{"name": "seq-01/frame-000000"}], training={"iterations": 10},
        synthesis={"enabled": False}, metrics={"median_translation_m": 0.05})
    bundle.add_file("report.html", "<html><body>map report</body></html>")
    return bundle


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[MapBundle, Path]:
    bundle = make_bundle()
    return bundle, bundle.save(tmp_path / "map")


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_gives_identical_outputs(saved):
    bundle, path = saved
    loaded = MapBundle.load(path, device="cpu")
    x = torch.randn(2, 13, 32)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    before = bundle.build_model("cpu")(x, mask)
    model = loaded.build_model("cpu")
    assert not model.training
    after = model(x, mask)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(model.coordinate_center, torch.tensor([1.0, 2.0, -0.5]))
    assert loaded.camera == CAMERA
    assert loaded.model_config == bundle.model_config
    m = loaded.manifest
    assert (m["format"], m["version"]) == ("d2s_nerf_map", 1)
    assert m["extractor"]["name"] == "sift" and m["frames"] == [{"name": "seq-01/frame-000000"}]
    assert m["training"] == {"iterations": 10} and m["metrics"]["median_translation_m"] == 0.05
    # Every file's hash, computed independently here.
    for name in ("d2s.safetensors", "report.html"):
        assert m["files"][name] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert (path / "report.html").read_text() == "<html><body>map report</body></html>"
    # safetensors on disk: an 8-byte header length, then a JSON header (no pickle anywhere).
    raw = (path / "d2s.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["coordinate_center"]["shape"] == [3]
    # Nothing temporary is left beside the map.
    assert sorted(p.name for p in path.parent.iterdir()) == ["map"]


def test_save_over_an_existing_map_replaces_it(saved, tmp_path):
    _, path = saved
    other = make_bundle(descriptor_dim=64)
    other.save(path)
    loaded = MapBundle.load(path)
    assert loaded.model_config.descriptor_dim == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]
    # A loaded bundle saves again, extra files included.
    loaded.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "report.html").read_text().startswith("<html>")
    MapBundle.load(tmp_path / "copy")


def test_unknown_version_names_both_versions(saved):
    _, path = saved
    rewrite_manifest(path, version=2)
    with pytest.raises(MapBundleError, match=r"version 2.*version 1"):
        MapBundle.load(path)


def test_wrong_format(saved):
    _, path = saved
    rewrite_manifest(path, format="something_else")
    with pytest.raises(MapBundleError, match="format"):
        MapBundle.load(path)


@pytest.mark.parametrize("name", ["d2s.safetensors", "report.html"])
def test_corrupted_file_fails_its_checksum(saved, name):
    _, path = saved
    data = bytearray((path / name).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    (path / name).write_bytes(bytes(data))
    with pytest.raises(MapBundleError, match=rf"{name}.*(corrupted|sha256)"):
        MapBundle.load(path)


def test_missing_weights_file(saved):
    _, path = saved
    (path / "d2s.safetensors").unlink()
    with pytest.raises(MapBundleError, match="missing.*d2s.safetensors"):
        MapBundle.load(path)


def test_missing_manifest_or_directory(saved, tmp_path):
    _, path = saved
    with pytest.raises(MapBundleError, match="does not exist"):
        MapBundle.load(tmp_path / "nowhere")
    with pytest.raises(MapBundleError, match="not a directory"):
        MapBundle.load(path / "report.html")
    (path / "manifest.json").unlink()
    with pytest.raises(MapBundleError, match="no manifest.json"):
        MapBundle.load(path)


def test_truncated_manifest(saved):
    _, path = saved
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(MapBundleError, match="not valid JSON"):
        MapBundle.load(path)


def test_weights_of_the_wrong_shape(saved):
    _, path = saved
    # A well-formed safetensors file with a correct checksum, for another model size.
    torch.manual_seed(0)
    wrong = D2SNet(D2SConfig(descriptor_dim=32, n_layers=2, head_dims=(64, 16))).state_dict()
    save_file(wrong, str(path / "d2s.safetensors"))
    digest = hashlib.sha256((path / "d2s.safetensors").read_bytes()).hexdigest()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["d2s.safetensors"] = digest
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapBundleError, match="shape"):
        MapBundle.load(path)
    # And a manifest whose model config does not describe the weights.
    manifest["model"]["n_layers"] = 3
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapBundleError, match="missing tensors"):
        MapBundle.load(path)


def test_weights_that_are_not_safetensors(saved):
    _, path = saved
    (path / "d2s.safetensors").write_bytes(b"\x80\x04not a safetensors file at all")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["d2s.safetensors"] = hashlib.sha256((path / "d2s.safetensors").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapBundleError, match="not a readable safetensors"):
        MapBundle.load(path)


def test_manifest_cannot_point_outside_the_bundle(saved):
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../elsewhere"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MapBundleError, match="invalid extra file name"):
        MapBundle.load(path)


def test_bad_extra_file_names_and_missing_sources(tmp_path):
    bundle = make_bundle()
    for name in ("../x", "manifest.json", "d2s.safetensors", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            bundle.add_file(name, b"x")
    with pytest.raises(ValueError, match="does not exist"):
        bundle.add_file("plot.png", tmp_path / "nope.png")
    (tmp_path / "plot.png").write_bytes(b"\x89PNG fake")
    bundle.add_file("plot.png", tmp_path / "plot.png")
    path = bundle.save(tmp_path / "map")
    assert MapBundle.load(path).manifest["files"]["plot.png"] == hashlib.sha256(b"\x89PNG fake").hexdigest()


def test_failed_save_leaves_the_old_map_and_no_temp_dirs(saved, tmp_path):
    _, path = saved
    bundle = make_bundle()
    bundle.state_dict["head_out.weight"] = torch.zeros(5, 5)  # does not fit the config
    with pytest.raises(MapBundleError, match="shape"):
        bundle.save(path)
    MapBundle.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"]


def test_a_save_removes_what_killed_saves_left_behind(saved, tmp_path):
    _, path = saved
    hour_ago = time.time() - 2 * 3600
    stale_tmp, stale_old = tmp_path / "map.tmp-dead1", tmp_path / "map.old-dead2"
    fresh_tmp = tmp_path / "map.tmp-busy"        # a save in progress right now: not ours to delete
    other = tmp_path / "other.tmp-dead3"          # another map's leftovers: not ours either
    for d in (stale_tmp, stale_old, fresh_tmp, other):
        d.mkdir()
        (d / "d2s.safetensors").write_bytes(b"partial")
    for d in (stale_tmp, stale_old, other):
        os.utime(d, (hour_ago, hour_ago))
    make_bundle().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map", "map.tmp-busy", "other.tmp-dead3"]


def test_a_map_left_aside_by_an_interrupted_save_is_named(saved, tmp_path):
    _, path = saved
    aside = tmp_path / "map.old-x1y2"
    os.replace(path, aside)  # killed between moving the old map aside and renaming the new one in
    with pytest.raises(MapBundleError, match="interrupted.*map.old-x1y2.*rename it to map"):
        MapBundle.load(path)
    make_bundle().save(path)  # the next save does not touch the only copy of the old map
    assert aside.is_dir()
    MapBundle.load(aside)
