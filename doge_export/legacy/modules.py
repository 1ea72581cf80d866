"""Building blocks of the legacy Doge reference, written from facts/doge-variants.md §2 and §7.

Parameter names are the checkpoints' own (q_proj, A, dt_proj, router_gate, queries, keys, ...), so a
state dict loads without renaming. Each forward is the eager computation of its generation, with the
growing cache of `generate()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import _stable_prepare_dynamic_mask
from .config import LegacyConfig
from .layouts import Layout


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then multiply by the weight (facts §1.3)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class Residual(nn.Module):
    """G1..G3's `Residual` module: a learned vector scaling the skip path (`.weight`)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Rotary(nn.Module):
    """RoPE with the dynamic-NTK update of the legacy code: the base grows with max(position)+1
    past max_position_embeddings and resets below it (stateful, as the original; reset by
    reference.reset_rotary before each prefill, which is what generate() on a fresh model sees)."""

    def __init__(self, config: LegacyConfig):
        super().__init__()
        params = config.rope_parameters
        self.dynamic = params["rope_type"] == "dynamic"
        self.theta, self.factor = params["rope_theta"], params.get("factor", 1.0)
        self.dim = config.head_dim
        self.original_max_seq_len = self.max_seq_len_cached = config.max_position_embeddings
        self.register_buffer("inv_freq", self._inv_freq(self.original_max_seq_len), persistent=False)
        self.original_inv_freq = self.inv_freq.clone()

    def _inv_freq(self, seq_len) -> torch.Tensor:
        base = self.theta
        if self.dynamic and seq_len > self.original_max_seq_len:
            scale = (self.factor * seq_len / self.original_max_seq_len) - (self.factor - 1)
            base = self.theta * scale ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        return 1.0 / (base**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.dynamic:
            seq_len = torch.max(position_ids) + 1
            if seq_len > self.max_seq_len_cached:
                self.inv_freq, self.max_seq_len_cached = self._inv_freq(seq_len), seq_len
            if seq_len < self.original_max_seq_len < self.max_seq_len_cached:
                self.inv_freq, self.max_seq_len_cached = self.original_inv_freq.clone(), self.original_max_seq_len
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """[B,G,L,D] -> [B,G*times,L,D], each KV head repeated for its query heads."""
    B, G, L, D = x.shape
    return x[:, :, None].expand(B, G, times, L, D).reshape(B, G * times, L, D)


class Attention(nn.Module):
    """Dynamic mask attention with one bias row per query head (G1..G4): A [H], dt_proj -> H."""

    def __init__(self, config: LegacyConfig, layout: Layout):
        super().__init__()
        H, G, D, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, H * D, bias=bias)
        self.k_proj = nn.Linear(hidden, G * D, bias=bias)
        self.v_proj = nn.Linear(hidden, G * D, bias=bias)
        self.A = nn.Parameter(torch.zeros(H))
        self.dt_proj = nn.Linear(G * D, H, bias=bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=bias)
        self.head_dim, self.num_heads, self.num_kv_heads = D, H, G
        self.keep_window_size = config.keep_window_size
        self.mask_kind = "binary" if layout.mask == "binary" else ("window" if layout.keep_window else "additive")

    def forward(self, x, cos, sin, allowed, cached):
        """x [B,S,hidden]; allowed [B,1,S,L] bool (causal and padding); cached: the layer's cache."""
        B, S, _ = x.shape
        D = self.head_dim
        q = rope(self.q_proj(x).view(B, S, -1, D).transpose(1, 2), cos, sin)
        k = rope(self.k_proj(x).view(B, S, -1, D).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, S, -1, D).transpose(1, 2)
        dt = self.dt_proj(v.transpose(1, 2).reshape(B, S, -1))
        w = torch.exp(self.A * F.softplus(dt)).transpose(-1, -2)  # [B,H,S]
        keys, values, w = cached.update(k, v, w)  # [B,G,L,D] x2, [B,H,L]
        bias = self.attention_bias(x, w, allowed)  # [B,H,S,L]
        R = self.num_heads // self.num_kv_heads
        scores = torch.matmul(q, repeat_heads(keys, R).transpose(-1, -2)) * D**-0.5 + bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, repeat_heads(values, R)).transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(out)

    def attention_bias(self, x, w, allowed):
        minv = torch.finfo(x.dtype).min
        causal = torch.where(allowed, torch.zeros((), dtype=x.dtype), torch.full((), minv, dtype=x.dtype))
        if self.mask_kind == "additive":  # G2/G3: w + causal float mask
            return w[:, :, None, :] + causal
        if self.mask_kind == "binary":  # G1: dtype-min wherever not allowed or w < 1
            keep = allowed & (w[:, :, None, :] >= 1.0)
            return torch.where(keep, torch.zeros((), dtype=x.dtype), torch.full((), minv, dtype=x.dtype))
        return self.prepare_dynamic_mask(x, w, self.keep_window_size, causal)  # G4: native's rule

    # G4 computes native's prepare_dynamic_mask per query head; the artifacts' stable top-k rule
    # (earlier position wins a tie) is the reference's, as for native (reference.py)
    prepare_dynamic_mask = _stable_prepare_dynamic_mask


def silu(x):
    return F.silu(x)


class DenseMLP(nn.Module):
    def __init__(self, config: LegacyConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class RouterCDMoE(DenseMLP):
    """One router for both product-key halves, read as [2, B*S, K] across tokens (G3, G4)."""

    def __init__(self, config: LegacyConfig, router_bias: bool):
        super().__init__(config)
        moe = config.moe
        self.num_keys, self.top_k, self.norm_topk_prob = moe.num_keys, moe.top_k, moe.norm_topk_prob
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=router_bias)
        self.down_embed = nn.Embedding(moe.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(moe.num_experts, config.hidden_size)

    def forward(self, x):
        B, S, hidden = x.shape
        router = self.router_gate(x).view(2, B * S, -1)
        (sx, sy), (ix, iy) = router.topk(self.num_keys, dim=-1)
        grid = (sx[..., :, None] + sy[..., None, :]).view(B * S, -1)
        ids = (ix[..., :, None] * self.num_keys + iy[..., None, :]).view(B * S, -1)
        scores, pos = grid.topk(self.top_k, dim=-1)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        experts = ids.gather(-1, pos)
        act = silu(torch.matmul(self.down_embed(experts), x.view(B * S, hidden, 1)).view(B * S, -1)) * weights
        routed = torch.matmul(act.view(B * S, 1, -1), self.up_embed(experts)).view(B, S, hidden)
        return super().forward(x) + routed


class MultiHeadCDMoE(DenseMLP):
    """G1/G2 CDMoE: per-token product keys with several retrieval heads, no mixing across tokens."""

    def __init__(self, config: LegacyConfig):
        super().__init__(config)
        moe = config.moe
        self.num_keys, self.num_heads, self.top_k = moe.num_keys, moe.num_heads, moe.top_k
        self.queries = nn.Linear(config.hidden_size, moe.num_heads * moe.retrieval_size, bias=False)
        self.keys = nn.Parameter(torch.zeros(moe.num_heads, self.num_keys, 2, moe.retrieval_size // 2))
        self.down_embed = nn.Embedding(moe.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(moe.num_experts, config.hidden_size)

    def forward(self, x):
        B, S, hidden = x.shape
        q = self.queries(x).view(B, S, 2, self.num_heads, -1).permute(2, 0, 1, 3, 4)  # [2,B,S,h,r/2]
        sim = torch.einsum("pbshn,hkpn->pbshk", q, self.keys)
        (sx, sy), (ix, iy) = sim.topk(self.top_k, dim=-1)  # [B,S,h,k] each
        grid = (sx[..., :, None] + sy[..., None, :]).flatten(-2)
        ids = (ix[..., :, None] * self.num_keys + iy[..., None, :]).flatten(-2)
        scores, pos = grid.topk(self.top_k, dim=-1)
        experts = ids.gather(-1, pos)  # [B,S,h,k]
        act = silu(torch.einsum("bsd,bshkd->bshk", x, self.down_embed(experts))) * scores.softmax(dim=-1)
        routed = torch.einsum("bshk,bshkd->bsd", act, self.up_embed(experts))
        return super().forward(x) + routed
