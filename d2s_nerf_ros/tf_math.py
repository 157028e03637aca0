"""Pose <-> ROS message fields, REP-105 composition, covariance transport, a small TF buffer.

Nothing here imports ROS: functions read and write message *fields* through attribute
access (``msg.position.x``, ``msg.rotation.w``), so they work on rclpy messages and on
plain stand-ins alike, and the math is unit-tested without DDS.

ROS quaternions are (x, y, z, w); inside the package they are (w, x, y, z)
(``d2s_nerf_ros.geometry``). The conversion happens only in this module.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2s_nerf_ros.geometry import (
    interpolate_pose,
    invert_pose,
    make_pose,
    matrix_from_quat_wxyz,
    quat_wxyz_from_matrix,
    skew,
)


# --- message fields <-> 4x4 ----------------------------------------------------------------

def quat_xyzw_from_matrix(R: np.ndarray) -> tuple[float, float, float, float]:
    w, x, y, z = quat_wxyz_from_matrix(R)
    return float(x), float(y), float(z), float(w)


def matrix_from_quat_xyzw(x: float, y: float, z: float, w: float) -> np.ndarray:
    return matrix_from_quat_wxyz(np.array([w, x, y, z], dtype=np.float64))


def pose_to_msg_fields(T: np.ndarray, pose_msg: Any) -> Any:
    """Fill a ``geometry_msgs/Pose`` (``position``, ``orientation``) from a 4x4; returns it."""
    _check_pose(T)
    pose_msg.position.x, pose_msg.position.y, pose_msg.position.z = (float(v) for v in T[:3, 3])
    q = quat_xyzw_from_matrix(T[:3, :3])
    pose_msg.orientation.x, pose_msg.orientation.y, pose_msg.orientation.z, pose_msg.orientation.w = q
    return pose_msg


def transform_to_msg_fields(T: np.ndarray, transform_msg: Any) -> Any:
    """Fill a ``geometry_msgs/Transform`` (``translation``, ``rotation``) from a 4x4; returns it."""
    _check_pose(T)
    transform_msg.translation.x, transform_msg.translation.y, transform_msg.translation.z = (float(v) for v in T[:3, 3])
    q = quat_xyzw_from_matrix(T[:3, :3])
    transform_msg.rotation.x, transform_msg.rotation.y, transform_msg.rotation.z, transform_msg.rotation.w = q
    return transform_msg


def pose_from_msg(pose_msg: Any) -> np.ndarray:
    """A ``geometry_msgs/Pose`` as a 4x4."""
    p, q = pose_msg.position, pose_msg.orientation
    return _pose_from_parts((p.x, p.y, p.z), (q.x, q.y, q.z, q.w), "pose")


def transform_from_msg(transform_msg: Any) -> np.ndarray:
    """A ``geometry_msgs/Transform`` as a 4x4 ``T_parent_child``."""
    t, q = transform_msg.translation, transform_msg.rotation
    return _pose_from_parts((t.x, t.y, t.z), (q.x, q.y, q.z, q.w), "transform")


def _pose_from_parts(t: tuple, q_xyzw: tuple, what: str) -> np.ndarray:
    t_arr = np.array(t, dtype=np.float64)
    q_arr = np.array(q_xyzw, dtype=np.float64)
    if not (np.all(np.isfinite(t_arr)) and np.all(np.isfinite(q_arr))):
        raise ValueError(f"{what} has non-finite values: translation {t_arr}, quaternion {q_arr}")
    if np.linalg.norm(q_arr) < 1e-9:
        raise ValueError(f"{what} has a zero quaternion")
    return make_pose(matrix_from_quat_xyzw(*q_arr), t_arr)


def _check_pose(T: np.ndarray) -> None:
    T = np.asarray(T)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"a pose must be a finite 4x4 matrix, got shape {T.shape}")


# --- REP-105 --------------------------------------------------------------------------------

def map_to_odom(T_map_cam: np.ndarray, T_odom_cam: np.ndarray) -> np.ndarray:
    """``T_map_odom`` such that ``T_map_odom @ T_odom_cam == T_map_cam`` (REP-105).

    The localizer knows where the camera is in the map; odometry knows where it is in
    odom at the same instant; map->odom is the correction that makes the two agree.
    """
    return np.asarray(T_map_cam, dtype=np.float64) @ invert_pose(np.asarray(T_odom_cam, dtype=np.float64))


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (``sec``, ``nanosec``) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp_fields(ns: int, stamp: Any) -> Any:
    """Fill ``builtin_interfaces/Time`` fields from integer nanoseconds; returns it."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"a ROS time cannot be negative: {ns} ns")
    stamp.sec, stamp.nanosec = divmod(ns, 1_000_000_000)
    return stamp


# --- covariance -----------------------------------------------------------------------------

def covariance_of_offset_pose(covariance: np.ndarray, T_world_a: np.ndarray, T_a_b: np.ndarray) -> np.ndarray:
    """Covariance of ``T_world_b = T_world_a @ T_a_b`` when ``T_a_b`` is known exactly.

    Both covariances are 6x6 over (x y z rx ry rz) as in ``geometry_msgs/PoseWithCovariance``:
    the position of the frame's origin in the world and a small rotation about the world's
    fixed axes (a perturbation ``T -> exp(dphi) T``). The rotation part carries over
    unchanged; the origin of b moves by ``dphi x (R_world_a t_a_b)`` when a rotates, so
    ``d p_b = d p_a - [R_world_a t_a_b]_x dphi``.
    """
    C = np.asarray(covariance, dtype=np.float64)
    if C.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {C.shape}")
    lever = np.asarray(T_world_a, dtype=np.float64)[:3, :3] @ np.asarray(T_a_b, dtype=np.float64)[:3, 3]
    J = np.eye(6)
    J[:3, 3:] = -skew(lever)
    out = J @ C @ J.T
    return 0.5 * (out + out.T)


def checked_pose_covariance(covariance: Any) -> np.ndarray:
    """``covariance`` as a 6x6 float array fit to publish, or ``ValueError`` saying why not.

    A missing, non-finite, asymmetric or not positive definite matrix is refused: published as
    all zeros it would read as "perfectly certain", and a filter gating by Mahalanobis
    distance (robot_localization) would trust the pose completely.
    """
    if covariance is None:
        raise ValueError("the pose has no covariance")
    C = np.asarray(covariance, dtype=np.float64)
    if C.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError("covariance has non-finite values")
    if np.abs(C - C.T).max() > 1e-9 * max(np.abs(C).max(), 1e-300):
        raise ValueError("covariance is not symmetric")
    if np.linalg.eigvalsh(0.5 * (C + C.T)).min() <= 0.0:
        raise ValueError("covariance is not positive definite")
    return C


def covariance_to_msg_list(covariance: np.ndarray) -> list[float]:
    """6x6 -> the 36 row-major floats of ``PoseWithCovariance.covariance``."""
    C = np.asarray(covariance, dtype=np.float64)
    if C.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {C.shape}")
    if not np.all(np.isfinite(C)):
        raise ValueError("covariance has non-finite values")
    return [float(v) for v in C.reshape(36)]


# --- the TF buffer -----------------------------------------------------------------------------

NS_PER_S = 1_000_000_000


class TransformLookupError(LookupError):
    """No transform between two frames at the time asked. ``kind`` says why, so a caller can
    tell a per-stamp gap (``"out_of_range"``: skip that image) from a broken tree
    (``"unknown_frame"``, ``"no_path"``: nothing will ever work)."""

    def __init__(self, message: str, kind: str = "out_of_range") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Edge:
    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)     # sorted ns
    poses: list[np.ndarray] = field(default_factory=list)  # T_parent_child, same order


def _as_rigid(T: np.ndarray, parent: str, child: str) -> np.ndarray:
    T = np.array(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"transform {parent} -> {child} must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-5 or np.linalg.det(R) < 0:
        raise ValueError(f"transform {parent} -> {child} does not hold a rotation")
    return T


class TransformBuffer:
    """One TF buffer for the node (live ``/tf``) and the bag source (a whole recording).

    The semantics are tf2's: an entry ``(parent, child, T_parent_child)`` maps points of
    ``child`` into ``parent``; ``lookup(target, source, stamp_ns)`` returns ``T_target_source``,
    composing only the edges below the two frames' common ancestor (an edge above it, e.g. the
    node's own map -> odom, need not have data at that time). Static edges hold at every time;
    dynamic ones are interpolated between the two samples around the stamp (linear translation,
    slerp rotation), never extrapolated. Thread-safe.

    Live (the default): ``cache_s`` of samples per edge are kept, ``stamp_ns == 0`` means the
    latest sample of each edge, and a new parent of a frame replaces the old one (as tf2 does).
    A robot install has tf2_ros and the node uses it there; this stands in elsewhere.

    Recording (``cache_s=None, strict=True``): every sample is kept; a frame given a second
    parent, or a transform recorded both static and dynamic, is a ``ValueError``; and
    ``lookup(..., tolerance_ns=...)`` bounds how far a stamp may be from the samples used.
    """

    def __init__(self, cache_s: float | None = 10.0, strict: bool = False) -> None:
        self.cache_ns = None if cache_s is None else int(cache_s * 1e9)
        self.strict = strict
        self._edges: dict[str, _Edge] = {}
        self._lock = threading.Lock()

    # --- filling ------------------------------------------------------------------------------
    def set_transform(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool = False) -> None:
        """One sample (or, ``static``, the timeless value) of ``T_parent_child``; samples may come in any order."""
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if not parent or not child or parent == child:
            raise ValueError(f"a transform needs two different non-empty frames, got {parent!r} -> {child!r}"
                             + (" (a frame to itself)" if parent and parent == child else ""))
        T = _as_rigid(T_parent_child, parent, child)
        stamp_ns = int(stamp_ns)
        with self._lock:
            edge = self._edges.get(child)
            if edge is not None and self.strict:
                if edge.parent != parent:
                    raise ValueError(f"frame {child!r} has two parents, {edge.parent!r} and {parent!r}; a TF tree allows one")
                if edge.static != static:
                    raise ValueError(f"transform {parent} -> {child} is recorded both as static (/tf_static) and as dynamic (/tf)")
            if edge is None or edge.parent != parent or edge.static != static:
                edge = _Edge(parent=parent, static=static)
                self._edges[child] = edge
            if static:
                edge.stamps, edge.poses = [stamp_ns], [T]
                return
            i = bisect.bisect_left(edge.stamps, stamp_ns)
            if i < len(edge.stamps) and edge.stamps[i] == stamp_ns:
                edge.poses[i] = T  # the last one given for a stamp wins
            else:
                edge.stamps.insert(i, stamp_ns)
                edge.poses.insert(i, T)
            if self.cache_ns is not None:
                drop = bisect.bisect_left(edge.stamps, edge.stamps[-1] - self.cache_ns)
                if drop:
                    del edge.stamps[:drop], edge.poses[:drop]

    # --- queries ------------------------------------------------------------------------------
    def frames(self) -> set[str]:
        with self._lock:
            return self._frames()

    def _frames(self) -> set[str]:
        return set(self._edges) | {e.parent for e in self._edges.values()}

    def path(self, target: str, source: str) -> list[str]:
        """Frames from ``target`` to ``source`` along the tree (both ends included)."""
        with self._lock:
            up_target, common, up_source = self._route(target.lstrip("/"), source.lstrip("/"))
        return up_target[: up_target.index(common) + 1] + up_source[: up_source.index(common)][::-1]

    def lookup(self, target: str, source: str, stamp_ns: int, tolerance_ns: int | None = None) -> np.ndarray:
        """``T_target_source`` at ``stamp_ns``; ``TransformLookupError`` when it cannot be answered.

        ``tolerance_ns`` None (live): any two samples around the stamp are interpolated and
        ``stamp_ns == 0`` is the latest. An integer (recordings): both samples must be within it
        of the stamp, and outside an edge's recording its end sample is used when that close.
        """
        target, source = target.lstrip("/"), source.lstrip("/")
        with self._lock:
            if target == source:
                return np.eye(4)
            up_target, common, up_source = self._route(target, source)
            T_common_source = self._compose_up_to(up_source, common, int(stamp_ns), tolerance_ns)
            T_common_target = self._compose_up_to(up_target, common, int(stamp_ns), tolerance_ns)
        return invert_pose(T_common_target) @ T_common_source

    def can_lookup(self, target: str, source: str, stamp_ns: int, tolerance_ns: int | None = None) -> bool:
        """Whether ``lookup`` answers at this stamp; a broken tree still raises."""
        try:
            self.lookup(target, source, stamp_ns, tolerance_ns)
        except TransformLookupError as exc:
            if exc.kind != "out_of_range":
                raise
            return False
        return True

    # --- internals (lock held) ------------------------------------------------------------------
    def _route(self, target: str, source: str) -> tuple[list[str], str, list[str]]:
        known = self._frames()
        for frame in (target, source):
            if frame not in known:
                raise TransformLookupError(f"frame {frame!r} is not in the TF data "
                                           f"(frames: {', '.join(sorted(known)) or 'none'})", "unknown_frame")
        # The common ancestor from the parent links alone, then only the edges below it are composed.
        up_source, up_target = self._ancestors(source), self._ancestors(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise TransformLookupError(f"frames {target!r} and {source!r} are not connected: they are in separate "
                                       f"TF trees (rooted at {up_target[-1]!r} and {up_source[-1]!r})", "no_path")
        return up_target, common, up_source

    def _ancestors(self, frame: str) -> list[str]:
        """The frame itself, its parent, ... up to the root."""
        chain = [frame]
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in chain:
                raise TransformLookupError(f"the TF tree has a loop through {frame!r}", "no_path")
            chain.append(frame)
        return chain

    def _compose_up_to(self, chain: list[str], ancestor: str, stamp_ns: int, tolerance_ns: int | None) -> np.ndarray:
        """T_ancestor_frame for ``chain[0]`` at the given time."""
        T = np.eye(4)
        for frame in chain[: chain.index(ancestor)]:
            T = self._edge_at(self._edges[frame], frame, stamp_ns, tolerance_ns) @ T
        return T

    @staticmethod
    def _edge_at(edge: _Edge, child: str, stamp_ns: int, tolerance_ns: int | None) -> np.ndarray:
        stamps, poses = edge.stamps, edge.poses
        if edge.static or (stamp_ns == 0 and tolerance_ns is None):
            return poses[-1]
        first, last = stamps[0], stamps[-1]
        if stamp_ns < first or stamp_ns > last:
            gap = first - stamp_ns if stamp_ns < first else stamp_ns - last
            if tolerance_ns is None:
                raise TransformLookupError(
                    f"{edge.parent} -> {child} at {stamp_ns / NS_PER_S:.6f} s would need extrapolation: "
                    f"data covers {first / NS_PER_S:.6f} .. {last / NS_PER_S:.6f} s")
            if gap <= tolerance_ns:
                return poses[0] if stamp_ns < first else poses[-1]
            raise TransformLookupError(
                f"transform {edge.parent} -> {child} is recorded from {first / NS_PER_S:.6f} s to "
                f"{last / NS_PER_S:.6f} s; stamp {stamp_ns / NS_PER_S:.6f} s is {gap / 1e6:.1f} ms outside "
                f"(tolerance {tolerance_ns / 1e6:.1f} ms)")
        i = bisect.bisect_left(stamps, stamp_ns)
        if stamps[i] == stamp_ns:
            return poses[i]
        t0, t1 = stamps[i - 1], stamps[i]
        if tolerance_ns is not None and (stamp_ns - t0 > tolerance_ns or t1 - stamp_ns > tolerance_ns):
            raise TransformLookupError(
                f"transform {edge.parent} -> {child} has a gap from {t0 / NS_PER_S:.6f} s to {t1 / NS_PER_S:.6f} s "
                f"around stamp {stamp_ns / NS_PER_S:.6f} s; the samples on each side must be within the "
                f"tolerance of {tolerance_ns / 1e6:.1f} ms")
        return interpolate_pose(poses[i - 1], poses[i], (stamp_ns - t0) / (t1 - t0))
