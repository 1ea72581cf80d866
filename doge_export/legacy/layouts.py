"""What differs between Doge code generations, as data (facts/doge-variants.md §2).

A `Layout` names a generation's state-dict naming family and the few semantic switches that the
export wrappers (wrappers.py) and the legacy reference (legacy/model.py) read. Nothing here imports
torch: wrappers.py imports it at module level.

  qk_norm        RMSNorm over head_dim on q and k before RoPE (native only)
  bias_heads     "kv": one dynamic-mask row per KV head, shared by its query heads (native);
                 "query": one row per query head (G1..G4). The bounded state then needs one slot set
                 per query head, so state heads = H and keys/values are repeated per query head.
  mask           "dynamic": bias w = exp(A*softplus(dt)) added to the scores, dtype-min where masked
                 (native/G4 masked_fill; G2/G3 add the causal mask, the same numbers while
                 w < 2**103); "binary": G1, 0 where w >= 1 and allowed, dtype-min elsewhere.
  keep_window    the keep-window top-k over the biases applies (native, G4). G1..G3 attend to every
                 cached key (G2/G3's ratio masking is off at dynamic_mask_ratio 0, the only value
                 in published configs; a config with a ratio > 0 is refused).
  moe            "router": one router whose [N, 2K] logits are read as [2, N, K] across tokens
                 (native, G3, G4); "multihead": G1/G2 per-token multi-head product keys.
"""

from __future__ import annotations

from dataclasses import dataclass

# canonical (native) name -> name in the checkpoint, per naming family; "" = at the model root
NATIVE_NAMES = {
    "embed_tokens": "embed_tokens", "norm": "norm",
    "input_layernorm": "input_layernorm", "self_attn": "self_attn", "input_residual": "input_residual",
    "post_attention_layernorm": "post_attention_layernorm", "mlp": "mlp",
    "post_attention_residual": "post_attention_residual",
}
G2_NAMES = {  # Jan..Jun 2025 (G2, G3)
    "embed_tokens": "word_embed", "norm": "final_layernorm",
    "input_layernorm": "pre_layernorm", "self_attn": "self_attn", "input_residual": "pre_residual.weight",
    "post_attention_layernorm": "post_layernorm", "mlp": "feed_forward",
    "post_attention_residual": "post_residual.weight",
}
G1_NAMES = {  # Dec 2024
    "embed_tokens": "word_embed", "norm": "final_layernorm",
    "input_layernorm": "pre_sequence_layernorm", "self_attn": "attn",
    "input_residual": "post_sequence_residual.weight",
    "post_attention_layernorm": "pre_state_layernorm", "mlp": "feed_forward",
    "post_attention_residual": "post_state_residual.weight",
}


@dataclass(frozen=True)
class Layout:
    generation: str
    names: dict
    qk_norm: bool
    bias_heads: str  # "kv" | "query"
    mask: str  # "dynamic" | "binary"
    keep_window: bool
    moe: str  # "router" | "multihead"

    def state_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return num_kv_heads if self.bias_heads == "kv" else num_heads


NATIVE = Layout("native", NATIVE_NAMES, qk_norm=True, bias_heads="kv", mask="dynamic", keep_window=True, moe="router")
LAYOUTS = {
    "native": NATIVE,
    "g4-jun2025": Layout("g4-jun2025", NATIVE_NAMES, False, "query", "dynamic", True, "router"),
    "g3-feb2025": Layout("g3-feb2025", G2_NAMES, False, "query", "dynamic", False, "router"),
    "g2-jan2025": Layout("g2-jan2025", G2_NAMES, False, "query", "dynamic", False, "multihead"),
    "g1-binary-mask": Layout("g1-binary-mask", G1_NAMES, False, "query", "binary", False, "multihead"),
}


def layout_of(model) -> Layout:
    """The layout of an export/reference model: a legacy model carries its own, transformers' is native."""
    layout = getattr(model, "layout", None)
    return layout if isinstance(layout, Layout) else NATIVE


def describe(layout: Layout) -> list[str]:
    """What an artifact of this layout computes differently from native, for the manifest."""
    notes = []
    if not layout.qk_norm:
        notes.append("no q_norm/k_norm")
    if layout.bias_heads == "query":
        notes.append("dynamic-mask bias per query head (A [H], dt_proj -> H): the state holds one slot set "
                     "per query head, each with its KV head's keys/values (model_info.num_kv_heads = H)")
    if not layout.keep_window:
        notes.append("no keep window: every cached key is attended, the state holds max_context slots "
                     "(model_info.keep_window_size = capacity)")
    if layout.mask == "binary":
        notes.append("binary dynamic mask: a key is masked (dtype-min) where exp(A*softplus(dt)) < 1. A "
                     "fully masked row attends uniformly to every key, future and padding ones included: "
                     "prefill computes that exactly over the whole prompt (non-causal, as the reference), "
                     "the state keeps padded prompt rows (bias = dtype-min, position >= 0) because they "
                     "count in that uniform average, bias holds the 0/dtype-min mask value, and the step "
                     "writes the new row into the first empty slot (position -1) instead of evicting")
    if layout.moe == "multihead":
        notes.append("CDMoE, when is_moe: multi-head product keys (feed_forward.queries/keys), routed per "
                     "token (no mixing across tokens)")
    return notes
