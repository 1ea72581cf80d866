"""Projections that read the same input, fused into one MatMul for the exported graphs.

q/k/v (attention) and gate/up (MLP, CDMoE's shared expert) each read one normed hidden vector.
At decode time every projection is a matrix-vector product whose fixed cost per kernel call is
comparable to its bytes (Doge-20M: 128-512 KB each), so one [hidden, q+k+v] and one
[hidden, 2 x intermediate] MatMul per layer replace five calls. Same dot products, same
per-column sums; the graphs hold only the fused matrices (weights.bin stays one copy).
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Module):
    """x [..., in] -> tuple of outputs [..., out_i], as the given nn.Linear layers would give."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [sum out, in]
        self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)  # [in, sum out]
        has_bias = [lin.bias is not None for lin in linears]
        self.bias = None
        if any(has_bias):
            bias = [lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                    for lin in linears]
            self.bias = nn.Parameter(torch.cat(bias), requires_grad=False)

    @classmethod
    def of(cls, *linears) -> FusedLinear | None:
        """The fusion of `linears`, or None where they are not plain Linear layers on one input."""
        if not all(type(lin) is nn.Linear for lin in linears):
            return None
        if len({lin.in_features for lin in linears}) != 1 or len({lin.weight.dtype for lin in linears}) != 1:
            return None
        return cls(list(linears))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.matmul(x, self.weight_t)
        if self.bias is not None:
            y = y + self.bias
        return torch.split(y, self.sizes, dim=-1)


def fused_qkv(attn) -> FusedLinear | None:
    return FusedLinear.of(attn.q_proj, attn.k_proj, attn.v_proj)


def fused_gate_up(mlp) -> FusedLinear | None:
    if not hasattr(mlp, "gate_proj") or not hasattr(mlp, "up_proj"):
        return None
    return FusedLinear.of(mlp.gate_proj, mlp.up_proj)
