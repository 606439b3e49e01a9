"""A decoder-only transformer (GPT-2's shape) for the language-model cells.

    model: gpt
    model_options: {n_layer: 12, n_head: 12, n_embd: 768, seq_len: 1024}          # GPT-2 small, 124M
    model_options: {n_layer: 2, n_head: 2, n_embd: 64, seq_len: 64, norm: rmsnorm, positions: rotary}

Input (N, T) token ids, T <= seq_len; output (N, T, vocab) logits. Each block
is pre-norm (Radford et al. 2019)::

    x = x + attn(norm(x))         causal self-attention: F.scaled_dot_product_attention(is_causal=True)
    x = x + mlp(norm(x))          n_embd -> 4 n_embd -> GELU -> n_embd

then a final norm and a head that shares the token embedding's weight (tied).
Positions are a learned table added to the embedding, or rotary (Su et al.
2021) applied to queries and keys in each head. Initialisation as GPT-2: normal
(0, 0.02), the residual projections scaled by 1 / sqrt(2 n_layer). Under
``precision: bf16`` the trainer runs the forward in torch.autocast (bf16).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cell.errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin (seq_len, head_dim / 2) of the angles t / base^(2i / head_dim)."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (N, H, T, D) with each pair (x_2i, x_2i+1) of its last dimension rotated by the position's angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, o: Any):
        super().__init__()
        norm = (lambda: nn.LayerNorm(o.n_embd, bias=o.bias)) if o.norm == "layernorm" else (lambda: RMSNorm(o.n_embd))
        self.n_head, self.dropout = o.n_head, o.dropout
        self.norm1, self.norm2 = norm(), norm()
        self.qkv = nn.Linear(o.n_embd, 3 * o.n_embd, bias=o.bias)
        self.proj = nn.Linear(o.n_embd, o.n_embd, bias=o.bias)
        self.fc = nn.Linear(o.n_embd, 4 * o.n_embd, bias=o.bias)
        self.out = nn.Linear(4 * o.n_embd, o.n_embd, bias=o.bias)
        self.drop = nn.Dropout(o.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        n, t, c = x.shape
        # (N, T, 3C) -> three (N, H, T, C/H)
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope[0][:t], rope[1][:t]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(n, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.norm2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab: int, o: Any):
        super().__init__()
        self.seq_len = o.seq_len
        self.wte = nn.Embedding(vocab, o.n_embd)
        self.wpe = nn.Embedding(o.seq_len, o.n_embd) if o.positions == "learned" else None
        if o.positions == "rotary":
            cos, sin = rotary_tables(o.seq_len, o.n_embd // o.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(o.dropout)
        self.blocks = nn.ModuleList(Block(o) for _ in range(o.n_layer))
        self.norm = nn.LayerNorm(o.n_embd, bias=o.bias) if o.norm == "layernorm" else RMSNorm(o.n_embd)
        self.head = nn.Linear(o.n_embd, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied (Press and Wolf 2017)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            for proj in (block.proj, block.out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * o.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t, device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.wpe is None else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))


def gpt(shape: Any, options: Any) -> nn.Module:
    """The GPT for a language-model set: its vocabulary from the data, contexts up to ``seq_len``."""
    context = shape.input_shape[0]
    if context > options.seq_len:
        raise ConfigError(f"cell.model_options.seq_len: {options.seq_len} is shorter than the data's examples "
                          f"({context} tokens); allowed: {context} or more")
    return GPT(shape.vocab_size, options)


def n_params(model: nn.Module) -> int:
    """Parameters counted once (the tied head is the embedding)."""
    return sum(p.numel() for p in model.parameters())
