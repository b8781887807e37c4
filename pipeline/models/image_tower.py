"""Small image towers for the contrastive model: a ViT (transformer blocks shared with the
text tower) or a conv net. Images (B, 3, H, W) in [-1, 1] -> features (B, width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.transformer import Block, TransformerConfig, rope_tables

TOWERS = ("vit", "conv")


@dataclass
class ImageTowerConfig:
    kind: str = "vit"
    image_size: int = 32
    patch_size: int = 4  # vit: patch edge in pixels
    width: int = 64  # vit: model width; conv: channels of the last stage
    n_layers: int = 2  # vit: blocks; conv: stride-2 stages
    n_heads: int = 4
    d_ff: int = 256

    def __post_init__(self) -> None:
        if self.kind not in TOWERS:
            raise ValueError(f"model.image_tower.kind must be one of {TOWERS}, got {self.kind!r}")
        if self.kind == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"model.image_tower.patch_size={self.patch_size} must divide "
                             f"image_size={self.image_size}")
        for key in ("image_size", "patch_size", "width", "n_layers", "n_heads", "d_ff"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"model.image_tower.{key} must be >= 1, got {getattr(self, key)!r}")


class ViTTower(nn.Module):
    """Patch embedding, a learned [CLS] token, bidirectional pre-norm blocks (RoPE over the
    flattened patch order), final norm; returns the [CLS] state (B, width)."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        self.config = config
        self.patch = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos = nn.Parameter(torch.randn(1, 1 + (config.image_size // config.patch_size) ** 2,
                                            config.width) * 0.02)
        block_cfg = TransformerConfig(vocab_size=1, d_model=config.width, n_layers=config.n_layers,
                                      n_heads=config.n_heads, d_ff=config.d_ff)
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.width)
        cos, sin = rope_tables(self.pos.shape[1], config.width // config.n_heads, block_cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, P, width)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        t = x.shape[1]
        # An all-true mask makes the blocks' attention bidirectional (is_causal is off).
        mask = torch.ones(1, 1, t, t, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, mask)
        return self.norm(x[:, 0])


class ConvTower(nn.Module):
    """n_layers stride-2 conv stages (channels doubling up to width), global average pool."""

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        layers, channels = [], 3
        for i in range(config.n_layers):
            out = max(8, config.width // 2 ** (config.n_layers - 1 - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(1, out), nn.GELU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(images).mean(dim=(2, 3)))


def build_image_tower(config: ImageTowerConfig) -> nn.Module:
    return ViTTower(config) if config.kind == "vit" else ConvTower(config)
