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


# --- a small TF buffer ------------------------------------------------------------------------

class TransformLookupError(LookupError):
    """No transform between two frames at the time asked (unknown frame, no path, extrapolation)."""


@dataclass
class _Edge:
    parent: str
    static: bool
    stamps: list[int] = field(default_factory=list)     # sorted ns
    poses: list[np.ndarray] = field(default_factory=list)  # T_parent_child, same order


class TransformBuffer:
    """Enough of tf2's buffer for the localizer: a tree of timed edges, interpolation, chains.

    A robot install has tf2_ros and the node uses it there; in the pip environment this
    class stands in (it is not a general replacement: no time travel between two times,
    no multiple-parent detection beyond "last parent wins" like tf2).

    ``lookup(target, source, stamp_ns)`` returns ``T_target_source`` at that time:
    dynamic edges are interpolated (linear position, slerp rotation) between the two
    samples around the time; static edges hold at every time. ``stamp_ns == 0`` means
    "the latest sample of each edge". Thread-safe.
    """

    def __init__(self, cache_s: float = 10.0) -> None:
        self.cache_ns = int(cache_s * 1e9)
        self._edges: dict[str, _Edge] = {}
        self._lock = threading.Lock()

    def set_transform(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool = False) -> None:
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if not parent or not child or parent == child:
            raise ValueError(f"a transform needs two different non-empty frames, got {parent!r} -> {child!r}")
        _check_pose(T_parent_child)
        T = np.array(T_parent_child, dtype=np.float64)
        with self._lock:
            edge = self._edges.get(child)
            if edge is None or edge.parent != parent or edge.static != static:
                edge = _Edge(parent=parent, static=static)
                self._edges[child] = edge
            if static:
                edge.stamps, edge.poses = [int(stamp_ns)], [T]
                return
            i = bisect.bisect_left(edge.stamps, int(stamp_ns))
            if i < len(edge.stamps) and edge.stamps[i] == int(stamp_ns):
                edge.poses[i] = T
            else:
                edge.stamps.insert(i, int(stamp_ns))
                edge.poses.insert(i, T)
            cutoff = edge.stamps[-1] - self.cache_ns
            drop = bisect.bisect_left(edge.stamps, cutoff)
            if drop:
                del edge.stamps[:drop], edge.poses[:drop]

    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {e.parent for e in self._edges.values()}

    def lookup(self, target: str, source: str, stamp_ns: int) -> np.ndarray:
        target, source = target.lstrip("/"), source.lstrip("/")
        with self._lock:
            if target == source:
                return np.eye(4)
            known = set(self._edges) | {e.parent for e in self._edges.values()}
            for frame in (target, source):
                if frame not in known:
                    raise TransformLookupError(f"frame {frame!r} does not exist in the TF buffer")
            # Find the common ancestor from the parent links alone, then compose only the
            # edges below it: an edge above it (e.g. map -> odom) need not have data at this time.
            up_source = self._ancestors(source)
            up_target = set(self._ancestors(target))
            common = next((f for f in up_source if f in up_target), None)
            if common is None:
                raise TransformLookupError(f"frames {target!r} and {source!r} are not connected in the TF tree")
            T_common_source = self._compose_up_to(source, common, stamp_ns)
            T_common_target = self._compose_up_to(target, common, stamp_ns)
        return invert_pose(T_common_target) @ T_common_source

    def _ancestors(self, frame: str) -> list[str]:
        """The frame itself, its parent, ... up to the root."""
        chain = [frame]
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in chain:
                raise TransformLookupError(f"the TF tree has a loop through {frame!r}")
            chain.append(frame)
        return chain

    def _compose_up_to(self, frame: str, ancestor: str, stamp_ns: int) -> np.ndarray:
        """T_ancestor_frame at the given time."""
        T = np.eye(4)
        while frame != ancestor:
            edge = self._edges[frame]
            T = self._edge_at(edge, frame, stamp_ns) @ T
            frame = edge.parent
        return T

    @staticmethod
    def _edge_at(edge: _Edge, child: str, stamp_ns: int) -> np.ndarray:
        if edge.static or stamp_ns == 0:
            return edge.poses[-1]
        stamps = edge.stamps
        if stamp_ns < stamps[0] or stamp_ns > stamps[-1]:
            raise TransformLookupError(
                f"{edge.parent} -> {child} at {stamp_ns * 1e-9:.6f} s would need extrapolation: "
                f"data covers {stamps[0] * 1e-9:.6f} .. {stamps[-1] * 1e-9:.6f} s"
            )
        i = bisect.bisect_left(stamps, stamp_ns)
        if stamps[i] == stamp_ns:
            return edge.poses[i]
        t0, t1 = stamps[i - 1], stamps[i]
        return interpolate_pose(edge.poses[i - 1], edge.poses[i], (stamp_ns - t0) / (t1 - t0))
