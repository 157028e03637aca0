"""A deterministic demo scene: a textured room rendered by an exact ray caster, and a real bag of it.

The bundled demo and the bag tests need mapping data with *exact* ground-truth poses and no
third-party images. This module builds a small room (walls, floor, ceiling, a pillar and a
few boxes for parallax), paints every face with procedural texture (multi-scale noise, floor
tiles, posters, blobs, stripes: plenty of corners for feature extractors), and renders
colour + depth for any camera pose by intersecting each pixel's ray with the boxes in closed
form (numpy, vectorised; ~20 ms per 320x240 frame).

``write_demo_bag`` records a mapping run of that room as a real bag with ``rosbags``
(ROS 2 mcap or sqlite3, or ROS 1): images (raw or compressed), CameraInfo, and poses as
``/tf`` (``map -> base_link`` moving, ``base_link -> camera_optical`` on ``/tf_static``) or
as a pose topic, or no poses at all (for structure-from-motion). It returns the ground truth
the bag was made from.

World frame: ``map``, z up, metres. Camera: OpenCV optical axes (x right, y down, z forward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2s_nerf_ros.camera import CameraIntrinsics
from d2s_nerf_ros.geometry import make_pose, matrix_from_rotvec, quat_wxyz_from_matrix

DEMO_CAMERA = CameraIntrinsics(width=320, height=240, fx=250.0, fy=250.0, cx=159.5, cy=119.5)
TRAJECTORY_PERIOD_S = 20.0  # one loop of the room; images are spread over it
TF_RATE_HZ = 100.0  # /tf and pose topics are recorded at this rate, independent of the image rate
START_NS = 1_700_000_000 * 1_000_000_000  # a plausible wall-clock start for the recording

# Rotation taking optical axes (x right, y down, z forward) to a body frame (x forward, y left, z up).
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


# --- the scene --------------------------------------------------------------------------------

@dataclass
class _Face:
    """One textured rectangle: points with ``x[axis] == value``, texture over (u_axis, v_axis)."""

    axis: int
    value: float
    u_axis: int
    v_axis: int
    u0: float
    v0: float
    texture: np.ndarray  # (H, W, 3) float32 in [0, 255], rows along v, columns along u


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


ROOM = Box((-3.0, -2.5, 0.0), (3.0, 2.5, 2.6))
OBSTACLES = (
    Box((-0.2, -0.2, 0.0), (0.2, 0.2, 2.6)),  # a pillar in the middle: parallax against the walls
    Box((1.8, -2.3, 0.0), (2.7, -1.3, 0.9)),
    Box((-2.8, 0.7, 0.0), (-2.0, 1.8, 1.4)),
    Box((-0.6, 1.7, 0.0), (0.5, 2.4, 0.7)),
    Box((2.2, 1.0, 0.0), (2.8, 1.6, 1.8)),
)


def _noise(rng: np.random.Generator, w: int, h: int, texels_per_m: float, scales_m: tuple[float, ...]) -> np.ndarray:
    """Multi-scale value noise (h, w) with roughly unit spread: random grids upsampled smoothly."""
    import cv2

    total = np.zeros((h, w), np.float32)
    for i, scale in enumerate(scales_m):
        cells = scale * texels_per_m
        gw, gh = max(2, int(math.ceil(w / cells)) + 1), max(2, int(math.ceil(h / cells)) + 1)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = cv2.resize(grid, (int(round((gw - 1) * cells)) + 1, int(round((gh - 1) * cells)) + 1), interpolation=cv2.INTER_CUBIC)
        total += up[:h, :w] / (1.0 + 0.4 * i)
    return total / max(1e-6, float(total.std()))


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    import cv2

    hsv = np.zeros((1, n, 3), np.uint8)
    hsv[0, :, 0] = rng.integers(0, 180, n)
    hsv[0, :, 1] = rng.integers(60, 200, n)
    hsv[0, :, 2] = rng.integers(90, 230, n)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def _make_texture(rng: np.random.Generator, width_m: float, height_m: float, texels_per_m: float, style: str, shade: float) -> np.ndarray:
    """Procedural RGB texture for one face; ``style`` picks the pattern (floor, wall, ceiling, box)."""
    import cv2

    w = max(4, int(round(width_m * texels_per_m)))
    h = max(4, int(round(height_m * texels_per_m)))
    colours = _palette(rng, 6)
    img = np.empty((h, w, 3), np.float32)
    img[:] = colours[0]
    fine = _noise(rng, w, h, texels_per_m, (0.03, 0.08))
    coarse = _noise(rng, w, h, texels_per_m, (0.25, 0.6))
    img += (18.0 * fine + 25.0 * coarse)[:, :, None] * np.array([1.0, 0.95, 0.9], np.float32)
    px = texels_per_m
    if style == "floor":
        tile = 0.4
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / px
        checker = ((np.floor(xx / tile) + np.floor(yy / tile)) % 2).astype(np.float32)
        img = img * (0.75 + 0.35 * checker[:, :, None])
        grout = (np.minimum(xx % tile, yy % tile) < 0.012)
        img[grout] = colours[1] * 0.5
    elif style == "ceiling":
        panel = 0.6
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / px
        frame = np.minimum(xx % panel, yy % panel) < 0.03
        img[frame] = colours[2]
        for _ in range(int(width_m * height_m * 1.5)):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, c, int(px * rng.uniform(0.04, 0.1)), colours[3].tolist(), -1)
    elif style == "box":
        yy = np.mgrid[0:h, 0:w][0].astype(np.float32) / px
        stripes = np.sin(yy * 2 * np.pi / 0.07 + 3.0 * coarse)
        img += (20.0 * stripes)[:, :, None]
        for _ in range(max(2, int(width_m * height_m * 12))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            s = int(px * rng.uniform(0.05, 0.15))
            cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), colours[int(rng.integers(1, 6))].tolist(), -1)
    else:  # wall: posters, blobs and marks
        for _ in range(int(width_m * height_m * 1.2)):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            pw, ph = int(px * rng.uniform(0.25, 0.7)), int(px * rng.uniform(0.25, 0.7))
            cv2.rectangle(img, (x0, y0), (x0 + pw, y0 + ph), colours[int(rng.integers(1, 6))].tolist(), -1)
            inner = colours[int(rng.integers(1, 6))].tolist()
            for _ in range(4):
                cx, cy = x0 + int(rng.integers(0, max(1, pw))), y0 + int(rng.integers(0, max(1, ph)))
                cv2.circle(img, (cx, cy), int(px * rng.uniform(0.02, 0.08)), inner, -1)
            cv2.rectangle(img, (x0, y0), (x0 + pw, y0 + ph), (20.0, 20.0, 20.0), max(1, int(px * 0.01)))
        for _ in range(int(width_m * height_m * 4)):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, c, int(px * rng.uniform(0.03, 0.12)), colours[int(rng.integers(1, 6))].tolist(), -1)
        img += (10.0 * fine)[:, :, None]  # texture inside the flat shapes too
    return np.clip(img * shade, 0.0, 255.0).astype(np.float32)


class DemoScene:
    """The room, its obstacles and their textures; ``render`` gives colour and depth for a pose."""

    def __init__(self, seed: int = 0, texels_per_m: float = 200.0):
        self.seed = int(seed)
        self.texels_per_m = float(texels_per_m)
        self.room = ROOM
        self.obstacles = OBSTACLES
        rng = np.random.default_rng(self.seed)
        light = np.array([0.3, 0.5, 0.8])
        light /= np.linalg.norm(light)
        self.faces: list[_Face] = []
        # Room faces seen from inside (id 2k + side), then each obstacle's faces seen from outside.
        for box, inside in [(self.room, True)] + [(b, False) for b in self.obstacles]:
            for axis in range(3):
                for side in range(2):
                    u_axis, v_axis = [a for a in range(3) if a != axis]
                    if axis != 2:
                        # walls: u horizontal, v = z
                        u_axis, v_axis = (1 - axis if axis < 2 else 0), 2
                    value = box.hi[axis] if side else box.lo[axis]
                    normal = np.zeros(3)
                    normal[axis] = (-1.0 if side else 1.0) if inside else (1.0 if side else -1.0)
                    shade = 0.7 + 0.3 * abs(float(normal @ light))
                    if inside:
                        style = "floor" if (axis == 2 and side == 0) else "ceiling" if axis == 2 else "wall"
                    else:
                        style = "box"
                    size_u = box.hi[u_axis] - box.lo[u_axis]
                    size_v = box.hi[v_axis] - box.lo[v_axis]
                    texture = _make_texture(rng, size_u, size_v, self.texels_per_m, style, shade)
                    self.faces.append(_Face(axis, value, u_axis, v_axis, box.lo[u_axis], box.lo[v_axis], texture))

    def inside_free_space(self, point: np.ndarray, margin: float = 0.05) -> bool:
        p = np.asarray(point, dtype=np.float64)
        lo, hi = np.array(self.room.lo), np.array(self.room.hi)
        if np.any(p < lo + margin) or np.any(p > hi - margin):
            return False
        return not any(np.all(p > np.array(b.lo) - margin) and np.all(p < np.array(b.hi) + margin) for b in self.obstacles)

    @staticmethod
    def _candidate_pixels(box: Box, T_world_cam: np.ndarray, camera: CameraIntrinsics) -> np.ndarray | None:
        """Flat indices of the pixels inside the box's projected bounding rectangle (a cheap
        cull before the exact test); None when a corner is behind the camera (test all)."""
        corners = np.array([[x, y, z] for x in (box.lo[0], box.hi[0]) for y in (box.lo[1], box.hi[1]) for z in (box.lo[2], box.hi[2])])
        pc = (corners - T_world_cam[:3, 3]) @ T_world_cam[:3, :3]
        if np.any(pc[:, 2] < 0.05):
            return None
        us = camera.fx * pc[:, 0] / pc[:, 2] + camera.cx
        vs = camera.fy * pc[:, 1] / pc[:, 2] + camera.cy
        u0, u1 = max(0, int(np.floor(us.min())) - 1), min(camera.width, int(np.ceil(us.max())) + 2)
        v0, v1 = max(0, int(np.floor(vs.min())) - 1), min(camera.height, int(np.ceil(vs.max())) + 2)
        if u0 >= u1 or v0 >= v1:
            return np.zeros(0, np.int64)
        rows, cols = np.mgrid[v0:v1, u0:u1]
        return (rows * camera.width + cols).ravel()

    def render(self, T_world_cam: np.ndarray, camera: CameraIntrinsics = DEMO_CAMERA) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 HxWx3, z-depth float32 HxW in metres) of the scene seen from ``T_world_cam``."""
        import cv2

        T = np.asarray(T_world_cam, dtype=np.float64)
        origin = T[:3, 3]
        if not self.inside_free_space(origin, margin=0.0):
            raise ValueError(f"camera at {origin} is not inside the free space of the demo room")
        h, w = camera.height, camera.width
        R = T[:3, :3]
        v, u = np.mgrid[0:h, 0:w].astype(np.float32)
        # Rays with unit z in the camera: the ray parameter at a hit is the z-depth.
        xc = ((u - camera.cx) / camera.fx).ravel()
        yc = ((v - camera.cy) / camera.fy).ravel()
        d = [(R[k, 0] * xc + R[k, 1] * yc + R[k, 2]).astype(np.float32) for k in range(3)]
        for k in range(3):  # no exact zeros: keeps 1/d finite and the slab tests free of NaN
            d[k][d[k] == 0] = 1e-12
        inv = [1.0 / dk for dk in d]
        # Exit through the room: per axis, the wall ahead along that axis.
        best_t = np.full(h * w, np.inf, np.float32)
        best_face = np.zeros(h * w, np.int64)
        for k in range(3):
            forward = d[k] > 0
            t_k = np.where(forward, (self.room.hi[k] - origin[k]) * inv[k], (self.room.lo[k] - origin[k]) * inv[k])
            closer = t_k < best_t
            best_t = np.where(closer, t_k, best_t)
            best_face = np.where(closer, 2 * k + forward, best_face)
        for b, box in enumerate(self.obstacles):
            idx = self._candidate_pixels(box, T, camera)
            if idx is not None and idx.size == 0:
                continue
            sub = (lambda a: a) if idx is None else (lambda a: a[idx])
            t_near = np.full(h * w if idx is None else idx.size, -np.inf, np.float32)
            t_far = np.full_like(t_near, np.inf)
            near_face = np.zeros(t_near.shape, np.int64)
            for k in range(3):
                ik = sub(inv[k])
                t1 = (box.lo[k] - origin[k]) * ik
                t2 = (box.hi[k] - origin[k]) * ik
                entering_hi = ik < 0  # moving towards -k: the ray enters through the hi face
                t_in = np.where(entering_hi, t2, t1)
                t_out = np.where(entering_hi, t1, t2)
                later = t_in > t_near
                t_near = np.where(later, t_in, t_near)
                near_face = np.where(later, 2 * k + entering_hi, near_face)
                t_far = np.minimum(t_far, t_out)
            current = sub(best_t)
            hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < current)
            if np.any(hit):
                face = np.where(hit, 6 + 6 * b + near_face, sub(best_face))
                nearest = np.where(hit, t_near, current)
                if idx is None:
                    best_t, best_face = nearest, face
                else:
                    best_t[idx], best_face[idx] = nearest, face
        points = [origin[k] + d[k] * best_t for k in range(3)]
        colour = np.zeros((h * w, 3), np.float32)
        order = np.argsort(best_face, kind="stable")
        face_ids, starts = np.unique(best_face[order], return_index=True)
        for face_id, sel in zip(face_ids, np.split(order, starts[1:])):
            face = self.faces[int(face_id)]
            tu = (points[face.u_axis][sel] - face.u0) * self.texels_per_m
            tv = (points[face.v_axis][sel] - face.v0) * self.texels_per_m
            # remap wants a 2D map under 32767 per side: lay the selected pixels out in rows of 256.
            n = len(sel)
            rows = -(-n // 256)
            map_u = np.zeros(rows * 256, np.float32)
            map_v = np.zeros(rows * 256, np.float32)
            map_u[:n], map_v[:n] = tu, tv
            sampled = cv2.remap(face.texture, map_u.reshape(rows, 256), map_v.reshape(rows, 256), cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
            colour[sel] = sampled.reshape(-1, 3)[:n]
        rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8).reshape(h, w, 3)
        return rgb, best_t.reshape(h, w).astype(np.float32)


@functools.lru_cache(maxsize=2)
def cached_scene(seed: int = 0) -> DemoScene:
    """The scene for a seed, built once per process (textures take a second or two)."""
    return DemoScene(seed)


# --- the trajectory ---------------------------------------------------------------------------

def base_pose_at(time_s: float) -> np.ndarray:
    """``T_map_base`` of the rig at ``time_s`` seconds into the recording (smooth, periodic).

    The base drives an ellipse around the pillar, heading along the path with a slow yaw
    sway so the camera looks at walls, corners and obstacles, and bobs and tilts a little
    so that every rotation axis and height changes (as a hand-held or legged rig would).
    """
    theta = 2.0 * math.pi * time_s / TRAJECTORY_PERIOD_S
    x, y = 1.5 * math.cos(theta), 1.0 * math.sin(theta)
    z = 0.05 * math.sin(3.0 * theta)
    heading = math.atan2(1.0 * math.cos(theta), -1.5 * math.sin(theta))  # direction of travel
    yaw = heading + 0.9 * math.sin(theta) + 0.35
    roll = 0.03 * math.sin(5.0 * theta)
    pitch = 0.05 * math.sin(4.0 * theta)
    R = matrix_from_rotvec(np.array([0.0, 0.0, yaw])) @ matrix_from_rotvec(np.array([0.0, pitch, 0.0])) @ matrix_from_rotvec(np.array([roll, 0.0, 0.0]))
    return make_pose(R, [x, y, z])


def base_to_camera() -> np.ndarray:
    """``T_base_cam``: the camera 1.2 m up, 0.1 m forward, tilted 12 degrees down, optical axes."""
    tilt = matrix_from_rotvec(np.array([0.0, math.radians(12.0), 0.0]))  # +pitch about y: nose down
    return make_pose(tilt @ R_BODY_OPTICAL, [0.1, 0.0, 1.2])


# --- bag writing ------------------------------------------------------------------------------

class BagWriter:
    """A ``rosbags`` writer for ROS 2 (mcap, sqlite3) or ROS 1 bags with message builders.

    Hides the differences between the two ROS versions (ROS 1 headers carry ``seq``,
    ROS 1 CameraInfo spells ``D K R P``). Used by the demo and by tests that need bags with
    particular defects.
    """

    def __init__(self, path: str | Path, storage: str = "mcap"):
        from rosbags.typesys import Stores, get_typestore

        if storage not in ("mcap", "sqlite3", "ros1"):
            raise ValueError(f"storage must be mcap, sqlite3 or ros1, got {storage!r}")
        self.path = Path(path)
        self.storage = storage
        self.ros1 = storage == "ros1"
        self.typestore = get_typestore(Stores.ROS1_NOETIC if self.ros1 else Stores.ROS2_KILTED)
        if "tf2_msgs/msg/TFMessage" not in self.typestore.types:
            # rosbags' ROS 1 store lacks tf2_msgs; its definition is one line.
            from rosbags.typesys import get_types_from_msg

            self.typestore.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", "tf2_msgs/msg/TFMessage"))
        self._connections: dict[str, Any] = {}
        self._seq = 0
        if self.ros1:
            from rosbags.rosbag1 import Writer as Writer1

            if self.path.suffix != ".bag":
                raise ValueError(f"a ROS 1 bag must be a .bag file, got {self.path}")
            self._writer = Writer1(self.path)
        else:
            from rosbags.rosbag2 import StoragePlugin, Writer as Writer2

            plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
            self._writer = Writer2(self.path, version=9, storage_plugin=plugin)

    def __enter__(self) -> "BagWriter":
        self._writer.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.close()

    def types(self, name: str) -> Any:
        return self.typestore.types[name]

    def write(self, topic: str, msg: Any, bag_stamp_ns: int) -> None:
        msgtype = msg.__msgtype__
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
            self._connections[topic] = conn
        data = self.typestore.serialize_ros1(msg, msgtype) if self.ros1 else self.typestore.serialize_cdr(msg, msgtype)
        self._writer.write(conn, int(bag_stamp_ns), data)

    # --- message builders ---
    def header(self, stamp_ns: int, frame_id: str) -> Any:
        Time = self.types("builtin_interfaces/msg/Time")
        Header = self.types("std_msgs/msg/Header")
        sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
        if self.ros1:
            self._seq += 1
            return Header(seq=self._seq, stamp=Time(sec=sec, nanosec=nsec), frame_id=frame_id)
        return Header(stamp=Time(sec=sec, nanosec=nsec), frame_id=frame_id)

    def image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray, encoding: str = "rgb8") -> Any:
        import cv2

        if encoding == "rgb8":
            pixels = rgb
        elif encoding == "bgr8":
            pixels = rgb[:, :, ::-1]
        elif encoding == "mono8":
            pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
        elif encoding == "mono16":
            grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
            pixels = grey.astype(np.uint16) * 257
        else:
            raise ValueError(f"unsupported encoding {encoding!r}")
        pixels = np.ascontiguousarray(pixels)
        h, w = pixels.shape[:2]
        data = pixels.astype(pixels.dtype.newbyteorder("<")).view(np.uint8).reshape(-1)
        return self.types("sensor_msgs/msg/Image")(
            header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding, is_bigendian=0,
            step=data.size // h, data=data,
        )

    def compressed_image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> Any:
        import cv2

        ext = ".jpg" if fmt == "jpeg" else ".png"
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
        ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise RuntimeError("image encoding failed")
        return self.types("sensor_msgs/msg/CompressedImage")(
            header=self.header(stamp_ns, frame_id), format=f"rgb8; {fmt} compressed bgr8", data=buf.reshape(-1),
        )

    def camera_info(self, stamp_ns: int, frame_id: str, camera: CameraIntrinsics) -> Any:
        RegionOfInterest = self.types("sensor_msgs/msg/RegionOfInterest")
        K = np.array([camera.fx, 0, camera.cx, 0, camera.fy, camera.cy, 0, 0, 1], np.float64)
        R = np.eye(3).reshape(-1)
        P = np.array([camera.fx, 0, camera.cx, 0, 0, camera.fy, camera.cy, 0, 0, 0, 1, 0], np.float64)
        D = np.array(camera.distortion, np.float64)
        model = camera.distortion_model if camera.distortion_model != "none" else "plumb_bob"
        if camera.distortion_model == "none":
            D = np.zeros(5)
        roi = RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        fields = dict(header=self.header(stamp_ns, frame_id), height=camera.height, width=camera.width,
                      distortion_model=model, binning_x=0, binning_y=0, roi=roi)
        if self.ros1:
            fields.update(D=D, K=K, R=R, P=P)
        else:
            fields.update(d=D, k=K, r=R, p=P)
        return self.types("sensor_msgs/msg/CameraInfo")(**fields)

    def _vec(self, name: str, xyz: np.ndarray) -> Any:
        return self.types(name)(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))

    def _quat(self, R: np.ndarray) -> Any:
        w, x, y, z = quat_wxyz_from_matrix(R)
        return self.types("geometry_msgs/msg/Quaternion")(x=float(x), y=float(y), z=float(z), w=float(w))

    def pose(self, T: np.ndarray) -> Any:
        return self.types("geometry_msgs/msg/Pose")(position=self._vec("geometry_msgs/msg/Point", T[:3, 3]), orientation=self._quat(T[:3, :3]))

    def transform_stamped(self, stamp_ns: int, parent: str, child: str, T_parent_child: np.ndarray) -> Any:
        transform = self.types("geometry_msgs/msg/Transform")(
            translation=self._vec("geometry_msgs/msg/Vector3", T_parent_child[:3, 3]), rotation=self._quat(T_parent_child[:3, :3]))
        return self.types("geometry_msgs/msg/TransformStamped")(header=self.header(stamp_ns, parent), child_frame_id=child, transform=transform)

    def tf_message(self, transforms: list[Any]) -> Any:
        return self.types("tf2_msgs/msg/TFMessage")(transforms=transforms)

    def pose_message(self, msgtype: str, stamp_ns: int, frame_id: str, child_frame_id: str, T: np.ndarray) -> Any:
        """A pose of ``T`` as PoseStamped, PoseWithCovarianceStamped, Odometry or TransformStamped."""
        header = self.header(stamp_ns, frame_id)
        if msgtype == "PoseStamped":
            return self.types("geometry_msgs/msg/PoseStamped")(header=header, pose=self.pose(T))
        if msgtype == "PoseWithCovarianceStamped":
            pwc = self.types("geometry_msgs/msg/PoseWithCovariance")(pose=self.pose(T), covariance=np.eye(6).reshape(-1) * 1e-4)
            return self.types("geometry_msgs/msg/PoseWithCovarianceStamped")(header=header, pose=pwc)
        if msgtype == "Odometry":
            pwc = self.types("geometry_msgs/msg/PoseWithCovariance")(pose=self.pose(T), covariance=np.eye(6).reshape(-1) * 1e-4)
            zero = self._vec("geometry_msgs/msg/Vector3", np.zeros(3))
            twist = self.types("geometry_msgs/msg/Twist")(linear=zero, angular=zero)
            twc = self.types("geometry_msgs/msg/TwistWithCovariance")(twist=twist, covariance=np.zeros(36))
            return self.types("nav_msgs/msg/Odometry")(header=header, child_frame_id=child_frame_id, pose=pwc, twist=twc)
        if msgtype == "TransformStamped":
            return self.transform_stamped(stamp_ns, frame_id, child_frame_id, T)
        raise ValueError(f"unsupported pose message type {msgtype!r}")


@dataclass
class DemoGroundTruth:
    """What a demo bag was made from: per image, its stamp, exact camera pose, colour and depth."""

    camera: CameraIntrinsics
    stamps_ns: list[int]
    T_world_cam: list[np.ndarray]
    T_map_base: list[np.ndarray]
    T_base_cam: np.ndarray
    images: list[np.ndarray]
    depths: list[np.ndarray]
    image_topic: str
    camera_info_topic: str | None
    pose_topic: str | None
    map_frame: str = "map"
    base_frame: str = "base_link"
    camera_frame: str = "camera_optical"
    metadata: dict[str, Any] = field(default_factory=dict)


def image_stamps(n_frames: int) -> list[int]:
    """Image stamps spread evenly over one loop, offset from the pose samples on purpose
    (so poses have to be interpolated, not just looked up)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    step_ns = int(TRAJECTORY_PERIOD_S * 1e9) // n_frames
    return [START_NS + 50_000_000 + i * step_ns + 3_333_333 for i in range(n_frames)]


def render_demo_frames(n_frames: int, seed: int = 0, camera: CameraIntrinsics = DEMO_CAMERA, scene: DemoScene | None = None):
    """(scene, stamps, T_map_base list, T_base_cam, T_world_cam list, images, depths) for one loop."""
    scene = scene if scene is not None else cached_scene(seed)
    stamps = image_stamps(n_frames)
    T_base_cam = base_to_camera()
    bases = [base_pose_at((s - START_NS) / 1e9) for s in stamps]
    cams = [Tb @ T_base_cam for Tb in bases]
    rendered = [scene.render(T, camera) for T in cams]
    return scene, stamps, bases, T_base_cam, cams, [r[0] for r in rendered], [r[1] for r in rendered]


def write_demo_bag(
    out_path: str | Path,
    n_frames: int = 100,
    storage: str = "mcap",
    compressed: bool = False,
    pose_source: str = "tf",
    seed: int = 0,
    *,
    pose_msgtype: str = "PoseStamped",
    encoding: str = "rgb8",
    with_camera_info: bool = True,
    camera: CameraIntrinsics = DEMO_CAMERA,
) -> DemoGroundTruth:
    """Record the demo room as a real bag at ``out_path`` and return the ground truth.

    ``storage``: ``mcap`` or ``sqlite3`` (a ROS 2 bag folder) or ``ros1`` (a ``.bag`` file).
    ``pose_source``: ``tf`` (``/tf`` map->base_link at 100 Hz, ``/tf_static``
    base_link->camera_optical) or ``topic`` (``/robot_pose`` of type ``pose_msgtype`` giving
    the BASE pose in ``map`` at 100 Hz; the camera extrinsic is ``gt.T_base_cam``) or ``none``
    (images and CameraInfo only, for structure-from-motion; the truth is still returned).
    Images are stamped between pose samples, so a reader must interpolate.
    """
    if pose_source not in ("tf", "topic", "none"):
        raise ValueError(f"pose_source must be tf, topic or none, got {pose_source!r}")
    out_path = Path(out_path)
    if out_path.exists():
        raise ValueError(f"{out_path} exists already; the demo bag is written to a new path")
    _, stamps, bases, T_base_cam, cams, images, depths = render_demo_frames(n_frames, seed, camera)
    image_topic = "/camera/image_raw/compressed" if compressed else "/camera/image_raw"
    info_topic = "/camera/camera_info" if with_camera_info else None
    pose_topic = "/robot_pose" if pose_source == "topic" else None
    gt = DemoGroundTruth(camera=camera, stamps_ns=stamps, T_world_cam=cams, T_map_base=bases, T_base_cam=T_base_cam,
                         images=images, depths=depths, image_topic=image_topic, camera_info_topic=info_topic,
                         pose_topic=pose_topic, metadata={"seed": seed, "storage": storage, "pose_source": pose_source})

    # Pose samples at 100 Hz from before the first image to after the last one.
    tf_step = int(1e9 / TF_RATE_HZ)
    pose_stamps = list(range(START_NS, stamps[-1] + 2 * tf_step, tf_step))
    events: list[tuple[int, int, Any]] = []  # (bag time, order, builder) merged by time
    with BagWriter(out_path, storage) as bag:
        if pose_source == "tf":
            static = bag.transform_stamped(START_NS, gt.base_frame, gt.camera_frame, T_base_cam)
            events.append((START_NS, 0, ("/tf_static", lambda: bag.tf_message([static]))))
            for s in pose_stamps:
                T = base_pose_at((s - START_NS) / 1e9)
                events.append((s, 1, ("/tf", lambda s=s, T=T: bag.tf_message([bag.transform_stamped(s, gt.map_frame, gt.base_frame, T)]))))
        elif pose_source == "topic":
            for s in pose_stamps:
                T = base_pose_at((s - START_NS) / 1e9)
                events.append((s, 1, (pose_topic, lambda s=s, T=T: bag.pose_message(pose_msgtype, s, gt.map_frame, gt.base_frame, T))))
        for i, s in enumerate(stamps):
            if compressed:
                build = lambda s=s, im=images[i]: bag.compressed_image(s, gt.camera_frame, im)
            else:
                build = lambda s=s, im=images[i]: bag.image(s, gt.camera_frame, im, encoding)
            # Images reach the recorder a little after capture, as on a robot.
            events.append((s + 2_000_000, 2, (image_topic, build)))
            if info_topic:
                events.append((s + 2_000_000, 3, (info_topic, lambda s=s: bag.camera_info(s, gt.camera_frame, camera))))
        for bag_ns, _, (topic, build) in sorted(events, key=lambda e: (e[0], e[1])):
            bag.write(topic, build(), bag_ns)
    return gt


__all__ = [
    "DEMO_CAMERA", "DemoScene", "BagWriter", "DemoGroundTruth", "base_pose_at", "base_to_camera",
    "image_stamps", "render_demo_frames", "write_demo_bag",
]
