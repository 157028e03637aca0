"""Novel camera poses between neighbouring mapping frames.

Each mapping frame is paired with its k nearest mapping frames by camera position; along
each pair, poses at s in (0, 1) lie exactly on the segment between the two camera centres
and their rotations are the unit-quaternion slerp on the shortest arc. (The paper's public
scripts produce poses off the segment with an unnormalised slerp; we do not.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2s_nerf_ros.geometry import interpolate_pose, rotation_angle_deg
from offline.sources.frames import Frame


@dataclass
class NovelPoseConfig:
    k_neighbours: int = 2
    samples_per_pair: int = 10
    include_endpoints: bool = False   # True adds s = 0 and s = 1 (the mapping poses themselves)
    dedupe_translation_m: float = 1e-3
    dedupe_rotation_deg: float = 0.1

    def __post_init__(self) -> None:
        if self.k_neighbours < 1:
            raise ValueError(f"k_neighbours must be >= 1, got {self.k_neighbours}")
        if self.samples_per_pair < 1:
            raise ValueError(f"samples_per_pair must be >= 1, got {self.samples_per_pair}")
        if self.dedupe_translation_m < 0 or self.dedupe_rotation_deg < 0:
            raise ValueError("dedupe tolerances must be >= 0")

    def s_values(self) -> np.ndarray:
        """Interpolation parameters, evenly spaced: interior points of [0, 1] unless endpoints are asked for."""
        n = self.samples_per_pair
        if self.include_endpoints:
            return np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])
        return np.arange(1, n + 1, dtype=np.float64) / (n + 1)


@dataclass
class NovelPose:
    T_world_cam: np.ndarray  # 4x4 camera-to-world
    frame_a: str             # pair endpoints (mapping frame names); s = 0 is frame_a
    frame_b: str
    s: float

    @property
    def name(self) -> str:
        return f"novel/{self.frame_a}--{self.frame_b}@{self.s:.4f}"

    @property
    def reference_frame(self) -> str:
        """The nearer endpoint (frame_a on the tie at s = 0.5)."""
        return self.frame_a if self.s <= 0.5 else self.frame_b


def neighbour_pairs(positions: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Unordered pairs (i < j) where j is among i's k nearest or i among j's."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = len(pos)
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    pairs: set[tuple[int, int]] = set()
    for i in range(n):
        # stable sort: ties resolve by index, so the result does not depend on float noise order
        for j in np.argsort(dist[i], kind="stable")[: min(k, n - 1)]:
            pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def novel_poses(frames: list[Frame], config: NovelPoseConfig = NovelPoseConfig()) -> list[NovelPose]:
    """Poses along the segments between each mapping frame and its k nearest neighbours.

    A pair found from both ends (a-b and b-a) is rendered once; poses closer than the
    dedupe tolerances to an earlier one (e.g. two co-located frames) are dropped.
    """
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        raise ValueError("mapping frame names must be unique")
    if len(frames) < 2:
        return []
    poses = [np.asarray(f.T_world_cam, dtype=np.float64) for f in frames]
    for f, T in zip(frames, poses):
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"frame {f.name}: T_world_cam must be a finite 4x4 matrix")
    positions = np.stack([T[:3, 3] for T in poses])

    out: list[NovelPose] = []
    kept_positions: list[np.ndarray] = []
    for i, j in neighbour_pairs(positions, config.k_neighbours):
        for s in config.s_values():
            T = interpolate_pose(poses[i], poses[j], float(s))
            if _is_duplicate(T, out, kept_positions, config):
                continue
            out.append(NovelPose(T_world_cam=T, frame_a=names[i], frame_b=names[j], s=float(s)))
            kept_positions.append(T[:3, 3])
    return out


def _is_duplicate(T: np.ndarray, kept: list[NovelPose], kept_positions: list[np.ndarray],
                  config: NovelPoseConfig) -> bool:
    if not kept:
        return False
    d = np.linalg.norm(np.asarray(kept_positions) - T[:3, 3], axis=1)
    for idx in np.flatnonzero(d <= config.dedupe_translation_m):
        if rotation_angle_deg(kept[idx].T_world_cam[:3, :3].T @ T[:3, :3]) <= config.dedupe_rotation_deg:
            return True
    return False
