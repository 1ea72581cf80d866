"""The PyTorch reference: transformers' DogeForCausalLM, optionally with a stable keep-window top-k.

transformers selects the keep-window with `torch.topk(sorted=False)`, whose order among equal
biases is unspecified; the artifacts follow ONNX TopK's rule (the earlier position wins, DESIGN §3).
`make_topk_stable` swaps each attention module's `prepare_dynamic_mask` for the same computation
with that rule, and can log whether a tie sat at the window boundary (the only place where plain
transformers may legitimately disagree with the artifact).

Layer 0's bias is a function of the token id, so repeated tokens tie; transformers computes it per
position with GEMMs whose rounding depends on the row's place in the tile, and the "tie" comes out
an ulp apart (measured: 1.04512882 vs 1.04512894 for one token at positions 0 and 23). The stable
reference, like the artifact, reads layer 0's bias from one per-token table (token_bias_table), so
such ties are exact and the rule decides them.
"""

from __future__ import annotations

import types

import torch


from .lockstep import NEAR_TIE, exact_ties, has_near_tie, near_ties  # noqa: F401 (the log's readers)


def row_gaps(values: torch.Tensor, k: int, floor: float):
    """values sorted descending [..., n] with the first k kept -> per row (real, tie, rel): real
    rows have a dropped value above `floor` (not masked); tie: equal values across the boundary;
    rel: the smallest relative nonzero gap between a kept and a dropped value."""
    edge_in, edge_out = values[..., k - 1], values[..., k]
    tie = edge_in == edge_out
    kept, dropped = values[..., :k], values[..., k:]
    above = torch.where(kept > edge_out[..., None], kept, torch.inf).amin(-1)  # smallest kept above the tie
    below = torch.where(dropped < edge_in[..., None], dropped, -torch.inf).amax(-1)  # largest dropped below
    gap = torch.where(tie, torch.minimum(above - edge_out, edge_in - below), edge_in - edge_out)
    return edge_out > floor, tie, gap / edge_in.abs().clamp_min(torch.finfo(values.dtype).tiny)


def tie_entry(kind: str, values: torch.Tensor, k: int, floor: float, tokens: int) -> tuple:
    """A tie-log entry (kind, exact, gap, rows): rows are the (batch row, token index) pairs whose
    decision rounding may flip (gap <= NEAR_TIE; for routing also an exact tie, whose order
    transformers leaves unspecified). values [B, ..., tokens, n]: the token index is the row's
    last leading dim."""
    real, tie, rel = row_gaps(values, k, floor)
    flip = real & ((rel <= NEAR_TIE) | (tie & (kind == "route")))
    flat = flip.reshape(values.shape[0], -1, tokens).any(1).nonzero().tolist()  # [[b, t], ...]
    exact, gap = (bool((tie & real).any()), float(rel[real].min())) if bool(real.any()) else (False, float("inf"))
    return kind, exact, gap, tuple(map(tuple, flat))


def _stable_prepare_dynamic_mask(self, hidden_states, dt_states, keep_window_size=2048, attention_mask=None):
    # Same as transformers' DogeAttention.prepare_dynamic_mask, with a stable top-k.
    table, ids = getattr(self, "_token_table", None), getattr(self, "_token_ids", None)
    if table is not None and ids is not None and ids.shape[-1] == dt_states.shape[-1]:
        dt_states = table[ids].transpose(-1, -2).to(dt_states.dtype)  # layer 0: exact ties
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
        if log is not None:  # values [B, G, queries, keys]
            log.append(tie_entry("window", values, keep_window_size, min_dtype, values.shape[-2]))
        active = torch.zeros_like(attn_mask).scatter(-1, order[..., :keep_window_size], 1.0)
        attn_mask = attn_mask.masked_fill(active == 0.0, min_dtype)
    return attn_mask


def make_topk_stable(model, tie_log: list | None = None) -> None:
    """Patch every DogeAttention of `model` in place. `tie_log` collects, per call with a window
    (and per CDMoE routing), tie_entry's (kind, exact, gap, rows): the smallest relative gap
    between the last kept and the first dropped bias (0.0: an exact tie, decided by the rule;
    <= NEAR_TIE: closer than two fp32 runtimes can agree on), and the tokens where it was that close."""
    from .wrappers import token_bias_table

    attention = [m for m in model.modules() if hasattr(m, "prepare_dynamic_mask") and hasattr(m, "keep_window_size")]
    for i, module in enumerate(attention):
        module.prepare_dynamic_mask = types.MethodType(_stable_prepare_dynamic_mask, module)
        module._tie_log = tie_log
        module._token_table = token_bias_table(model) if i == 0 else None
    if tie_log is not None:
        for moe in model.modules():
            if hasattr(moe, "router_gate") and hasattr(moe, "num_keys") and hasattr(moe, "top_k"):
                moe.router_gate.register_forward_hook(_routing_gap_hook(moe, tie_log))


def _routing_gap_hook(moe, log: list):
    """Logs the CDMoE routing margin: selected experts vs the best rejected one (facts §1.5)."""

    def hook(module, inputs, output):
        B, S, _ = inputs[0].shape
        (scores_x, scores_y), _ = output.view(2, B * S, -1).topk(moe.num_keys, dim=-1)
        scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).view(B * S, -1)
        ordered = scores.sort(dim=-1, descending=True).values.view(B, S, -1)
        log.append(tie_entry("route", ordered, moe.top_k, -torch.inf, S))

    return hook


def set_token_ids(model, token_ids: torch.Tensor) -> None:
    """Tell the stable reference's layer 0 which token sits at each cached position [B, L]."""
    for module in model.modules():
        if getattr(module, "_token_table", None) is not None:
            module._token_ids = token_ids


def reset_rotary(model) -> None:
    """Dynamic NTK RoPE keeps state across calls; generate() on a fresh model starts from this."""
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.original_inv_freq.clone()
    rotary.max_seq_len_cached = rotary.original_max_seq_len
