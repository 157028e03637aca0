"""The map bundle: one directory holding everything the localizer needs.

    MAP/
      manifest.json     format, version, extractor, model, camera, frames, training,
                        synthesis, metrics, error_model (optional, d2s_nerf_ros.error_model)
                        and "files": {name: sha256}
      d2s.safetensors   the D2S weights (safetensors: loading never executes code)
      report.html ...   any extra files registered with the bundle

Saving writes a sibling temp directory first and renames it into place, so a crash never
leaves a half-written map under the final name. What a killed save leaves beside the map
(``MAP.tmp-*``, ``MAP.old-*``) is removed by the next save once it is stale; a load of a map
that an interrupted save left only as ``MAP.old-*`` names that directory. Loading checks every listed file's
checksum and the weights against the model config before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.error_model import ErrorModel
from d2s_nerf_ros.device import DEVICE_CHOICES, resolve_device
from d2s_nerf_ros.models.d2s import D2SConfig, D2SNet

MAP_FORMAT = "d2s_nerf_map"
MAP_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "d2s.safetensors"
_RESERVED_NAMES = {MANIFEST_NAME, WEIGHTS_NAME}
# A save takes seconds; a temp sibling untouched this long belongs to a save that was killed.
STALE_SAVE_S = 3600.0


def _remove_stale_siblings(path: Path, stale_s: float = STALE_SAVE_S) -> None:
    """Delete what killed saves of ``path`` left beside it: temp directories (never a complete
    map under the final name) and, when ``path`` itself exists, the previous map moved aside."""
    import time

    now = time.time()
    candidates = list(path.parent.glob(path.name + ".tmp-*"))
    if path.exists():  # the replacement finished: an ".old-" sibling is no one's only copy
        candidates += list(path.parent.glob(path.name + ".old-*"))
    for sibling in candidates:
        try:
            if sibling.is_dir() and now - sibling.stat().st_mtime > stale_s:
                shutil.rmtree(sibling, ignore_errors=True)
        except OSError:
            continue  # another process removed it first


class MapBundleError(Exception):
    """A map bundle that cannot be used; the message says what is wrong and where."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_file(path: Path | str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path``; a failure (disk full, file too large, no permission) is an
    ``OSError`` that names the file, which a failing ``write()`` alone does not."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def save_safetensors_file(tensors: dict[str, torch.Tensor], path: Path | str,
                          metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, except that a write failure is an ``OSError`` naming the
    file (``save_file`` reports it as a ``SafetensorError`` with only the OS message in its text)."""
    from safetensors.torch import save

    write_file(path, save(tensors, metadata=metadata))


def _check_extra_name(name: str) -> None:
    # Extra files live directly in the bundle directory: plain names only.
    if not name or name in _RESERVED_NAMES or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid extra file name {name!r} for a map bundle")


@dataclass
class MapBundle:
    manifest: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    # name -> file on disk (copied on save) or bytes; never includes manifest/weights.
    extra_files: dict[str, Path | bytes] = field(default_factory=dict)
    path: Path | None = None

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        model: D2SNet,
        extractor: dict[str, Any],
        camera: CameraIntrinsics,
        frames: list[Any] | None = None,
        training: dict[str, Any] | None = None,
        synthesis: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> "MapBundle":
        manifest = {
            "format": MAP_FORMAT,
            "version": MAP_VERSION,
            "extractor": dict(extractor),
            "model": model.config.to_dict(),
            "camera": camera.to_dict(),
            "frames": list(frames or []),
            "training": dict(training or {}),
            "synthesis": dict(synthesis or {}),
            "metrics": dict(metrics or {}),
            "files": {},
        }
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        return cls(manifest=manifest, state_dict=state)

    def add_file(self, name: str, content: Path | bytes | str) -> None:
        """Register an extra file (e.g. report.html) to be written and checksummed with the bundle."""
        _check_extra_name(name)
        if isinstance(content, str):
            content = content.encode("utf-8")
        if isinstance(content, Path) and not content.is_file():
            raise ValueError(f"extra file {content} does not exist")
        self.extra_files[name] = content

    # ---------------------------------------------------------------- accessors
    @property
    def model_config(self) -> D2SConfig:
        return D2SConfig.from_dict(self.manifest["model"])

    @property
    def camera(self) -> CameraIntrinsics:
        return CameraIntrinsics.from_dict(self.manifest["camera"])

    @property
    def error_model(self) -> ErrorModel:
        """The regressed coordinates' error model (``d2s_nerf_ros.error_model``); the fallback when absent."""
        return ErrorModel.from_manifest(self.manifest)

    def set_error_model(self, model: ErrorModel) -> None:
        self.manifest["error_model"] = model.to_dict()

    @property
    def extractor_config(self) -> dict[str, Any]:
        return self.manifest["extractor"]

    def build_model(self, device: torch.device | str = "cpu") -> D2SNet:
        """The D2SNet with the bundle's weights, in eval mode, on ``device``."""
        model = D2SNet(self.model_config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(_as_device(device)).eval()

    # ---------------------------------------------------------------- save
    def save(self, path: Path | str) -> Path:
        path = Path(path)
        _check_weights(self.state_dict, self.model_config, where="the bundle being saved")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(path)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        try:
            save_safetensors_file({k: v.contiguous() for k, v in self.state_dict.items()}, tmp / WEIGHTS_NAME,
                                  metadata={"format": MAP_FORMAT})
            files = {WEIGHTS_NAME: sha256_file(tmp / WEIGHTS_NAME)}
            for name, content in self.extra_files.items():
                if isinstance(content, bytes):
                    write_file(tmp / name, content)
                else:
                    shutil.copyfile(content, tmp / name)
                files[name] = sha256_file(tmp / name)
            manifest = dict(self.manifest, format=MAP_FORMAT, version=MAP_VERSION, files=files)
            write_file(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2, allow_nan=False).encode(), fsync=True)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            old = None
            if path.exists():
                # A directory can only be renamed onto an empty one: move the old map aside first.
                old = Path(tempfile.mkdtemp(prefix=path.name + ".old-", dir=path.parent))
                os.rmdir(old)
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest = manifest
        self.path = path
        self.extra_files = {name: path / name for name in self.extra_files}
        return path

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> "MapBundle":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        path = Path(path)
        if not path.exists():
            aside = sorted(path.parent.glob(path.name + ".old-*")) if path.parent.is_dir() else []
            if aside:
                raise MapBundleError(
                    f"map {path} does not exist, but a save into it was interrupted: the previous map is in "
                    f"{aside[-1]} (check it loads, then rename it to {path.name})")
            raise MapBundleError(f"map {path} does not exist")
        if not path.is_dir():
            raise MapBundleError(f"map {path} is not a directory (a map bundle is a folder with {MANIFEST_NAME})")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise MapBundleError(f"map {path} has no {MANIFEST_NAME}; is this a map bundle directory?")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MapBundleError(f"{manifest_path} is not valid JSON (truncated or corrupted?): {e}") from e
        if not isinstance(manifest, dict):
            raise MapBundleError(f"{manifest_path} must hold a JSON object")
        if manifest.get("format") != MAP_FORMAT:
            raise MapBundleError(
                f"{manifest_path} has format {manifest.get('format')!r}, expected {MAP_FORMAT!r}")
        version = manifest.get("version")
        if version != MAP_VERSION:
            raise MapBundleError(
                f"map {path} has manifest version {version!r}, but this software reads version {MAP_VERSION}; "
                f"rebuild the map or use a matching version of d2s_nerf_ros")
        for key in ("extractor", "model", "camera", "files"):
            if not isinstance(manifest.get(key), dict):
                raise MapBundleError(f"{manifest_path} lacks the '{key}' section")
        files = manifest["files"]
        if WEIGHTS_NAME not in files:
            raise MapBundleError(f"{manifest_path} does not list {WEIGHTS_NAME} under 'files'")
        for name, expected in files.items():
            if name != WEIGHTS_NAME:
                try:
                    _check_extra_name(name)
                except ValueError as e:
                    raise MapBundleError(f"{manifest_path}: {e}") from e
            file_path = path / name
            if not file_path.is_file():
                raise MapBundleError(f"map {path} is missing the file {name} listed in its manifest")
            actual = sha256_file(file_path)
            if actual != expected:
                raise MapBundleError(
                    f"{file_path} is corrupted or was modified: sha256 {actual} does not match "
                    f"the manifest's {expected}")
        try:
            model_config = D2SConfig.from_dict(manifest["model"])
            CameraIntrinsics.from_dict(manifest["camera"])
        except (ValueError, KeyError, TypeError) as e:
            raise MapBundleError(f"{manifest_path} has an invalid model or camera section: {e}") from e
        try:  # optional: maps built before it existed get ErrorModel's documented fallback
            ErrorModel.from_manifest(manifest)
        except ValueError as e:
            raise MapBundleError(f"{manifest_path} has an invalid error_model section: {e}") from e
        try:
            state = load_safetensors((path / WEIGHTS_NAME).read_bytes())
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise MapBundleError(f"{path / WEIGHTS_NAME} is not a readable safetensors file: {e}") from e
        _check_weights(state, model_config, where=str(path / WEIGHTS_NAME))
        device = _as_device(device)
        state = {k: v.to(device) for k, v in state.items()}
        extra = {name: path / name for name in files if name != WEIGHTS_NAME}
        return cls(manifest=manifest, state_dict=state, extra_files=extra, path=path)


MAP_POINTS_NAME = "map_points.safetensors"


def load_map_points_xyz(path: Path | str) -> np.ndarray:
    """The labelled 3D points of a bundle's mapping frames (``map_points.safetensors``: per frame
    ``<i>.points3D`` and ``<i>.valid``) as one (N, 3) float32 array in the map frame, for display.

    ``MapBundleError`` when the bundle has no such file or it does not match its manifest checksum.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_numpy

    path = Path(path)
    try:
        expected = json.loads((path / MANIFEST_NAME).read_text()).get("files", {}).get(MAP_POINTS_NAME)
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise MapBundleError(f"cannot read {path / MANIFEST_NAME}: {exc}") from exc
    if expected is None or not (path / MAP_POINTS_NAME).is_file():
        raise MapBundleError(f"map {path} has no {MAP_POINTS_NAME} (maps built before it was added: rebuild to get it)")
    data = (path / MAP_POINTS_NAME).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise MapBundleError(f"{path / MAP_POINTS_NAME} is corrupted or was modified: its sha256 does not match the manifest")
    try:
        arrays = load_numpy(data)
    except (SafetensorError, ValueError) as exc:
        raise MapBundleError(f"{path / MAP_POINTS_NAME} is not a readable safetensors file: {exc}") from exc
    frames = sorted({k.split(".")[0] for k in arrays if k.endswith(".points3D")}, key=lambda k: int(k) if k.isdigit() else k)
    parts = []
    for key in frames:
        points = np.asarray(arrays[f"{key}.points3D"], dtype=np.float32).reshape(-1, 3)
        valid = np.asarray(arrays.get(f"{key}.valid", np.ones(len(points), np.uint8))).astype(bool).reshape(-1)
        parts.append(points[valid & np.all(np.isfinite(points), axis=1)])
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.float32)


def _as_device(device: torch.device | str) -> torch.device:
    if isinstance(device, str) and device in DEVICE_CHOICES:
        return resolve_device(device)
    return torch.device(device)


def _check_weights(state: dict[str, torch.Tensor], config: D2SConfig, where: str) -> None:
    # Shapes from a model built on the meta device: no memory, no initialisation cost.
    with torch.device("meta"):
        reference = D2SNet(config).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise MapBundleError(
            f"{where} does not match the model config {config.to_dict()}: "
            f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, ref in reference.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise MapBundleError(
                f"{where}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"the model config {config.to_dict()} needs {tuple(ref.shape)}")
        if not state[name].dtype.is_floating_point:
            raise MapBundleError(f"{where}: tensor {name} has dtype {state[name].dtype}, expected floating point")
