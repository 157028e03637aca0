"""Covisible image pairs from known poses (no image content needed).

Two frames make a pair when their cameras are close, look in similar directions and their
view frusta overlap. Overlap is estimated geometrically: a grid of pixels of one image is
lifted to a nominal scene depth and projected into the other image; the fraction that lands
inside it (with positive depth), averaged over both directions, is the overlap.
Each frame keeps its ``num_neighbours`` nearest acceptable frames (by camera-centre
distance); the union of those choices is returned, each unordered pair once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.sources.frames import Frame


@dataclass
class PairsConfig:
    num_neighbours: int = 5            # per frame, before the union
    max_distance_m: float | None = None  # camera centres farther apart are never paired
    max_angle_deg: float = 60.0        # between the optical axes
    min_overlap: float = 0.1           # view-overlap fraction in [0, 1]; 0 disables the check
    scene_depth_m: float = 2.0         # nominal depth of the scene for the overlap estimate (indoor default)
    grid_size: int = 7                 # pixels per side of the overlap grid

    def validate(self) -> None:
        if self.num_neighbours < 1:
            raise ValueError(f"num_neighbours must be >= 1, got {self.num_neighbours}")
        if self.max_distance_m is not None and not self.max_distance_m > 0:
            raise ValueError(f"max_distance_m must be positive or None, got {self.max_distance_m}")
        if not 0.0 < self.max_angle_deg <= 180.0:
            raise ValueError(f"max_angle_deg must be in (0, 180], got {self.max_angle_deg}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {self.min_overlap}")
        if not self.scene_depth_m > 0:
            raise ValueError(f"scene_depth_m must be positive, got {self.scene_depth_m}")
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")


def _grid_points_world(frame: Frame, depth: float, n: int) -> np.ndarray:
    """An n x n pixel grid of the frame lifted to ``depth`` along the optical axis, in world."""
    cam = frame.camera
    u, v = np.meshgrid(np.linspace(0, cam.width - 1, n), np.linspace(0, cam.height - 1, n))
    rays = np.stack([(u.ravel() - cam.cx) / cam.fx, (v.ravel() - cam.cy) / cam.fy, np.ones(n * n)], axis=1)
    pts_cam = rays * depth
    T = frame.T_world_cam
    return pts_cam @ T[:3, :3].T + T[:3, 3]


def _fraction_visible(points_world: np.ndarray, frame: Frame) -> float:
    cam = frame.camera
    T = frame.T_world_cam
    pc = (points_world - T[:3, 3]) @ T[:3, :3]  # world -> camera: R^T (p - t)
    z = pc[:, 2]
    front = z > 1e-6
    with np.errstate(divide="ignore", invalid="ignore"):
        u = cam.fx * pc[:, 0] / z + cam.cx
        v = cam.fy * pc[:, 1] / z + cam.cy
    inside = front & (u >= -0.5) & (u <= cam.width - 0.5) & (v >= -0.5) & (v <= cam.height - 0.5)
    return float(inside.mean())


def view_overlap(a: Frame, b: Frame, scene_depth_m: float = 2.0, grid_size: int = 7) -> float:
    """Symmetric frustum-overlap estimate in [0, 1] at a nominal scene depth."""
    ab = _fraction_visible(_grid_points_world(a, scene_depth_m, grid_size), b)
    ba = _fraction_visible(_grid_points_world(b, scene_depth_m, grid_size), a)
    return 0.5 * (ab + ba)


def select_pairs(frames: list[Frame], config: PairsConfig = PairsConfig()) -> list[tuple[str, str]]:
    """Covisible pairs (name_a, name_b), a before b in ``frames``; no self pairs, no duplicates, deterministic."""
    config.validate()
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"frame names must be unique; duplicated: {dup[:5]}")
    n = len(frames)
    if n < 2:
        return []
    centres = np.stack([np.asarray(f.T_world_cam, dtype=np.float64)[:3, 3] for f in frames])
    axes = np.stack([np.asarray(f.T_world_cam, dtype=np.float64)[:3, 2] for f in frames])
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    dist = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=2)
    angle = np.degrees(np.arccos(np.clip(axes @ axes.T, -1.0, 1.0)))

    acceptable = (angle <= config.max_angle_deg) & ~np.eye(n, dtype=bool)
    if config.max_distance_m is not None:
        acceptable &= dist <= config.max_distance_m

    overlap_cache: dict[tuple[int, int], float] = {}

    def overlap(i: int, j: int) -> float:
        key = (min(i, j), max(i, j))
        if key not in overlap_cache:
            overlap_cache[key] = view_overlap(frames[key[0]], frames[key[1]], config.scene_depth_m, config.grid_size)
        return overlap_cache[key]

    pairs: set[tuple[int, int]] = set()
    for i in range(n):
        # Stable sort by distance, ties broken by index: the result never depends on hash order.
        order = sorted(np.flatnonzero(acceptable[i]).tolist(), key=lambda j: (dist[i, j], j))
        kept = 0
        for j in order:
            if kept >= config.num_neighbours:
                break
            if config.min_overlap > 0 and overlap(i, j) < config.min_overlap:
                continue
            pairs.add((min(i, j), max(i, j)))
            kept += 1
    return [(names[a], names[b]) for a, b in sorted(pairs)]
