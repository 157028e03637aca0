"""Odometry gate: a visual pose is published only when it agrees with what odometry predicts.

A relocaliser's worst output is a confident wrong pose (another room, a repetitive texture).
Odometry is locally accurate, so the map -> odom correction changes slowly: a new frame whose
camera pose, predicted through the last accepted map -> odom and the odometry at its stamp
(``T_map_odom @ T_odom_cam``), is far from what the localizer measured is rejected.

- Before the first accepted frame (and after ``reset``, e.g. a relocalise request),
  ``min_consistent_frames`` frames in a row must agree with each other (each with the previous
  one, through odometry) before anything is published.
- Once locked, a frame within ``max_translation_m`` / ``max_rotation_deg`` of the prediction is
  accepted and becomes the new map -> odom. Frames that disagree are rejected, but collected: when
  ``min_consistent_frames`` of them in a row agree with each other, the gate re-locks onto them
  (the robot was moved, or the earlier lock was wrong), so it can never stay stuck on a wrong pose.

``min_consistent_frames: 1`` turns the gate into a pass-through. Pure numpy, no ROS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2s_nerf_ros.geometry import pose_error
from d2s_nerf_ros.tf_math import map_to_odom


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str             # why it was rejected, or what kind of acceptance ("consistent", "re-locked", ...)
    T_map_odom: np.ndarray  # the map -> odom this frame implies


class OdometryGate:
    def __init__(self, max_translation_m: float, max_rotation_deg: float, min_consistent_frames: int) -> None:
        if max_translation_m <= 0 or max_rotation_deg <= 0 or min_consistent_frames < 1:
            raise ValueError("the odometry gate needs positive jump limits and min_consistent_frames >= 1")
        self.max_translation_m = float(max_translation_m)
        self.max_rotation_deg = float(max_rotation_deg)
        self.min_consistent_frames = int(min_consistent_frames)
        self.T_map_odom: np.ndarray | None = None    # the accepted correction (None: not locked)
        self._pending: list[np.ndarray] = []          # agreeing candidates not accepted yet

    @property
    def locked(self) -> bool:
        return self.T_map_odom is not None

    def reset(self) -> None:
        """Forget the lock: the next ``min_consistent_frames`` agreeing frames are needed again."""
        self.T_map_odom = None
        self._pending.clear()

    def _jump(self, T_map_odom: np.ndarray, T_map_cam: np.ndarray, T_odom_cam: np.ndarray) -> tuple[float, float]:
        """Metres and degrees between the measured camera pose and the one ``T_map_odom`` predicts."""
        return pose_error(T_map_cam, T_map_odom @ T_odom_cam)

    def _plausible(self, jump: tuple[float, float]) -> bool:
        return jump[0] <= self.max_translation_m and jump[1] <= self.max_rotation_deg

    def check(self, T_map_cam: np.ndarray, T_odom_cam: np.ndarray) -> GateDecision:
        """Accept or reject the localizer's ``T_map_cam`` given odometry's ``T_odom_cam`` at the same stamp."""
        T_map_cam = np.asarray(T_map_cam, dtype=np.float64)
        T_odom_cam = np.asarray(T_odom_cam, dtype=np.float64)
        candidate = map_to_odom(T_map_cam, T_odom_cam)
        reason = ""
        if self.T_map_odom is not None:
            jump = self._jump(self.T_map_odom, T_map_cam, T_odom_cam)
            if self._plausible(jump):
                self.T_map_odom = candidate
                self._pending.clear()
                return GateDecision(True, "consistent with odometry", candidate)
            reason = (f"implausible jump against odometry: {jump[0]:.2f} m, {jump[1]:.1f} deg "
                      f"(max {self.max_translation_m:g} m, {self.max_rotation_deg:g} deg)")
        if self._pending and not self._plausible(self._jump(self._pending[-1], T_map_cam, T_odom_cam)):
            self._pending.clear()
        self._pending.append(candidate)
        if len(self._pending) >= self.min_consistent_frames:
            relocked = self.T_map_odom is not None
            self.T_map_odom = candidate
            self._pending.clear()
            return GateDecision(True, f"re-locked on {self.min_consistent_frames} agreeing frames" if relocked
                                else f"locked on {self.min_consistent_frames} agreeing frames", candidate)
        if not reason:
            reason = (f"waiting for {self.min_consistent_frames} agreeing frames before the first pose "
                      f"({len(self._pending)} so far)")
        return GateDecision(False, reason, candidate)


__all__ = ["GateDecision", "OdometryGate"]
