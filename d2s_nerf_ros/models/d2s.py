"""D2S: keypoint descriptors to 3D scene coordinates plus a reliability score.

The network follows the D2S paper: the descriptors of all keypoints of one image exchange
information through attentional message passing (self-attention), then a per-keypoint
MLP head regresses (x, y, z, u); the reliability of a prediction is r = 1 / (1 + 100 |u|).

Onboard module: it imports only torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RELIABILITY_SHARPNESS = 100.0


def reliability(u: torch.Tensor) -> torch.Tensor:
    """r = 1 / (1 + 100 |u|): 1 for u = 0, falling quickly as |u| grows."""
    return 1.0 / (1.0 + RELIABILITY_SHARPNESS * u.abs())


@dataclass
class D2SConfig:
    descriptor_dim: int
    n_layers: int = 5
    n_heads: int = 4
    head_dims: tuple[int, ...] = field(default=(512, 1024, 1024, 512))

    def __post_init__(self) -> None:
        self.head_dims = tuple(int(d) for d in self.head_dims)
        if self.descriptor_dim <= 0:
            raise ValueError(f"descriptor_dim must be positive, got {self.descriptor_dim}")
        if self.n_heads <= 0 or self.descriptor_dim % self.n_heads != 0:
            raise ValueError(
                f"descriptor_dim ({self.descriptor_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {self.n_layers}")
        if any(d <= 0 for d in self.head_dims):
            raise ValueError(f"head_dims must be positive, got {self.head_dims}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_dims"] = list(self.head_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "D2SConfig":
        known = {"descriptor_dim", "n_layers", "n_heads", "head_dims"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown D2S model config keys: {sorted(unknown)}")
        if "descriptor_dim" not in d:
            raise ValueError("D2S model config lacks descriptor_dim")
        return cls(
            descriptor_dim=int(d["descriptor_dim"]),
            n_layers=int(d.get("n_layers", 5)),
            n_heads=int(d.get("n_heads", 4)),
            head_dims=tuple(int(v) for v in d.get("head_dims", (512, 1024, 1024, 512))),
        )


class SelfAttentionLayer(nn.Module):
    """One attentional message-passing step: x <- x + MLP([x, attention(x)])."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.merge = nn.Linear(dim, dim)
        # MLP sizes [2d, 2d, d]. LayerNorm rather than the BatchNorm of SuperGlue-style
        # code: it normalises each keypoint on its own, so padding never leaks in.
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim, 2 * dim),
            nn.LayerNorm(2 * dim),
            nn.ReLU(inplace=True),
            nn.Linear(2 * dim, dim),
        )
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # key_mask (B, 1, 1, N): True where a key may be attended to.
        message = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        message = self.merge(message.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(torch.cat([x, message], dim=-1))


class D2SNet(nn.Module):
    """(descriptors (B, N, D), mask (B, N) bool) -> (xyz (B, N, 3), u (B, N)).

    ``coordinate_center`` and ``coordinate_scale`` (buffers, saved with the weights) map
    the head's O(1) output to world coordinates, so maps far from the origin or of any
    size train equally well; training sets them from the labels.
    """

    def __init__(self, config: D2SConfig) -> None:
        super().__init__()
        self.config = config
        d = config.descriptor_dim
        self.layers = nn.ModuleList(SelfAttentionLayer(d, config.n_heads) for _ in range(config.n_layers))
        dims = (d, *config.head_dims)
        hidden: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            hidden += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*hidden)
        self.head_out = nn.Linear(dims[-1], 4)
        self.register_buffer("coordinate_center", torch.zeros(3))
        self.register_buffer("coordinate_scale", torch.ones(()))

    @torch.no_grad()
    def set_coordinate_frame(self, center: torch.Tensor, scale: float) -> None:
        if not float(scale) > 0:
            raise ValueError(f"coordinate scale must be positive, got {scale}")
        self.coordinate_center.copy_(torch.as_tensor(center, dtype=torch.float32).reshape(3))
        self.coordinate_scale.fill_(float(scale))

    def forward(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if descriptors.dim() != 3 or descriptors.shape[-1] != self.config.descriptor_dim:
            raise ValueError(
                f"descriptors must be (B, N, {self.config.descriptor_dim}), got {tuple(descriptors.shape)}")
        b, n, _ = descriptors.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=descriptors.device)
        elif mask.shape != (b, n):
            raise ValueError(f"mask must be (B, N) = {(b, n)}, got {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        # An image without any real keypoint would leave every key masked (NaN softmax);
        # let such rows attend to everything: their outputs are padding anyway.
        empty = ~mask.any(dim=1, keepdim=True)
        key_mask = (mask | empty)[:, None, None, :]

        x = descriptors
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.regress(x)

    def regress(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-keypoint head alone: features (..., D) -> xyz (..., 3), u (...). Training warms
        it up on shuffled keypoints before the attention layers join (offline/train_d2s.py)."""
        x = self.head(features)
        # The last layer runs in float32 even under autocast: the coordinates need the
        # precision that bfloat16 lacks.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.head_out(x.float())
            xyz = self.coordinate_center + self.coordinate_scale * out[..., :3]
            u = out[..., 3]
        return xyz, u

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's descriptors (N, D) -> xyz (N, 3), reliability r (N,)."""
        xyz, u = self(descriptors[None])
        return xyz[0], reliability(u[0])
