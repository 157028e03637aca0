"""An offline TF buffer: a whole bag's ``/tf`` and ``/tf_static`` in memory, queried at any stamp.

``tf2_ros`` is not installable from PyPI, and the onboard ``d2s_nerf_ros.tf_math`` buffer
keeps only a short rolling cache for live messages. Reading a recorded bag needs the opposite:
every transform of the recording, lookups at arbitrary past stamps, and a tolerance that
says how far a stamp may be from the nearest recorded transform.

Semantics (as tf2): an entry ``(parent, child, T_parent_child)`` maps points of ``child`` into
``parent``. ``lookup(target, source, stamp)`` returns ``T_target_source``. Static entries hold
at every time; dynamic ones are interpolated between the two recorded samples around the
stamp (linear translation, slerp rotation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from d2s_nerf_ros.geometry import interpolate_pose, invert_pose

NS_PER_S = 1_000_000_000


class TransformLookupError(ValueError):
    """A lookup that cannot be answered. ``kind`` says why, so callers can tell a per-stamp
    gap (``"out_of_range"``: skip that image) from a broken tree (``"unknown_frame"``,
    ``"no_path"``: nothing will ever work, stop)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _DynamicEdge:
    parent: str
    child: str
    stamps: list[int] = field(default_factory=list)
    poses: list[np.ndarray] = field(default_factory=list)
    _sorted_stamps: np.ndarray | None = None
    _sorted_poses: list[np.ndarray] | None = None

    def add(self, stamp_ns: int, T: np.ndarray) -> None:
        self.stamps.append(int(stamp_ns))
        self.poses.append(T)
        self._sorted_stamps = None

    def _sorted(self) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._sorted_stamps is None:
            # Recorded messages arrive out of order now and then; a stable sort keeps the
            # last-recorded sample when two share a stamp (it is taken below).
            order = np.argsort(np.asarray(self.stamps, dtype=np.int64), kind="stable")
            self._sorted_stamps = np.asarray(self.stamps, dtype=np.int64)[order]
            self._sorted_poses = [self.poses[i] for i in order]
        assert self._sorted_poses is not None
        return self._sorted_stamps, self._sorted_poses

    def at(self, stamp_ns: int, tolerance_ns: int) -> np.ndarray:
        stamps, poses = self._sorted()
        first, last = int(stamps[0]), int(stamps[-1])
        if stamp_ns < first or stamp_ns > last:
            # Outside the recording: no extrapolation, the end sample only if close enough.
            nearest = first if stamp_ns < first else last
            gap = abs(stamp_ns - nearest)
            if gap <= tolerance_ns:
                return poses[0] if stamp_ns < first else poses[-1]
            raise TransformLookupError(
                "out_of_range",
                f"transform {self.parent} -> {self.child} is recorded from {first / NS_PER_S:.6f} s to "
                f"{last / NS_PER_S:.6f} s; stamp {stamp_ns / NS_PER_S:.6f} s is {gap / 1e6:.1f} ms outside "
                f"(tolerance {tolerance_ns / 1e6:.1f} ms)",
            )
        hi = int(np.searchsorted(stamps, stamp_ns, side="right"))  # stamps[hi-1] <= stamp < stamps[hi]
        lo = hi - 1
        if stamps[lo] == stamp_ns or hi == len(stamps):
            # Exact hit (the last of equal stamps wins), or the final sample itself.
            j = lo
            while j + 1 < len(stamps) and stamps[j + 1] == stamp_ns:
                j += 1
            return poses[j]
        t0, t1 = int(stamps[lo]), int(stamps[hi])
        if stamp_ns - t0 > tolerance_ns or t1 - stamp_ns > tolerance_ns:
            raise TransformLookupError(
                "out_of_range",
                f"transform {self.parent} -> {self.child} has a gap from {t0 / NS_PER_S:.6f} s to "
                f"{t1 / NS_PER_S:.6f} s around stamp {stamp_ns / NS_PER_S:.6f} s; the samples on each side "
                f"must be within the tolerance of {tolerance_ns / 1e6:.1f} ms",
            )
        return interpolate_pose(poses[lo], poses[hi], (stamp_ns - t0) / (t1 - t0))


def _as_pose(T: np.ndarray, parent: str, child: str) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"transform {parent} -> {child} must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-5 or np.linalg.det(R) < 0:
        raise ValueError(f"transform {parent} -> {child} does not hold a rotation")
    return T


class TFBuffer:
    """Every transform of a recording; ``lookup`` composes the chain between any two frames."""

    def __init__(self) -> None:
        self._static: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, T_parent_child)
        self._dynamic: dict[str, _DynamicEdge] = {}  # child -> edge
        self._adjacency: dict[str, set[str]] = {}

    # --- filling -------------------------------------------------------------------------
    def _check_parent(self, parent: str, child: str, static: bool) -> None:
        if not parent or not child:
            raise ValueError(f"transform needs both frame names, got parent {parent!r} child {child!r}")
        if parent == child:
            raise ValueError(f"transform from frame {parent!r} to itself")
        known = self._static.get(child, (None,))[0] or (self._dynamic[child].parent if child in self._dynamic else None)
        if known is not None and known != parent:
            raise ValueError(f"frame {child!r} has two parents, {known!r} and {parent!r}; a TF tree allows one")
        if (static and child in self._dynamic) or (not static and child in self._static):
            raise ValueError(f"transform {parent} -> {child} is recorded both as static (/tf_static) and as dynamic (/tf)")

    def add_static(self, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """A timeless transform (``/tf_static``); a later one for the same pair replaces it."""
        self._check_parent(parent, child, static=True)
        self._static[child] = (parent, _as_pose(T_parent_child, parent, child))
        self._link(parent, child)

    def add_dynamic(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray) -> None:
        """One sample of a moving transform (``/tf``); samples may arrive in any order."""
        self._check_parent(parent, child, static=False)
        edge = self._dynamic.setdefault(child, _DynamicEdge(parent, child))
        edge.add(int(stamp_ns), _as_pose(T_parent_child, parent, child))
        self._link(parent, child)

    def add(self, parent: str, child: str, stamp_ns: int, T_parent_child: np.ndarray, static: bool) -> None:
        if static:
            self.add_static(parent, child, T_parent_child)
        else:
            self.add_dynamic(parent, child, stamp_ns, T_parent_child)

    def _link(self, a: str, b: str) -> None:
        self._adjacency.setdefault(a, set()).add(b)
        self._adjacency.setdefault(b, set()).add(a)

    # --- queries -------------------------------------------------------------------------
    @property
    def frames(self) -> set[str]:
        return set(self._adjacency)

    def stamp_range(self, frame_chain: list[str] | None = None) -> tuple[int, int] | None:
        """(first, last) stamp over all dynamic edges (or those whose child is in ``frame_chain``)."""
        edges = [e for c, e in self._dynamic.items() if frame_chain is None or c in frame_chain]
        if not edges:
            return None
        return min(min(e.stamps) for e in edges), max(max(e.stamps) for e in edges)

    def path(self, target: str, source: str) -> list[str]:
        """Frames from ``target`` to ``source`` along the tree (both ends included)."""
        for frame in (target, source):
            if frame not in self._adjacency:
                known = ", ".join(sorted(self._adjacency)) or "none"
                raise TransformLookupError("unknown_frame", f"frame {frame!r} is not in the TF data (frames: {known})")
        previous: dict[str, str | None] = {target: None}
        queue = deque([target])
        while queue:
            frame = queue.popleft()
            if frame == source:
                break
            for nxt in sorted(self._adjacency[frame]):
                if nxt not in previous:
                    previous[nxt] = frame
                    queue.append(nxt)
        if source not in previous:
            reachable = ", ".join(sorted(previous))
            raise TransformLookupError(
                "no_path",
                f"no chain of transforms connects {target!r} and {source!r}: they are in separate TF trees "
                f"({target!r} reaches only: {reachable})",
            )
        chain = [source]
        while chain[-1] != target:
            chain.append(previous[chain[-1]])  # type: ignore[arg-type]
        return chain[::-1]

    def _edge(self, parent: str, child: str, stamp_ns: int, tolerance_ns: int) -> np.ndarray:
        """``T_parent_child`` at the stamp."""
        if child in self._static and self._static[child][0] == parent:
            return self._static[child][1]
        return self._dynamic[child].at(stamp_ns, tolerance_ns)

    def lookup(self, target: str, source: str, stamp_ns: int, tolerance_ns: int = 0) -> np.ndarray:
        """``T_target_source`` at ``stamp_ns``: maps points of ``source`` into ``target``.

        ``tolerance_ns``: a dynamic transform is interpolated only between samples each at
        most this far from the stamp; outside its recording, the end sample is used when it
        is this close. Raises ``TransformLookupError`` otherwise.
        """
        chain = self.path(target, source)
        T = np.eye(4)
        for a, b in zip(chain[:-1], chain[1:]):
            if self._parent_of(b) == a:  # going down the tree: a is b's parent
                T = T @ self._edge(a, b, stamp_ns, tolerance_ns)
            else:  # going up: b is a's parent
                T = T @ invert_pose(self._edge(b, a, stamp_ns, tolerance_ns))
        return T

    def _parent_of(self, child: str) -> str | None:
        if child in self._static:
            return self._static[child][0]
        if child in self._dynamic:
            return self._dynamic[child].parent
        return None

    def can_lookup(self, target: str, source: str, stamp_ns: int, tolerance_ns: int = 0) -> bool:
        try:
            self.lookup(target, source, stamp_ns, tolerance_ns)
        except TransformLookupError as exc:
            if exc.kind != "out_of_range":
                raise
            return False
        return True
