"""The export pieces only legacy generations need; wrappers.py calls them by the model's layout.

- G1's binary mask (exact fallback, see layouts.describe): prefill over the whole prompt with the
  uniform rows the reference computes, a state that keeps padded prompt rows, and a step that fills
  the first empty slot instead of evicting.
- G1/G2's multi-head product-key CDMoE, per token, written with MatMul/TopK/Gather (no Einsum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import wrappers as W
from ..mlp import dense_mlp, silu


def binary_prefill_attention(attn, x, rope, valid, positions, capacity, layout, **projection):
    """x [B,T,hidden]; valid [B,T] bool -> (out [B,T,hidden], state); state heads = H (MHA)."""
    q, k, v, w = W.project_qkv(attn, x, rope, layout, **projection)  # w [B,H,T]
    q, k, v = W.heads_first(q, k, v)  # [B,H,T,D]
    minv = W.min_value(x.dtype)
    zero, low = x.new_zeros(()), x.new_full((), minv)
    idx = torch.arange(x.shape[1], device=x.device)
    causal = idx[None, :] <= idx[:, None]  # [i,j]
    key_ok = valid[:, None, :] & (w >= 1.0)  # [B,H,T]: unmasked, not padding
    mask = torch.where(causal & key_ok[:, :, None, :], zero, low)  # all-min rows: uniform over T
    out = attn.o_proj(W.grouped_attention(q, k, v, mask))
    bias = torch.where(key_ok, zero, low)
    every_row = torch.ones_like(key_ok)  # padded rows too: they count in a uniform row
    state = W.compact_state(every_row, k, v, bias, positions.clamp(min=0), capacity)
    return out, state


def binary_step_attention(attn, x, rope, past, layout, **projection):
    """x [B,1,hidden]; past (key, value, bias, position) -> (out, (new_k, new_v, new_b, slot)).

    Occupied slots (position >= 0) take part with their 0/dtype-min bias, empty ones not at all
    (-inf); the new row goes into the first empty slot.
    """
    key, value, bias, position = past
    q, k, v, w = W.project_qkv(attn, x, rope, layout, **projection)  # w [B,H,1]
    q, k, v = W.heads_first(q, k, v)  # [B,H,1,D]
    B, H, _, D = q.shape
    minv = W.min_value(x.dtype)
    new_bias = torch.where(w[..., 0] >= 1.0, x.new_zeros(()), x.new_full((), minv))  # [B,H]
    empty = position < 0  # [B,H,C]
    slot = torch.argmax(empty.to(torch.int32), dim=-1)  # first empty slot
    slot_bias = torch.where(empty, x.new_full((), float("-inf")), bias)
    scores_cache = W.scaled(torch.matmul(q, key.transpose(-1, -2)), D, rope) + slot_bias[:, :, None, :]
    scores_own = W.scaled(W.own_score(q, k), D, rope) + new_bias[:, :, None, None]
    probs = F.softmax(torch.cat((scores_cache, scores_own), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    C = key.shape[2]
    out = torch.matmul(probs[..., :C], value) + probs[..., C:] * v  # [B,H,1,D]
    out = attn.o_proj(out.reshape(B, 1, H * D))
    return out, (k[:, :, 0], v[:, :, 0], new_bias, slot)


def multihead_cdmoe(moe, h: torch.Tensor, gate_up=None) -> torch.Tensor:
    """G1/G2 CDMoE: per token and retrieval head, top-k over each product-key half, then over the
    k*k candidates; softmax of the picked scores weights silu(down_embed . h) * up_embed."""
    B, S, hidden = h.shape
    N, K, k = B * S, moe.num_keys, moe.top_k
    q = moe.queries(h).view(N, 2, moe.num_heads, -1).permute(1, 2, 0, 3)  # [2,heads,N,r/2]
    sim = torch.matmul(q, moe.keys.permute(2, 0, 3, 1))  # [2,heads,N,K]
    (sx, sy), (ix, iy) = sim.topk(k, dim=-1)  # [heads,N,k]
    grid = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
    ids = (ix.unsqueeze(-1) * K + iy.unsqueeze(-2)).flatten(-2)
    scores, pos = grid.topk(k, dim=-1)
    experts = ids.gather(-1, pos)  # [heads,N,k]
    weights = F.softmax(scores, dim=-1)
    down = torch.matmul(moe.down_embed(experts), h.reshape(1, N, hidden, 1)).squeeze(-1)  # [heads,N,k]
    act = silu(down) * weights
    routed = torch.matmul(act.unsqueeze(-2), moe.up_embed(experts)).squeeze(-2).sum(0)  # [N,hidden]
    return dense_mlp(moe, h, gate_up) + routed.view(B, S, hidden)
