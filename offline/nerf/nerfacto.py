"""Training nerfstudio's nerfacto on mapping frames, in the map frame, offline.

We drive nerfstudio's model directly (no ``ns-train``, no dataparser, no Trainer):

- The map frame survives. nerfstudio's dataparsers re-orient, centre and scale the poses
  (nerfstudio issues #1101, #2174, #2718), so we use none of them. Instead we keep one
  explicit similarity of our own, ``SceneTransform`` (p_nerf = scale * (p_map - centre),
  no rotation), chosen so the training cameras sit inside the unit cube that nerfacto's
  scene contraction leaves undistorted. It is stored with the model and every render
  converts back with it, so depths come out in map metres.
- Camera axes: our poses are OpenCV camera-to-world (x right, y down, z forward); nerfstudio
  wants OpenGL (x right, y up, z backward), so the camera's y and z axes are flipped.
- Pixels: OpenCV puts pixel centres at integer coordinates, nerfstudio at +0.5, so
  nerfstudio's principal point is ours + 0.5 and we pass ray coordinates explicitly.
- Offline: nerfacto builds torchmetrics' LPIPS in ``populate_modules``, which downloads
  AlexNet weights. ``OfflineNerfactoModel`` hands it a deferred stand-in instead (LPIPS is
  only an evaluation metric; training never calls it).
- Checkpoints are our own: model and Adam state as safetensors plus a JSON state file, so
  loading never goes through ``torch.load``'s pickle (nerfstudio's loader predates the
  ``weights_only`` default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.device import resolve_device
from offline.sources.frames import Frame

# nerfstudio 1.1.5 predates torch 2.14: its deprecation warnings (amp decorators, jit.script,
# list indexing) say nothing a map builder can act on and bury the progress lines.
for _message in (r"`torch\.cuda\.amp\.custom_(fwd|bwd)", r"`torch\.jit\.script` is deprecated",
                 r"Using a non-tuple sequence for multidimensional indexing"):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

PROFILES = ("fast", "paper")
STATE_FILE = "nerf_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "d2s_nerf_nerfacto"
STATE_VERSION = 1

# OpenCV camera axes -> OpenGL camera axes (and back: the matrix is its own inverse).
_FLIP_YZ = np.diag([1.0, -1.0, -1.0])


@dataclass
class NerfactoConfig:
    """nerfacto training settings. ``None`` fields take the profile's value."""

    profile: str = "fast"            # "fast": reduced model measured on a 2-core CPU; "paper": nerfacto defaults
    iterations: int | None = None    # fast 1500, paper 30000
    rays_per_batch: int | None = None  # fast 1024, paper 4096
    seed: int = 0
    device: str = "auto"
    lr: float = 1e-2
    lr_final: float | None = None    # fast 1e-3 reached at the last iteration; paper 1e-4 at 200k steps (nerfacto's schedule)
    lr_decay_steps: int | None = None  # fast: iterations; paper: 200000
    # Scene normalisation: camera centres end up within [-camera_extent, camera_extent]^3,
    # inside the contraction's undistorted unit cube with room for the geometry around them.
    camera_extent: float = 0.5
    min_half_extent_m: float = 0.5   # a floor on the normalised half-size, for few or co-located cameras
    checkpoint_every: int = 250
    log_every: int = 100
    render_chunk_rays: int = 4096
    # torch CPU threads while training (None: leave torch's setting). On an idle 2-core machine 2
    # threads were 1.36x faster than 1 (0.24 vs 0.33 s per 1024-ray iteration, docs/BENCHMARKS.md
    # training-threads); on a CPU other jobs load, 1 can win: every small op waits for both
    # threads to be scheduled (measured under load: 0.4 vs 1.0 CPU-s per iteration).
    cpu_threads: int | None = None
    # Extra NerfactoModelConfig fields on top of the profile (e.g. {"log2_hashmap_size": 17}).
    extra_model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"nerfacto profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        for name in ("iterations", "rays_per_batch", "lr_decay_steps"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"NerfactoConfig.{name} must be >= 1, got {value}")
        if self.cpu_threads is not None and int(self.cpu_threads) < 1:
            raise ValueError(f"NerfactoConfig.cpu_threads must be >= 1 or None, got {self.cpu_threads}")
        if self.extra_model_options:
            from nerfstudio.models.nerfacto import NerfactoModelConfig

            known = {f.name for f in dataclasses.fields(NerfactoModelConfig)} | {"camera_optimizer"}
            unknown = sorted(set(self.extra_model_options) - known)
            if unknown:
                raise ValueError(f"NerfactoConfig.extra_model_options: nerfacto has no option(s) {unknown}")
        if not (self.lr > 0 and self.camera_extent > 0 and self.min_half_extent_m > 0):
            raise ValueError("NerfactoConfig: lr, camera_extent and min_half_extent_m must be positive")

    @property
    def n_iterations(self) -> int:
        return int(self.iterations if self.iterations is not None else (1500 if self.profile == "fast" else 30000))

    @property
    def n_rays(self) -> int:
        return int(self.rays_per_batch if self.rays_per_batch is not None else (1024 if self.profile == "fast" else 4096))

    @property
    def final_lr(self) -> float:
        return float(self.lr_final if self.lr_final is not None else (1e-3 if self.profile == "fast" else 1e-4))

    @property
    def decay_steps(self) -> int:
        if self.lr_decay_steps is not None:
            return int(self.lr_decay_steps)
        return self.n_iterations if self.profile == "fast" else 200000

    def learning_rate(self, step: int) -> float:
        """Exponential decay from lr to the final lr over decay_steps (then held)."""
        frac = min(step / self.decay_steps, 1.0)
        return self.lr * (self.final_lr / self.lr) ** frac

    def model_overrides(self) -> dict[str, Any]:
        """NerfactoModelConfig fields that differ from nerfstudio's defaults."""
        overrides: dict[str, Any] = {"implementation": _hash_implementation()}
        if self.profile == "fast":
            overrides.update(
                num_levels=8, log2_hashmap_size=15, max_res=256,
                hidden_dim=32, hidden_dim_color=32,
                num_proposal_samples_per_ray=(48, 24), num_nerf_samples_per_ray=24,
                camera_optimizer="off",
            )
        for key, value in self.extra_model_options.items():
            # JSON turns tuples into lists; nerfacto's sample counts are tuples.
            overrides[key] = tuple(value) if key == "num_proposal_samples_per_ray" else value
        return overrides


def _hash_implementation() -> str:
    try:
        import tinycudann  # noqa: F401  (only on machines that built it)
    except Exception:
        return "torch"
    return "tcnn" if torch.cuda.is_available() else "torch"


@dataclass(frozen=True)
class SceneTransform:
    """p_nerf = scale * (p_map - centre). Rotation-free, so map axes stay map axes.

    The point conversions keep the input's shape ((3,) or (N, 3))."""

    centre: tuple[float, float, float]
    scale: float

    def to_nerf_points(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.centre)) * self.scale

    def to_map_points(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + np.asarray(self.centre)

    def to_dict(self) -> dict[str, Any]:
        return {"centre": [float(v) for v in self.centre], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SceneTransform":
        return cls(centre=tuple(float(v) for v in d["centre"]), scale=float(d["scale"]))


def fit_scene_transform(camera_positions: np.ndarray, camera_extent: float = 0.5,
                        min_half_extent_m: float = 0.5) -> SceneTransform:
    """Centre on the cameras' bounding box and scale its half-size to ``camera_extent``."""
    pos = np.asarray(camera_positions, dtype=np.float64).reshape(-1, 3)
    if len(pos) == 0 or not np.all(np.isfinite(pos)):
        raise ValueError("fit_scene_transform needs at least one finite camera position")
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    centre = (lo + hi) / 2.0
    half = max(float(np.max(hi - lo)) / 2.0, min_half_extent_m)
    return SceneTransform(centre=tuple(float(v) for v in centre), scale=camera_extent / half)


def opencv_to_nerfstudio_c2w(T_world_cam: np.ndarray, transform: SceneTransform) -> np.ndarray:
    """Our OpenCV camera-to-world (map) -> nerfstudio's OpenGL camera-to-world (3x4, nerf frame)."""
    T = np.asarray(T_world_cam, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError("T_world_cam must be a finite 4x4 matrix")
    out = np.empty((3, 4), dtype=np.float64)
    out[:, :3] = T[:3, :3] @ _FLIP_YZ
    out[:, 3] = transform.to_nerf_points(T[:3, 3])
    return out


def nerfstudio_to_opencv_c2w(c2w: np.ndarray, transform: SceneTransform) -> np.ndarray:
    """Inverse of :func:`opencv_to_nerfstudio_c2w`."""
    c2w = np.asarray(c2w, dtype=np.float64)
    T = np.eye(4, dtype=np.float64)
    T[:3, :3] = c2w[:3, :3] @ _FLIP_YZ
    T[:3, 3] = transform.to_map_points(c2w[:3, 3])
    return T


def make_cameras(poses: list[np.ndarray], cameras: list[CameraIntrinsics], transform: SceneTransform,
                 device: torch.device | str = "cpu"):
    """nerfstudio ``Cameras`` for our poses and pinhole intrinsics (distortion is removed from
    the ray coordinates before they reach nerfstudio, see :func:`pixel_coords_for_nerfstudio`)."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    if len(poses) != len(cameras) or len(poses) == 0:
        raise ValueError("make_cameras needs one intrinsics per pose, and at least one pose")
    c2w = torch.tensor(np.stack([opencv_to_nerfstudio_c2w(T, transform) for T in poses]), dtype=torch.float32)
    col = lambda values: torch.tensor(values, dtype=torch.float32).reshape(-1, 1)  # noqa: E731
    return Cameras(
        camera_to_worlds=c2w,
        fx=col([c.fx for c in cameras]), fy=col([c.fy for c in cameras]),
        # nerfstudio's pixel centres are at +0.5, ours at integers.
        cx=col([c.cx + 0.5 for c in cameras]), cy=col([c.cy + 0.5 for c in cameras]),
        width=torch.tensor([c.width for c in cameras]).reshape(-1, 1),
        height=torch.tensor([c.height for c in cameras]).reshape(-1, 1),
        camera_type=CameraType.PERSPECTIVE,
    ).to(device)


def pixel_coords_for_nerfstudio(camera: CameraIntrinsics, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Our pixel (u, v) -> nerfstudio's (y, x) ray coordinates of the ideal pinhole camera.

    Distortion is undone with OpenCV (the model our intrinsics follow), so nerfstudio only ever
    sees a pinhole camera.
    """
    uv = np.stack([np.asarray(u, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()], axis=1)
    if camera.has_distortion:
        uv = camera.undistort_points(uv)
    return np.stack([uv[:, 1] + 0.5, uv[:, 0] + 0.5], axis=1)


def ray_z_factor(camera: CameraIntrinsics, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosine between each pixel's ray and the optical axis: z-depth = ray distance * factor."""
    uv = np.stack([np.asarray(u, dtype=np.float64).ravel(), np.asarray(v, dtype=np.float64).ravel()], axis=1)
    if camera.has_distortion:
        uv = camera.undistort_points(uv)
    xn = (uv[:, 0] - camera.cx) / camera.fx
    yn = (uv[:, 1] - camera.cy) / camera.fy
    return 1.0 / np.sqrt(xn * xn + yn * yn + 1.0)


class _DeferredLpips:
    """Stands in for torchmetrics' LPIPS so building nerfacto downloads nothing.

    nerfacto only uses LPIPS in ``get_image_metrics_and_images`` (evaluation); the real metric
    is built on first use, and a machine without AlexNet weights gets a clear error then.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs, self._metric = args, kwargs, None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self._metric is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            try:
                self._metric = LearnedPerceptualImagePatchSimilarity(*self._args, **self._kwargs)
            except Exception as exc:  # no network / no cached AlexNet weights
                raise RuntimeError(
                    "LPIPS needs torchvision's AlexNet weights, which could not be loaded "
                    f"(offline machine?): {exc}") from exc
            self._metric = self._metric.to(inputs[0].device)
        return self._metric(*inputs)


def _offline_model_class():
    from nerfstudio.models.nerfacto import NerfactoModel

    class OfflineNerfactoModel(NerfactoModel):
        """nerfacto whose LPIPS metric is deferred (see :class:`_DeferredLpips`)."""

        def populate_modules(self) -> None:
            import torchmetrics.image.lpip as lpip_module

            # populate_modules imports the class from this module at call time; hand it the
            # deferred stand-in for the duration of the call only.
            original = lpip_module.LearnedPerceptualImagePatchSimilarity
            lpip_module.LearnedPerceptualImagePatchSimilarity = _DeferredLpips
            try:
                super().populate_modules()
            finally:
                lpip_module.LearnedPerceptualImagePatchSimilarity = original

    return OfflineNerfactoModel


def build_model(config: NerfactoConfig, num_train_images: int):
    """The nerfacto model for ``config`` (untrained, on the CPU)."""
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    overrides = config.model_overrides()
    camera_mode = overrides.pop("camera_optimizer", None)
    model_config = NerfactoModelConfig(**overrides)
    if camera_mode is not None:
        model_config.camera_optimizer = CameraOptimizerConfig(mode=camera_mode)
    model_config.eval_num_rays_per_chunk = config.render_chunk_rays
    # The contraction maps everything into [-2, 2]^3; the box is nerfstudio's usual [-1, 1]^3
    # (the undistorted region), which our SceneTransform fills with the cameras.
    scene_box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    return _offline_model_class()(config=model_config, scene_box=scene_box, num_train_data=num_train_images)


# ----------------------------------------------------------------------------------- handle


@dataclass
class NerfactoModelHandle:
    """A trained (or partly trained) nerfacto in ``work_dir``; what renderers load."""

    work_dir: Path
    config: NerfactoConfig
    transform: SceneTransform
    frame_names: list[str]
    camera_positions: np.ndarray      # (N, 3) training camera centres, map frame
    iterations_done: int
    train_seconds: float
    final_train_psnr: float | None
    complete: bool
    psnr_history: list[tuple[int, float]] = field(default_factory=list)
    # Training-loop counters outside the state_dict (nerfacto's proposal-sampler schedule),
    # restored on resume so an interrupted run continues exactly as an uninterrupted one.
    loop_state: dict[str, int] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.work_dir / MODEL_FILE

    def load_model(self, device: torch.device | str = "cpu"):
        """The nerfacto model with its trained weights, in eval mode, on ``device``."""
        from safetensors.torch import load_file

        if not self.model_path.exists():
            raise FileNotFoundError(f"no nerfacto weights at {self.model_path}")
        model = build_model(self.config, len(self.frame_names))
        model.load_state_dict(load_file(str(self.model_path)), strict=True)
        return model.to(device).eval()

    def stats(self) -> dict[str, Any]:
        return {
            "profile": self.config.profile, "iterations": self.iterations_done,
            "train_seconds": self.train_seconds, "final_train_psnr": self.final_train_psnr,
            "seconds_per_iteration": self.train_seconds / max(self.iterations_done, 1),
            "n_frames": len(self.frame_names), "scene_transform": self.transform.to_dict(),
        }

    @classmethod
    def load(cls, work_dir: Path) -> "NerfactoModelHandle":
        work_dir = Path(work_dir)
        path = work_dir / STATE_FILE
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"no readable nerfacto state in {work_dir}: {exc}") from exc
        if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
            raise ValueError(f"{path} is not a version-{STATE_VERSION} {STATE_FORMAT} state file")
        return cls(
            work_dir=work_dir,
            config=NerfactoConfig(**doc["config"]),
            transform=SceneTransform.from_dict(doc["transform"]),
            frame_names=list(doc["frame_names"]),
            camera_positions=np.asarray(doc["camera_positions"], dtype=np.float64).reshape(-1, 3),
            iterations_done=int(doc["iterations_done"]),
            train_seconds=float(doc["train_seconds"]),
            final_train_psnr=doc.get("final_train_psnr"),
            complete=bool(doc["complete"]),
            psnr_history=[(int(s), float(p)) for s, p in doc.get("psnr_history", [])],
            loop_state={str(k): int(v) for k, v in doc.get("loop_state", {}).items()},
        )


def _config_dict(config: NerfactoConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _training_fingerprint(frames: list[Frame], config: NerfactoConfig) -> str:
    """What determines the trained model (device excluded: CPU and CUDA runs may resume each other)."""
    cfg = _config_dict(config)
    cfg.pop("device")
    cfg.pop("log_every")
    cfg.pop("checkpoint_every")
    cfg.pop("render_chunk_rays")
    cfg.pop("cpu_threads")
    doc = {
        "config": cfg,
        "frames": [[f.name, np.round(np.asarray(f.T_world_cam, dtype=np.float64), 9).tolist(), f.camera.to_dict()]
                   for f in frames],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _save_state(handle: NerfactoModelHandle, fingerprint: str) -> None:
    doc = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
        "config": _config_dict(handle.config), "transform": handle.transform.to_dict(),
        "frame_names": handle.frame_names, "camera_positions": handle.camera_positions.tolist(),
        "iterations_done": handle.iterations_done, "train_seconds": handle.train_seconds,
        "final_train_psnr": handle.final_train_psnr, "complete": handle.complete,
        "psnr_history": [[s, p] for s, p in handle.psnr_history],
        "loop_state": handle.loop_state,
    }
    path = handle.work_dir / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from d2s_nerf_ros.map_bundle import save_safetensors_file

    tmp = path.with_name(path.name + ".tmp")
    save_safetensors_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam state flattened into named tensors (safetensors holds tensors only)."""
    out: dict[str, torch.Tensor] = {}
    state = optimizer.state_dict()["state"]
    for index, entries in state.items():
        for key, value in entries.items():
            out[f"{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
    return out


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    sd["state"] = state
    optimizer.load_state_dict(sd)


# --------------------------------------------------------------------------------- training


def _load_training_images(frames: list[Frame]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images in one zero-padded uint8 tensor (N, Hmax, Wmax, 3) and their (w, h)."""
    images = []
    for f in frames:
        rgb = f.load_rgb()
        if rgb.shape[:2] != (f.camera.height, f.camera.width):
            raise ValueError(f"frame {f.name}: image is {rgb.shape[1]}x{rgb.shape[0]} but its camera says "
                             f"{f.camera.width}x{f.camera.height}")
        images.append(rgb)
    hmax = max(im.shape[0] for im in images)
    wmax = max(im.shape[1] for im in images)
    stack = np.zeros((len(images), hmax, wmax, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        stack[i, : im.shape[0], : im.shape[1]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[0]] for im in images], dtype=torch.long)
    return torch.from_numpy(stack), sizes


def _ray_coords(frames: list[Frame], image_idx: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    coords = np.empty((len(image_idx), 2), dtype=np.float64)
    distorted = [i for i, f in enumerate(frames) if f.camera.has_distortion]
    if not distorted:  # the common case: one vectorised expression
        coords[:, 0], coords[:, 1] = v + 0.5, u + 0.5
        return coords
    for i in np.unique(image_idx):
        sel = image_idx == i
        coords[sel] = pixel_coords_for_nerfstudio(frames[int(i)].camera, u[sel], v[sel])
    return coords


def train_nerfacto(frames: list[Frame], config: NerfactoConfig, work_dir: Path,
                   log: Callable[[str], None] = print) -> NerfactoModelHandle:
    """Train nerfacto on ``frames`` (their exact map poses); resumable from ``work_dir``.

    Returns at once when ``work_dir`` already holds a complete model for the same frames and
    config; continues from the last checkpoint when it holds a partial one.
    """
    if len(frames) < 2:
        raise ValueError(f"nerfacto needs at least 2 posed frames, got {len(frames)}")
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        raise ValueError("frame names must be unique")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _training_fingerprint(frames, config)
    device = resolve_device(config.device)
    n_iter = config.n_iterations

    handle: NerfactoModelHandle | None = None
    resume = False
    if (work_dir / STATE_FILE).exists():
        try:
            previous = NerfactoModelHandle.load(work_dir)
            same = json.loads((work_dir / STATE_FILE).read_text()).get("fingerprint") == fingerprint
        except (ValueError, KeyError, TypeError):
            previous, same = None, False
        if previous is not None and same and (work_dir / MODEL_FILE).exists():
            previous.config = config  # same fingerprint; the device may differ
            if previous.complete and previous.iterations_done >= n_iter:
                log(f"[nerf] trained model found in {work_dir} ({previous.iterations_done} iterations)")
                return previous
            handle, resume = previous, True
        else:
            log(f"[nerf] {work_dir} holds no usable checkpoint for these frames and settings: training afresh")

    positions = np.stack([np.asarray(f.T_world_cam, dtype=np.float64)[:3, 3] for f in frames])
    if handle is None:
        transform = fit_scene_transform(positions, config.camera_extent, config.min_half_extent_m)
        handle = NerfactoModelHandle(
            work_dir=work_dir, config=config, transform=transform, frame_names=names,
            camera_positions=positions, iterations_done=0, train_seconds=0.0,
            final_train_psnr=None, complete=False)

    threads_before = torch.get_num_threads()
    if config.cpu_threads is not None:
        torch.set_num_threads(int(config.cpu_threads))
    try:
        return _train(frames, config, work_dir, log, handle, resume, fingerprint, device)
    finally:
        torch.set_num_threads(threads_before)


def _train(frames: list[Frame], config: NerfactoConfig, work_dir: Path, log: Callable[[str], None],
           handle: NerfactoModelHandle, resume: bool, fingerprint: str, device: torch.device) -> NerfactoModelHandle:
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    n_iter = config.n_iterations
    images, sizes = _load_training_images(frames)
    cams = make_cameras([f.T_world_cam for f in frames], [f.camera for f in frames], handle.transform, device)
    images = images.to(device)
    sizes_np = sizes.numpy()

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = build_model(config, len(frames)).to(device)
        groups = model.get_param_groups()
        optimizer = torch.optim.Adam(
            [{"params": params, "name": name} for name, params in groups.items() if params],
            lr=config.learning_rate(handle.iterations_done), eps=1e-15)
        if resume:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(work_dir / MODEL_FILE)), strict=True)
            if (work_dir / OPTIMIZER_FILE).exists():
                _restore_optimizer(optimizer, load_file(str(work_dir / OPTIMIZER_FILE), device=str(device)))
            log(f"[nerf] resuming at iteration {handle.iterations_done}/{n_iter}")
        model.train()
        callbacks = model.get_training_callbacks(
            TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=None))

        sampler = model.proposal_sampler
        if resume:
            sampler._steps_since_update = int(handle.loop_state.get("proposal_steps_since_update", 0))
            sampler._step = int(handle.loop_state.get("proposal_step", 0))

        def checkpoint() -> None:
            handle.loop_state = {"proposal_steps_since_update": int(sampler._steps_since_update),
                                 "proposal_step": int(sampler._step)}
            _save_tensors(work_dir / MODEL_FILE, model.state_dict())
            _save_tensors(work_dir / OPTIMIZER_FILE, _optimizer_tensors(optimizer))
            _save_state(handle, fingerprint)

        recent_psnr: list[float] = []
        t_last = time.perf_counter()
        it_last = handle.iterations_done
        log(f"[nerf] nerfacto ({config.profile}) on {len(frames)} frames, {n_iter} iterations x "
            f"{config.n_rays} rays, device {device}, scene scale {handle.transform.scale:.4f}")
        for step in range(handle.iterations_done, n_iter):
            t0 = time.perf_counter()
            # Per-step seeding: a resumed run draws the same rays as an uninterrupted one.
            rng = np.random.default_rng([config.seed, step])
            image_idx = rng.integers(0, len(frames), config.n_rays)
            u = np.floor(rng.random(config.n_rays) * sizes_np[image_idx, 0]).astype(np.int64)
            v = np.floor(rng.random(config.n_rays) * sizes_np[image_idx, 1]).astype(np.int64)
            torch.manual_seed(config.seed * 1_000_003 + step)
            coords = torch.from_numpy(_ray_coords(frames, image_idx, u, v)).to(device=device, dtype=torch.float32)
            idx_t = torch.from_numpy(image_idx).to(device)
            rays = cams.generate_rays(camera_indices=idx_t[:, None], coords=coords)
            target = images[idx_t, torch.from_numpy(v).to(device), torch.from_numpy(u).to(device)].float() / 255.0
            batch = {"image": target}

            for cb in callbacks:
                cb.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
            lr = config.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            outputs = model(rays)
            metrics = model.get_metrics_dict(outputs, batch)
            losses = model.get_loss_dict(outputs, batch, metrics)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f"nerfacto loss became {float(loss.detach())} at iteration {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for cb in callbacks:
                cb.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)

            handle.iterations_done = step + 1
            handle.train_seconds += time.perf_counter() - t0
            recent_psnr.append(float(metrics["psnr"].detach()))
            recent_psnr = recent_psnr[-100:]
            done = handle.iterations_done
            if done % config.log_every == 0 or done == n_iter:
                now = time.perf_counter()
                per_it = (now - t_last) / max(done - it_last, 1)
                t_last, it_last = now, done
                psnr = float(np.mean(recent_psnr))
                handle.psnr_history.append((done, psnr))
                log(f"[nerf] {done}/{n_iter}  loss {float(loss.detach()):.4f}  train PSNR {psnr:.2f} dB  "
                    f"{per_it:.3f} s/it  ETA {per_it * (n_iter - done) / 60:.1f} min")
            if done % config.checkpoint_every == 0 and done < n_iter:
                handle.final_train_psnr = float(np.mean(recent_psnr))
                checkpoint()

        if recent_psnr:
            handle.final_train_psnr = float(np.mean(recent_psnr))
        handle.complete = True
        checkpoint()
    log(f"[nerf] done: {handle.iterations_done} iterations in {handle.train_seconds:.0f} s, "
        f"train PSNR {handle.final_train_psnr if handle.final_train_psnr is not None else float('nan'):.2f} dB")
    return handle


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (or float images in [0, 1])."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    if (a.dtype == np.uint8) != (b.dtype == np.uint8):
        raise ValueError("psnr needs both images uint8 or both float in [0, 1]")
    peak = 255.0 if a.dtype == np.uint8 else 1.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)
