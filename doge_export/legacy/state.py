"""How a generation's layout shapes the artifact's state, and what the manifest says about it.

- `state_info`: the ModelInfo of an artifact of this model. Per-query-head layouts have H state
  heads (num_kv_heads = H); layouts without a keep window keep every key (keep_window_size =
  capacity = max_context).
- `cached_state`: from the reference's growing cache, per layer, the keys/values/bias of every
  cached position in the state's head layout, for validation of the prefill state.
- `generation_manifest`: the manifest's account of the generation.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..generations import GENERATIONS
from ..spec import ModelInfo
from .config import MoEConfig
from .layouts import describe, layout_of


BINARY_STATE_RULE = (
    "G1 binary mask, no eviction: prefill writes every prompt row, padding included, in order "
    "(slot = index); bias holds 0 (attended) or the dtype minimum (masked: padding, or "
    "exp(A*softplus(dt)) < 1); position holds the position id (0 at padding). The step writes the "
    "new row into the first empty slot (position -1), as its slot output says. Occupied slots take "
    "part in attention with their bias, empty ones not at all; a row whose every bias is the dtype "
    "minimum attends uniformly to all occupied slots and the new token."
)


def eviction_rule(model, native_rule: str) -> str:
    return BINARY_STATE_RULE if layout_of(model).mask == "binary" else native_rule


def state_info(info: ModelInfo, model) -> ModelInfo:
    layout = layout_of(model)
    heads = layout.state_heads(info.num_heads, info.num_kv_heads)
    if layout.keep_window:
        return replace(info, num_kv_heads=heads)
    return replace(info, num_kv_heads=heads, keep_window_size=info.capacity)


def cached_state(model, cache, layer: int, valid: torch.Tensor):
    """-> key/value [B,S,T,D], bias [B,S,T] (dtype-min where invalid), keep_all: bool.

    S = state heads. keep_all: every cached row belongs in the state (G1: padded rows count in a
    fully masked head's uniform average); otherwise the valid rows compete for the C slots.
    """
    attn, cached = model.model.layers[layer].self_attn, cache.layers[layer]
    k, v = cached.keys, cached.values  # [B,G,T,D]
    B, G, T, D = k.shape
    w = getattr(cached, "bias", None)  # the legacy cache keeps w; transformers' does not
    if w is None:
        dt = attn.dt_proj(v.transpose(1, 2).reshape(B, T, -1))
        w = torch.exp(attn.A * F.softplus(dt)).transpose(-1, -2)  # [B,G or H,T]
    if w.shape[1] != G:  # bias per query head: repeat keys/values per query head
        R = w.shape[1] // G
        k = k[:, :, None].expand(B, G, R, T, D).reshape(B, G * R, T, D)
        v = v[:, :, None].expand(B, G, R, T, D).reshape(B, G * R, T, D)
    minv = torch.finfo(w.dtype).min
    if layout_of(model).mask == "binary":
        return k, v, torch.where(valid[:, None, :] & (w >= 1.0), 0.0, minv), True
    return k, v, torch.where(valid[:, None, :], w, minv), False


def generation_manifest(generation: str, model) -> dict:
    dates, what = GENERATIONS[generation]
    layout = layout_of(model)
    return {"name": generation, "dates": dates, "description": what,
            "reference": "transformers DogeForCausalLM" if generation == "native"
            else "doge_export.legacy (our PyTorch reference of this generation)",
            "differences_from_native": describe(layout),
            "topk": topk_usage(model)}


def topk_usage(model) -> dict:
    """Where the graphs use TopK, and its k (TensorRT's TopK takes k <= 3840)."""
    config = model.config
    note = {"keep_window": "no TopK: a cumulative-count rank in prefill, a min/argmax eviction in the step"}
    if not config.is_moe:
        return {**note, "moe_router": []}
    moe = getattr(config, "moe", None)
    if isinstance(moe, MoEConfig):
        ks = [moe.top_k, moe.top_k] if moe.kind == "multihead" else [moe.num_keys, moe.top_k]
    else:
        ks = [math.isqrt(config.num_experts), config.num_experts_per_tok]
    return {**note, "moe_router": ks}
