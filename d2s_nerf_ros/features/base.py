"""The one interface every local feature (ALIKED, XFeat, SuperPoint, SIFT) sits behind.

An extractor takes a uint8 image (RGB ``HxWx3`` or grey ``HxW``) and returns ``Features``:
keypoints in the pixels of the image it was given (OpenCV convention, pixel centres at
integer coordinates), L2-normalised descriptors and detection scores, sorted by score
(best first). ``resize_max`` lets the network see a smaller image than it was given; the
keypoints are mapped back so that callers never see the network's resolution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from d2s_nerf_ros.device import resolve_device
from d2s_nerf_ros.features.onnx_runtime import resolve_backend


@dataclass
class Features:
    keypoints: np.ndarray  # (N, 2) float32, pixels of the image given to extract()
    descriptors: np.ndarray  # (N, D) float32, L2-normalised rows
    scores: np.ndarray  # (N,) float32
    image_size: tuple[int, int]  # (width, height) of the image given to extract()

    def __post_init__(self) -> None:
        self.keypoints = np.ascontiguousarray(self.keypoints, dtype=np.float32)
        self.descriptors = np.ascontiguousarray(self.descriptors, dtype=np.float32)
        self.scores = np.ascontiguousarray(self.scores, dtype=np.float32)
        if self.keypoints.ndim != 2 or self.keypoints.shape[1] != 2:
            raise ValueError(f"keypoints must have shape (N, 2), got {self.keypoints.shape}")
        n = self.keypoints.shape[0]
        if self.descriptors.ndim != 2 or self.descriptors.shape[0] != n:
            raise ValueError(f"descriptors must have shape ({n}, D) to match {n} keypoints, got {self.descriptors.shape}")
        if self.scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},) to match {n} keypoints, got {self.scores.shape}")
        if len(self.image_size) != 2 or int(self.image_size[0]) <= 0 or int(self.image_size[1]) <= 0:
            raise ValueError(f"image_size must be (width, height) with positive values, got {self.image_size}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def descriptor_dim(self) -> int:
        return int(self.descriptors.shape[1])

    def subset(self, indices: np.ndarray | Sequence[int]) -> "Features":
        """The features at ``indices`` (an index array or a boolean mask), same image."""
        indices = np.asarray(indices)
        return Features(self.keypoints[indices], self.descriptors[indices], self.scores[indices], self.image_size)


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as a contiguous uint8 array, or a ValueError that says what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be RGB HxWx3 or grey HxW, got shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image is too small for feature extraction: {image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(image)


def to_grey(image: np.ndarray) -> np.ndarray:
    import cv2

    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def to_rgb(image: np.ndarray) -> np.ndarray:
    import cv2

    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


def network_size(width: int, height: int, resize_max: int | None) -> tuple[int, int]:
    """(width, height) the network sees: the longer side brought to ``resize_max``."""
    if resize_max is None:
        return width, height
    scale = resize_max / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    width, height = size
    if (image.shape[1], image.shape[0]) == (width, height):
        return image
    # Area averaging when shrinking avoids aliasing that would create spurious detections.
    shrinking = width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def keypoints_to_original(keypoints: np.ndarray, network_wh: tuple[int, int], original_wh: tuple[int, int]) -> np.ndarray:
    """Map keypoints from the network image's pixels to the original image's pixels.

    With pixel centres at integers, pixel edges sit at -0.5, so a resize by ``s`` maps
    ``x`` to ``(x + 0.5) * s - 0.5``, not ``x * s``.
    """
    if network_wh == original_wh:
        return keypoints
    scale = np.array([original_wh[0] / network_wh[0], original_wh[1] / network_wh[1]], dtype=np.float64)
    return ((keypoints.astype(np.float64) + 0.5) * scale - 0.5).astype(np.float32)


def sort_by_score(keypoints: np.ndarray, descriptors: np.ndarray, scores: np.ndarray, limit: int):
    """Best first, at most ``limit``; a stable sort keeps results deterministic on ties."""
    order = np.argsort(-scores, kind="stable")[:limit]
    return keypoints[order], descriptors[order], scores[order]


class LocalFeatureExtractor(ABC):
    """Base class: subclasses implement ``_extract_network_batch`` on same-size images."""

    name: str = ""
    descriptor_dim: int = 0
    has_onnxruntime_backend: bool = False  # True where the network has an ONNX Runtime path

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 batch_size: int = 8, backend: str = "auto", num_threads: int = 0) -> None:
        if isinstance(max_keypoints, bool) or not isinstance(max_keypoints, (int, np.integer)) or max_keypoints <= 0:
            raise ValueError(f"max_keypoints must be a positive integer, got {max_keypoints!r}")
        if resize_max is not None and (isinstance(resize_max, bool) or not isinstance(resize_max, (int, np.integer))
                                       or resize_max < 16):
            raise ValueError(f"resize_max must be None or an integer >= 16, got {resize_max!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_keypoints = int(max_keypoints)
        self.resize_max = None if resize_max is None else int(resize_max)
        self.batch_size = int(batch_size)
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0 (0: the library default), got {num_threads!r}")
        self.device_name = device
        self.device: torch.device = resolve_device(device)
        # How the network runs, not what it computes: deliberately absent from config().
        self.backend = resolve_backend(backend, self.device, self.has_onnxruntime_backend, self.name)
        self.num_threads = int(num_threads)

    # -- subclass hooks ---------------------------------------------------------------
    @abstractmethod
    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Same-size uint8 images at network resolution -> per image (keypoints, descriptors, scores).

        Keypoints in the network image's pixels; any order (the base class sorts and caps).
        """

    def _options(self) -> dict[str, Any]:
        """Constructor options beyond max_keypoints / resize_max, for ``config()``."""
        return {}

    # -- public API -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable; ``extractor_from_config`` rebuilds an equivalent extractor."""
        return {"name": self.name, "max_keypoints": self.max_keypoints, "resize_max": self.resize_max,
                **self._options()}

    def extract(self, image: np.ndarray) -> Features:
        return self.extract_batch([image])[0]

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[Features]:
        """Extract from several images; same-size images share network passes."""
        checked = [check_image(image) for image in images]
        results: list[Features | None] = [None] * len(checked)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(checked):
            groups.setdefault((image.shape[1], image.shape[0]), []).append(index)
        for original_wh, indices in groups.items():
            net_wh = network_size(*original_wh, self.resize_max)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                net_images = [resize_image(checked[i], net_wh) for i in chunk]
                outputs = self._extract_network_batch(net_images)
                for i, (keypoints, descriptors, scores) in zip(chunk, outputs):
                    keypoints, descriptors, scores = sort_by_score(
                        np.asarray(keypoints, dtype=np.float32), np.asarray(descriptors, dtype=np.float32),
                        np.asarray(scores, dtype=np.float32), self.max_keypoints)
                    keypoints = keypoints_to_original(keypoints, net_wh, original_wh)
                    results[i] = Features(keypoints.reshape(-1, 2), descriptors.reshape(-1, self.descriptor_dim),
                                          scores, original_wh)
        return results  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()}, device={self.device}, backend={self.backend})"
