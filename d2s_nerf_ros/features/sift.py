"""OpenCV SIFT with RootSIFT descriptors: no weights, the fastest option on a CPU.

Descriptors are RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise the 128-bin
histogram, then take the element-wise square root. The result has unit L2 norm, so it
meets the ``Features`` contract, and the Euclidean distance between RootSIFT vectors is
the Hellinger distance between the histograms, which compares gradient histograms better
than the plain Euclidean distance does (a few large bins no longer dominate). Mutual-NN
matching and a D2S regressor both only see dot products / distances, so they gain it for
free. ``root=False`` gives plain SIFT, L2-normalised.

Scores are the DoG responses; the ``max_keypoints`` strongest are kept. Keypoint positions
are OpenCV's ``KeyPoint.pt`` with ``enable_precise_upscale`` (OpenCV >= 4.8), which puts them
in the pixel-centre convention; the default upscaling would shift them by +0.25 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from d2s_nerf_ros.features.base import LocalFeatureExtractor, to_grey


def root_sift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(N, 128) raw SIFT -> RootSIFT rows with unit L2 norm."""
    descriptors = np.maximum(descriptors.astype(np.float32), 0.0)
    l1 = descriptors.sum(axis=1, keepdims=True)
    rooted = np.sqrt(descriptors / np.maximum(l1, eps))
    # sqrt of an L1-normalised vector already has unit L2 norm; renormalise for rounding and all-zero rows.
    return rooted / np.maximum(np.linalg.norm(rooted, axis=1, keepdims=True), eps)


class SiftExtractor(LocalFeatureExtractor):
    name = "sift"
    descriptor_dim = 128

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 contrast_threshold: float = 0.04, edge_threshold: float = 10.0, n_octave_layers: int = 3,
                 sigma: float = 1.6, root: bool = True, batch_size: int = 8,
                 backend: str = "auto", num_threads: int = 0) -> None:
        # SIFT runs on the CPU in OpenCV; the device is kept for the common interface.
        super().__init__(max_keypoints=max_keypoints, device=device, resize_max=resize_max, batch_size=batch_size,
                         backend=backend, num_threads=num_threads)
        import cv2

        if not contrast_threshold >= 0 or not edge_threshold > 0 or not sigma > 0 or n_octave_layers < 1:
            raise ValueError("SIFT needs contrast_threshold >= 0, edge_threshold > 0, sigma > 0, n_octave_layers >= 1")
        self.contrast_threshold = float(contrast_threshold)
        self.edge_threshold = float(edge_threshold)
        self.n_octave_layers = int(n_octave_layers)
        self.sigma = float(sigma)
        self.root = bool(root)
        # nfeatures=0 keeps all detections: OpenCV's own cap can return a few more than
        # asked (one keypoint per dominant orientation), so we sort and cap ourselves.
        # enable_precise_upscale: without it OpenCV's first (2x upsampled) octave puts every
        # keypoint +0.25 px off the pixel-centre convention (measured on synthetic blobs).
        self._sift = cv2.SIFT_create(nfeatures=0, nOctaveLayers=self.n_octave_layers,
                                     contrastThreshold=self.contrast_threshold,
                                     edgeThreshold=self.edge_threshold, sigma=self.sigma,
                                     enable_precise_upscale=True)

    def _options(self) -> dict[str, Any]:
        return {"contrast_threshold": self.contrast_threshold, "edge_threshold": self.edge_threshold,
                "n_octave_layers": self.n_octave_layers, "sigma": self.sigma, "root": self.root}

    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        outputs = []
        for image in images:
            cv_keypoints, descriptors = self._sift.detectAndCompute(to_grey(image), None)
            if descriptors is None or len(cv_keypoints) == 0:
                outputs.append((np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32)))
                continue
            keypoints = np.array([k.pt for k in cv_keypoints], dtype=np.float32)
            scores = np.array([k.response for k in cv_keypoints], dtype=np.float32)
            if self.root:
                descriptors = root_sift(descriptors)
            else:
                descriptors = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
            outputs.append((keypoints, descriptors.astype(np.float32), scores))
        return outputs
