"""RoPE for the export wrappers: cos/sin computed in the graph from the position ids, with
transformers' dynamic NTK rescaling (inverse frequencies from a table torch computes at export)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryFromPositions(nn.Module):
    """cos/sin [B,S,D] from position_ids [B,S], dynamic NTK computed in the graph.

    Matches transformers' dynamic_rope_update on a fresh model during generate(): the base is
    rescaled from max(position_ids)+1 over the whole batch once that exceeds max_position_embeddings.

    The inverse frequencies come from a table [rows, D/2] with one row per seq_len in
    [max_pos, table_to], computed at export by the same torch ops transformers runs: ONNX
    Runtime's Pow differs from torch's by an ulp for most seq_lens, and at position p that ulp
    turns into a phase error of p x ulp (1.7e-4 on the logits of Doge-20M-MoE by position 280).
    Past table_to (max_context) the graph falls back to computing the formula itself.
    """

    def __init__(self, config, table_to: int | None = None):
        super().__init__()
        params = config.rope_parameters
        self.dynamic = params.get("rope_type", "default") == "dynamic"
        self.theta = float(params["rope_theta"])
        self.factor = float(params.get("factor", 1.0))
        self.max_pos = int(config.max_position_embeddings)
        self.dim = config.hidden_size // config.num_attention_heads
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        self.register_buffer("exponents", exponents, persistent=False)
        last = max(table_to or 4 * self.max_pos, self.max_pos) if self.dynamic else self.max_pos
        # row 0 (seq_len <= max_pos): the original frequencies, a python-float base as transformers'
        table = [1.0 / (self.theta**exponents)] + [self._formula(n) for n in torch.arange(self.max_pos + 1, last + 1)]
        table = torch.stack(table)  # [rows, D/2], computed eagerly by torch
        self.register_buffer("inv_freq_table", table, persistent=False)

    def _formula(self, seq_len: torch.Tensor) -> torch.Tensor:
        """transformers' dynamic NTK inverse frequencies for a seq_len tensor (int64, 0-dim)."""
        seq_len = torch.clamp(seq_len, min=self.max_pos)
        scale = (self.factor * seq_len / self.max_pos) - (self.factor - 1)
        base = self.theta * scale ** (self.dim / (self.dim - 2))
        return 1.0 / (base**self.exponents)

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return self.inv_freq_table[0]
        seq_len = position_ids.max() + 1
        rows = self.inv_freq_table.shape[0]
        row = torch.clamp(seq_len - self.max_pos, min=0, max=rows - 1)
        return torch.where(seq_len - self.max_pos < rows, self.inv_freq_table[row], self._formula(seq_len))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B,S,heads,D]; cos/sin [B,S,D]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class ElementwiseRope:
    """RoPE of a prompt (prefill): x * cos + rotate_half(x) * sin, position by position.
    Leaves the attention scale to the scores (query_scaled False), as transformers does."""

    query_scaled = False

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # [B,S,D]

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return apply_rope(q, self.cos, self.sin)

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return apply_rope(k, self.cos, self.sin)


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """[D,D] signed permutation P with x @ P == rotate_half(x)."""
    half = dim // 2
    P = torch.zeros(dim, dim)
    P[torch.arange(half) + half, torch.arange(half)] = -1.0  # out[j] = -x[j + half], j < half
    P[torch.arange(half), torch.arange(half) + half] = 1.0  # out[j] = x[j - half], j >= half
    return P


class MatrixRope:
    """RoPE of one new token per row (step) as one MatMul per tensor: x [B,1,heads,D] @ R [B,1,D,D].

    R = diag(cos) + P * sin (P: rotate_half_matrix), built once per step and shared by all layers,
    so a layer spends one MatMul on q and one on k instead of Split/Neg/Concat/Mul/Mul/Add each.
    x @ R has two non-zero products per output (a fused multiply-add instead of torch's two
    roundings: within an ulp of apply_rope). In fp32 the query matrix also carries the attention
    scale D**-0.5 (query_scaled True), so the score MatMuls need no scaling of their own.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, fold_scale: bool):
        # cos/sin [B,1,D] -> R [B,1,D,D]; column j scaled by cos_j / sin_j
        D = cos.shape[-1]
        eye = torch.eye(D, dtype=cos.dtype, device=cos.device)
        P = rotate_half_matrix(D).to(dtype=cos.dtype, device=cos.device)

        def matrix(c, s):  # c/s [B,1,D] -> [B,1,D,D]
            return eye * c[:, :, None, :] + P * s[:, :, None, :]

        self.R = matrix(cos, sin)
        self.query_scaled = fold_scale
        # the scale goes into cos/sin, not onto R: ONNX Runtime would fold a scalar Mul on R into
        # the MatMul's alpha, and its GEMM copies the matrix it multiplies for any alpha != 1
        scale = D**-0.5
        self.R_query = matrix(cos * scale, sin * scale) if fold_scale else self.R

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, self.R_query)  # [B,1,H,D] @ [B,1,D,D]

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(k, self.R)
