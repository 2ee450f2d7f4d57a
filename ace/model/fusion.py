"""Coarse-to-fine fusion of all encoder layers into every decoder layer (the paper's step 4).

With encoder layer outputs E_1..E_S (each (B, N, d)) and decoder state Y (B, T, d):

    coarse = sigmoid(CrossAttn(Y, Z)) / S,       Z = W [E_1; ..; E_S] + b   (linear over the concat)
    fine   = sum_i a_i * CrossAttn(Y, E_i),      a_i = sigmoid(W_i [Y; CrossAttn(Y, E_i)] + b_i)
    out    = coarse + fine                        (then the decoder layer's feed-forward)

``fusion=False`` is the ablation: ordinary cross-attention to the last encoder layer.

Keys/values depend only on the encoder side, so ``memory(layers)`` computes them once per query;
``forward(y, memory, mask)`` then attends from any number of decoder rows. In beam search the
rows of one query are its beams (T = beams), so keys/values are shared without being copied.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttention(nn.Module):
    """Multi-head attention from decoder rows to precomputed encoder keys/values."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def memory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d) -> keys, values (B, H, N, d/H)."""
        B, N, d = x.shape
        k, v = self.kv_proj(x).view(B, N, 2, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, y: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """y (B, T, d), kv (B, H, N, dh), mask (B, 1, 1, N) bool (True = attend) -> (B, T, d)."""
        B, T, d = y.shape
        q = self.q_proj(y).view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, H, T, dh)
        k, v = kv
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, d))


class CoarseFusion(nn.Module):
    """sigmoid(CrossAttn(Y, Z)) / S with Z a linear map of the concatenated S encoder layers."""

    def __init__(self, *, d_model: int, n_heads: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.num_layers = num_layers
        self.mix = nn.Linear(num_layers * d_model, d_model)
        self.attn = CrossAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)

    def memory(self, layers: torch.Tensor):
        """layers (B, S, N, d) -> keys/values of Z (B, H, N, dh)."""
        B, S, N, d = layers.shape
        z = self.mix(layers.permute(0, 2, 1, 3).reshape(B, N, S * d))  # (B, N, d)
        return self.attn.memory(z)

    def forward(self, y, memory, mask):
        return torch.sigmoid(self.attn(y, memory, mask)) / self.num_layers


class FineFusion(nn.Module):
    """sum_i a_i * CrossAttn_i(Y, E_i) with gates a_i = sigmoid(W_i [Y; CrossAttn_i(Y, E_i)] + b_i)."""

    def __init__(self, *, d_model: int, n_heads: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.ModuleList(CrossAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
                                  for _ in range(num_layers))
        # W_i [Y; C_i] + b_i = W_i^Y Y + W_i^C C_i + b_i: the Y halves of all S gates are one matmul
        self.gate_y = nn.Linear(d_model, num_layers * d_model)
        self.gate_c = nn.ModuleList(nn.Linear(d_model, d_model, bias=False) for _ in range(num_layers))

    def memory(self, layers: torch.Tensor):
        """layers (B, S, N, d) -> S pairs of keys/values (B, H, N, dh)."""
        return [attn.memory(layers[:, i]) for i, attn in enumerate(self.attn)]

    def forward(self, y, memory, mask):
        gy = self.gate_y(y).chunk(len(self.attn), dim=-1)           # S x (B, T, d)
        out = 0.0
        for attn, gate_c, g, kv in zip(self.attn, self.gate_c, gy, memory):
            c = attn(y, kv, mask)                                   # (B, T, d)
            out = out + torch.sigmoid(g + gate_c(c)) * c
        return out


class FusionCrossAttention(nn.Module):
    """The decoder layer's encoder-attention block: coarse + fine fusion, or plain cross-attention."""

    def __init__(self, *, d_model: int, n_heads: int, num_layers: int, dropout: float = 0.0, fusion: bool = True):
        super().__init__()
        self.fusion, self.num_layers = fusion, num_layers
        if fusion:
            self.coarse = CoarseFusion(d_model=d_model, n_heads=n_heads, num_layers=num_layers, dropout=dropout)
            self.fine = FineFusion(d_model=d_model, n_heads=n_heads, num_layers=num_layers, dropout=dropout)
        else:
            self.cross = CrossAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)

    def memory(self, layers: torch.Tensor):
        """layers (B, S, N, d) -> the keys/values this block attends to (computed once per query)."""
        if layers.dim() != 4 or layers.shape[1] != self.num_layers:
            raise ValueError(f"expected encoder layers of shape (B, {self.num_layers}, N, d), got {tuple(layers.shape)}")
        if self.fusion:
            return self.coarse.memory(layers), self.fine.memory(layers)
        return self.cross.memory(layers[:, -1])

    def forward(self, y: torch.Tensor, memory, mask: torch.Tensor | None) -> torch.Tensor:
        """y (B, T, d) -> (B, T, d); mask (B, 1, 1, N) bool over encoder positions."""
        if self.fusion:
            coarse_mem, fine_mem = memory
            return self.coarse(y, coarse_mem, mask) + self.fine(y, fine_mem, mask)
        return self.cross(y, memory, mask)
