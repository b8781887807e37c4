"""A small decoder-only transformer: pre-norm blocks, SDPA attention, RoPE, tied embeddings.

Legend: B batch rows, T tokens per row, H model width, V vocabulary, A attention heads.
Model code only: losses, metrics and optimisation live in the LightningModule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_length: int = 512  # longest row the RoPE tables are built for (grown on demand)
    dropout: float = 0.0
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_length"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must split into n_heads={self.n_heads} heads of even width"
            )


def rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (length, head_dim / 2) rotary tables in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x: (B, A, T, D) by position-dependent angles."""
    first, second = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, h // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderOnlyTransformer(nn.Module):
    """Token ids (B, T) -> final hidden states (B, T, H); the LM head is the embedding."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        head_dim = config.d_model // config.n_heads
        cos, sin = rope_tables(config.max_length, head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H): tied to the input embedding."""
        return self.embed.weight

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            input_ids: (B, T) token ids.
            document_ids: optional (B, T) document index per token for packed rows (-1 for
                padding); tokens attend only within their document. None: plain causal.
        """
        t = input_ids.shape[1]
        if t > self.rope_cos.shape[0]:
            cos, sin = rope_tables(t, self.rope_cos.shape[1] * 2, self.config.rope_base)
            cos, sin = cos.to(input_ids.device), sin.to(input_ids.device)
        else:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = None
        if document_ids is not None and bool((document_ids != 0).any()):
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            same = document_ids[:, :, None] == document_ids[:, None, :]
            # Padding rows (-1) attend to themselves only, so no row is fully masked.
            mask = (causal & same | torch.eye(t, dtype=torch.bool, device=input_ids.device))[:, None]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V). Only for decoding and small batches: losses avoid N x V."""
        return hidden @ self.lm_head_weight.t()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def greedy_decode(self, prompt: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (no KV cache: for small held-out sets)."""
        ids = torch.tensor([prompt], device=self.embed.weight.device)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(self.logits(self(ids)[:, -1]).argmax(-1))
            if next_id == eos_id:
                break
            generated.append(next_id)
            ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
        return generated

    @torch.no_grad()
    def greedy_decode_batch(self, prompts: list[list[int]], eos_id: int, max_new_tokens: int,
                            pad_id: int) -> list[list[int]]:
        """Greedy continuations of several prompts, left-padded into one batch.

        Always runs exactly `max_new_tokens` forward passes (rows that emitted eos keep
        going and are trimmed after), so distributed callers stay in lock-step.
        """
        longest = max(len(p) for p in prompts)
        device = self.embed.weight.device
        ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
        docs = torch.full_like(ids, -1)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
            docs[row, longest - len(prompt):] = 0
        for _ in range(max_new_tokens):
            next_ids = self.logits(self(ids, docs)[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
            docs = torch.cat([docs, torch.zeros_like(next_ids)], dim=1)
        outputs = []
        for row in ids[:, longest:].tolist():
            outputs.append(row[: row.index(eos_id)] if eos_id in row else row)
        return outputs
