"""The feed-forward half of a Doge layer for the export wrappers: the dense MLP and CDMoE, written
so that ONNX Runtime computes them to fp32 accuracy, with the routing exactly as transformers'."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import FusedLinear
from .numerics import in_fp32


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written so that ONNX Runtime computes it to fp32 accuracy.

    Traced as-is, F.silu becomes x * Sigmoid(x), and ONNX Runtime's CPU Sigmoid is an
    approximation (absolute error up to 1.7e-7, relative 0.2% at |x| = 10, measured), which alone
    moved Doge-20M logits by ~4e-4. Exp and Div are accurate to an ulp or two.
    """
    if x.dtype != torch.float32:  # half: one rounding, like F.silu on fp16/bf16
        return in_fp32(silu, x)
    return x / (1.0 + torch.exp(-x))


def dense_mlp(mlp, h: torch.Tensor, gate_up: FusedLinear | None = None) -> torch.Tensor:
    """DogeMLP (and CDMoE's shared expert): down(silu(gate(h)) * up(h)); gate_up: fused.py's."""
    gate, up = gate_up(h) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
    return mlp.down_proj(silu(gate) * up)


def cdmoe(moe, h: torch.Tensor, gate_up: FusedLinear | None = None) -> torch.Tensor:
    """DogeCDMoE exactly as transformers computes it, routing included (facts §1.5).

    The router logits [B,S,2K] are reinterpreted as [2, B*S, K] across the whole batch (a
    Reshape, not a per-token split), so routing mixes tokens, as the reference does.
    """
    B, S, hidden = h.shape
    router = moe.router_gate(h).view(2, B * S, -1)
    (scores_x, scores_y), (idx_x, idx_y) = router.topk(moe.num_keys, dim=-1)
    all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).view(B * S, -1)
    all_indices = (idx_x.unsqueeze(-1) * moe.num_keys + idx_y.unsqueeze(-2)).view(B * S, -1)
    scores, position = all_scores.topk(moe.top_k, dim=-1)
    indices = all_indices.gather(-1, position)
    weights = in_fp32(lambda s: F.softmax(s, dim=-1), scores)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    down, up = moe.down_embed(indices), moe.up_embed(indices)  # [N,T,hidden]
    expert = silu(torch.matmul(down, h.view(B * S, hidden, 1)).view(B * S, -1)) * weights
    experts = torch.matmul(expert.view(B * S, 1, -1), up).view(B, S, hidden)
    return dense_mlp(moe, h, gate_up) + experts
