"""Rigid-body geometry shared by the onboard runtime and the offline tools.

Conventions (used everywhere in the package):
- A pose ``T_a_b`` is a 4x4 float64 matrix that maps points from frame b into frame a,
  so ``T_world_cam`` is the camera-to-world pose (the camera's position is its last column).
- Quaternions are unit quaternions stored as (w, x, y, z), ``quat_wxyz``; ROS messages
  use (x, y, z, w) and are converted only at the ROS boundary.
"""

from __future__ import annotations

import numpy as np


def make_pose(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4, dtype=np.float64)
    T[:3, :3] = np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def invert_pose(T: np.ndarray) -> np.ndarray:
    R = T[:3, :3]
    t = T[:3, 3]
    return make_pose(R.T, -R.T @ t)


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return pts @ T[:3, :3].T + T[:3, 3]


def project_points(T_cam_world: np.ndarray, K: np.ndarray, points_world: np.ndarray):
    """Pinhole projection. Returns (pixels (N,2), depth (N,))."""
    pc = transform_points(T_cam_world, points_world)
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (pc[:, :2] / z[:, None]) * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    return uv, z


def quat_wxyz_from_matrix(R: np.ndarray) -> np.ndarray:
    """Rotation matrix -> unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = np.array([0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s])
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = np.array([(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s])
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = np.array([(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s])
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = np.array([(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s])
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def matrix_from_quat_wxyz(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"not a rotation quaternion: {q}")
    w, x, y, z = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    """Spherical linear interpolation on the shortest arc; returns a unit quaternion.

    Both inputs are normalised first, and q1 is flipped when the dot product is negative
    so that the path is the short one (q and -q are the same rotation).
    """
    a = np.asarray(q0, dtype=np.float64)
    b = np.asarray(q1, dtype=np.float64)
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    d = float(np.dot(a, b))
    if d < 0.0:
        b, d = -b, -d
    d = min(d, 1.0)
    theta = np.arccos(d)
    if theta < 1e-8:
        out = (1.0 - s) * a + s * b
    else:
        out = (np.sin((1.0 - s) * theta) * a + np.sin(s * theta) * b) / np.sin(theta)
    return out / np.linalg.norm(out)


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, s: float) -> np.ndarray:
    """Pose on the segment between two poses: linear in position, slerp in rotation."""
    t = (1.0 - s) * T0[:3, 3] + s * T1[:3, 3]
    q = slerp(quat_wxyz_from_matrix(T0[:3, :3]), quat_wxyz_from_matrix(T1[:3, :3]), s)
    return make_pose(matrix_from_quat_wxyz(q), t)


def rotation_angle_deg(R: np.ndarray) -> float:
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def pose_error(T_world_cam_est: np.ndarray, T_world_cam_gt: np.ndarray) -> tuple[float, float]:
    """(translation error in metres of the camera centre, rotation error in degrees)."""
    dt = float(np.linalg.norm(T_world_cam_est[:3, 3] - T_world_cam_gt[:3, 3]))
    dR = T_world_cam_est[:3, :3].T @ T_world_cam_gt[:3, :3]
    return dt, rotation_angle_deg(dR)


def rotvec_from_matrix(R: np.ndarray) -> np.ndarray:
    q = quat_wxyz_from_matrix(R)
    w = np.clip(q[0], -1.0, 1.0)
    angle = 2.0 * np.arccos(w)
    s = np.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-12:
        return 2.0 * q[1:]
    return q[1:] / s * angle


def matrix_from_rotvec(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(3)
    theta = np.linalg.norm(v)
    if theta < 1e-12:
        Kx = skew(v)
        return np.eye(3) + Kx
    k = v / theta
    Kx = skew(k)
    return np.eye(3) + np.sin(theta) * Kx + (1 - np.cos(theta)) * Kx @ Kx


def skew(v: np.ndarray) -> np.ndarray:
    x, y, z = np.asarray(v, dtype=np.float64).reshape(3)
    return np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])


def similarity_from_points(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale s, rotation R, translation t) with ``dst ~ s * R @ src + t``.

    Umeyama's closed form (1991) for (N, 3) point sets, N >= 3 and not all collinear; used to
    compare a trajectory known only up to a similarity (structure-from-motion) with the truth.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape or len(src) < 3:
        raise ValueError(f"need two (N, 3) point sets of the same size with N >= 3, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    var_src = float((src_c ** 2).sum()) / len(src)
    U, S, Vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    if var_src < 1e-24 or S[1] < 1e-12 * max(S[0], 1e-300):
        raise ValueError("the source points are (nearly) coincident or collinear: the similarity is not determined")
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:  # a reflection fits better: take the best rotation instead
        D[2, 2] = -1.0
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D)) / var_src
    t = mu_dst - s * R @ mu_src
    return s, R, t
