"""The PyTorch reference: transformers' DogeForCausalLM, optionally with a stable keep-window top-k.

transformers selects the keep-window with `torch.topk(sorted=False)`, whose order among equal
biases is unspecified; the artifacts follow ONNX TopK's rule (the earlier position wins, DESIGN §3).
`make_topk_stable` swaps each attention module's `prepare_dynamic_mask` for the same computation
with that rule, and can log whether a tie sat at the window boundary (the only place where plain
transformers may legitimately disagree with the artifact).
"""

from __future__ import annotations

import types

import torch


def _stable_prepare_dynamic_mask(self, hidden_states, dt_states, keep_window_size=2048, attention_mask=None):
    # Same as transformers' DogeAttention.prepare_dynamic_mask, with a stable top-k.
    min_dtype = torch.finfo(hidden_states.dtype).min
    dtype = hidden_states.dtype
    attn_mask = dt_states[:, :, None, :].expand(-1, -1, hidden_states.shape[1], -1)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            zero = torch.full((), 0.0, device=attention_mask.device, dtype=dtype)
            attention_mask = torch.where(attention_mask, zero, min_dtype)
        attn_mask = attn_mask.masked_fill(attention_mask[:, :, :, : attn_mask.shape[-1]] != 0, min_dtype)
    if attn_mask.shape[-1] > keep_window_size:
        values, order = torch.sort(attn_mask, dim=-1, descending=True, stable=True)
        log = getattr(self, "_tie_log", None)
        if log is not None:
            edge_in, edge_out = values[..., keep_window_size - 1], values[..., keep_window_size]
            log.append(bool(((edge_in == edge_out) & (edge_out > min_dtype)).any()))
        active = torch.zeros_like(attn_mask).scatter(-1, order[..., :keep_window_size], 1.0)
        attn_mask = attn_mask.masked_fill(active == 0.0, min_dtype)
    return attn_mask


def make_topk_stable(model, tie_log: list | None = None) -> None:
    """Patch every DogeAttention of `model` in place; `tie_log` collects one bool per masked call."""
    for module in model.modules():
        if hasattr(module, "prepare_dynamic_mask") and hasattr(module, "keep_window_size"):
            module.prepare_dynamic_mask = types.MethodType(_stable_prepare_dynamic_mask, module)
            module._tie_log = tie_log


def reset_rotary(model) -> None:
    """Dynamic NTK RoPE keeps state across calls; generate() on a fresh model starts from this."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len
