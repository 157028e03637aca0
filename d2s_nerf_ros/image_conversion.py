"""ROS ``sensor_msgs/Image`` and ``CompressedImage`` -> numpy, without depending on cv_bridge.

The PyPI ``cv-bridge`` is an unmaintained port that breaks on current numpy/OpenCV and on
16-bit images, so the conversion here is plain numpy (raw images) and ``cv2.imdecode``
(compressed ones). On a ROS install whose cv_bridge imports *and* passes a small
self-test, raw images go through cv_bridge instead (``converter_backend()`` says which).

Output conventions (docs/ARCHITECTURE.md): colour images are RGB ``HxWx3``, grey images
``HxW``; ``uint8`` for 8-bit encodings, ``uint16`` for ``mono16`` (``to_uint8`` maps those
to the ``uint8`` the feature extractors take). The arrays returned never alias the message
buffer, so a message can be released while its image is still in use.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np


class ImageConversionError(ValueError):
    """The message does not hold a usable image (size mismatch, undecodable bytes, ...)."""


class UnsupportedEncoding(ImageConversionError):
    """The image uses an encoding this package does not convert."""


# encoding -> (channels, numpy dtype of one channel, how to reach RGB/grey)
_RAW_ENCODINGS: dict[str, tuple[int, np.dtype, str]] = {
    "mono8": (1, np.dtype(np.uint8), "grey"),
    "mono16": (1, np.dtype(np.uint16), "grey"),
    "rgb8": (3, np.dtype(np.uint8), "rgb"),
    "bgr8": (3, np.dtype(np.uint8), "bgr"),
    "rgba8": (4, np.dtype(np.uint8), "rgba"),
    "bgra8": (4, np.dtype(np.uint8), "bgra"),
}
SUPPORTED_ENCODINGS = tuple(_RAW_ENCODINGS)


def _raw_image_from_buffer(data: Any, height: int, width: int, step: int, encoding: str, is_bigendian: bool) -> np.ndarray:
    """The pixel array of a raw image as the message lays it out (channel order untouched)."""
    if encoding not in _RAW_ENCODINGS:
        raise UnsupportedEncoding(
            f"image encoding {encoding!r} is not supported (supported: {', '.join(SUPPORTED_ENCODINGS)})"
        )
    channels, dtype, _ = _RAW_ENCODINGS[encoding]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image has no pixels: {width}x{height}")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"image step {step} is smaller than one row of {width} {encoding} pixels ({row_bytes} bytes)"
        )
    buffer = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if buffer.size != height * step:
        raise ImageConversionError(
            f"image data has {buffer.size} bytes, expected height*step = {height}*{step} = {height * step} "
            f"for a {width}x{height} {encoding} image"
        )
    # Rows may be padded (step > row_bytes): view the rows, drop the padding, then copy once.
    rows = buffer.reshape(height, step)[:, :row_bytes]
    pixel_dtype = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    # One copy, so the result never aliases the message buffer; then native byte order.
    image = np.array(rows, copy=True).view(pixel_dtype).reshape(height, width, channels)
    image = image.astype(dtype, copy=False)
    return image[:, :, 0] if channels == 1 else image


def _to_rgb_or_grey(image: np.ndarray, layout: str) -> np.ndarray:
    if layout == "grey" or layout == "rgb":
        return image
    if layout == "bgr":
        return np.ascontiguousarray(image[:, :, ::-1])
    if layout == "rgba":
        return np.ascontiguousarray(image[:, :, :3])
    if layout == "bgra":
        return np.ascontiguousarray(image[:, :, 2::-1])
    raise AssertionError(layout)


def image_msg_to_numpy(msg: Any, *, backend: str = "auto") -> np.ndarray:
    """A ``sensor_msgs/Image`` as an RGB ``HxWx3`` or grey ``HxW`` array (``uint8``; ``uint16`` for mono16).

    ``backend``: ``"numpy"`` (the converter in this module), ``"cv_bridge"`` (ROS's, must be
    usable) or ``"auto"`` (cv_bridge when ``converter_backend()`` says it works, else numpy).
    Raises ``UnsupportedEncoding`` or ``ImageConversionError`` with what is wrong.
    """
    encoding = str(msg.encoding).strip().lower()
    # Validate first with our own checks, so both backends reject the same messages the same way.
    image = _raw_image_from_buffer(msg.data, msg.height, msg.width, msg.step, encoding, bool(msg.is_bigendian))
    if backend not in ("auto", "numpy", "cv_bridge"):
        raise ValueError(f"backend must be auto, numpy or cv_bridge, got {backend!r}")
    if backend == "cv_bridge" or (backend == "auto" and converter_backend() == "cv_bridge"):
        bridge = _working_cv_bridge()
        if bridge is None:
            raise ImageConversionError("cv_bridge was requested but is not usable here")
        image = np.array(bridge.imgmsg_to_cv2(msg, desired_encoding="passthrough"), copy=True)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
    return _to_rgb_or_grey(image, _RAW_ENCODINGS[encoding][2])


def compressed_msg_to_numpy(msg: Any) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (jpeg/png/...) as RGB ``HxWx3`` or grey ``HxW``.

    ``compressedDepth`` (the depth-image transport with its own header) is not supported.
    """
    import cv2

    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise UnsupportedEncoding(f"compressed format {msg.format!r} (compressedDepth) is not supported")
    data = np.frombuffer(memoryview(msg.data).cast("B"), dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError("compressed image has no data")
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(
            f"compressed image ({data.size} bytes, format {msg.format!r}) could not be decoded as an image"
        )
    if decoded.ndim == 2:
        return decoded
    if decoded.shape[2] == 1:
        return decoded[:, :, 0]
    if decoded.shape[2] == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    raise ImageConversionError(f"decoded image has an unexpected shape {decoded.shape}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as ``uint8`` for the feature extractors.

    16-bit images (often 10- or 12-bit sensors in a 16-bit container) are stretched
    linearly by their own maximum, so a dim 12-bit image does not become almost black.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        peak = int(image.max()) if image.size else 0
        if peak == 0:
            return np.zeros(image.shape, dtype=np.uint8)
        return np.clip(np.rint(image.astype(np.float32) * (255.0 / peak)), 0, 255).astype(np.uint8)
    raise ImageConversionError(f"cannot convert a {image.dtype} image to uint8")


def numpy_to_image_fields(image: np.ndarray, encoding: str) -> dict[str, Any]:
    """Fields of a ``sensor_msgs/Image`` holding ``image`` (no padding, little-endian).

    ``encoding`` says how ``image`` is laid out (``rgb8`` arrays are RGB, ``bgr8`` arrays BGR).
    Used by the replay tool and the tests to build messages.
    """
    if encoding not in _RAW_ENCODINGS:
        raise UnsupportedEncoding(f"image encoding {encoding!r} is not supported")
    channels, dtype, _ = _RAW_ENCODINGS[encoding]
    image = np.asarray(image)
    expected_ndim = 2 if channels == 1 else 3
    if image.dtype != dtype or image.ndim != expected_ndim or (channels > 1 and image.shape[2] != channels):
        raise ImageConversionError(
            f"a {encoding} image must be a {dtype} array with {channels} channel(s), got {image.dtype} {image.shape}"
        )
    little = np.ascontiguousarray(image.astype(dtype.newbyteorder("<"), copy=False))
    height, width = image.shape[:2]
    return {
        "height": int(height), "width": int(width), "encoding": encoding, "is_bigendian": 0,
        "step": int(width * channels * dtype.itemsize), "data": little.tobytes(),
    }


@functools.lru_cache(maxsize=1)
def _working_cv_bridge() -> Any | None:
    """ROS's CvBridge when it imports and converts a few test images exactly like this module; else None."""
    try:
        from cv_bridge import CvBridge  # type: ignore[import-not-found]
        from sensor_msgs.msg import Image

        bridge = CvBridge()
        rng = np.random.default_rng(0)
        probes = {
            "mono8": rng.integers(0, 256, (3, 5), dtype=np.uint8),
            "mono16": rng.integers(0, 65536, (3, 5), dtype=np.uint16),
            "rgb8": rng.integers(0, 256, (3, 5, 3), dtype=np.uint8),
        }
        for encoding, expected in probes.items():
            msg = Image(**numpy_to_image_fields(expected, encoding))
            got = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="passthrough"))
            if got.ndim == 3 and got.shape[2] == 1:
                got = got[:, :, 0]
            if got.dtype != expected.dtype or not np.array_equal(got, expected):
                print(f"d2s_nerf_ros: cv_bridge is installed but converts {encoding} wrongly; not used", file=sys.stderr)
                return None
        return bridge
    except ImportError:
        return None  # the normal case in a pip environment
    except Exception as exc:  # installed but broken (numpy ABI, 16-bit bugs, ...): say so once, do not use it
        print(f"d2s_nerf_ros: cv_bridge is installed but not used ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def converter_backend() -> str:
    """``"cv_bridge"`` when ROS's cv_bridge is installed and passes the self-test, else ``"numpy"``."""
    return "cv_bridge" if _working_cv_bridge() is not None else "numpy"
