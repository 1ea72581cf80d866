"""A legacy generation's config.json, read with that generation's own keys and defaults.

Field names follow native DogeConfig where the export code reads them (num_hidden_layers,
rope_parameters, keep_window_size, ...), so the wrappers and `model_info` take either config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import DogeExportError

# No keep window (G1..G3): `model_info` then sizes the state to max_context.
UNBOUNDED_WINDOW = 1 << 30


@dataclass
class MoEConfig:
    kind: str  # "router" | "multihead"
    num_experts: int
    top_k: int  # experts per token (router) or per head (multihead)
    num_heads: int = 1  # multihead only
    retrieval_size: int = 0  # multihead only: query width per head (x and y halves)
    norm_topk_prob: bool = False

    @property
    def num_keys(self) -> int:
        return math.isqrt(self.num_experts)


@dataclass
class LegacyConfig:
    raw: dict
    generation: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_parameters: dict
    keep_window_size: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    is_moe: bool = False
    moe: MoEConfig | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dict(self.raw)


def _first(raw: dict, *keys, default=None):
    for k in keys:
        if raw.get(k) is not None:
            return raw[k]
    return default


def rope_parameters(raw: dict) -> dict:
    """rope_scaling + rope_theta (legacy) -> the native rope_parameters form the wrappers read."""
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (raw.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", "dynamic"):
        raise DogeExportError(f"rope type {kind!r} is not supported (Doge uses 'dynamic' or none)")
    params = {"rope_type": kind, "rope_theta": float(scaling.get("rope_theta", theta))}
    if kind == "dynamic":
        params["factor"] = float(scaling["factor"])
    return params


def moe_config(raw: dict, kind: str) -> MoEConfig:
    if kind == "router":
        return MoEConfig("router", int(raw["num_experts"]), int(raw["num_experts_per_tok"]),
                         norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
    experts = _first(raw, "num_cdmoe_experts", "num_cdmmoe_experts")
    heads = _first(raw, "num_cdmoe_heads", "num_cdmmoe_heads")
    per_head = _first(raw, "num_cdmoe_experts_per_head", "num_cdmmoe_experts_per_head")
    if None in (experts, heads, per_head, raw.get("expert_retrieval_size")):
        raise DogeExportError(
            "this multi-head CDMoE checkpoint's config lacks num_cdmoe_experts / num_cdmoe_heads / "
            "num_cdmoe_experts_per_head / expert_retrieval_size (or the num_cdmmoe_* spelling); "
            "add them from the training recipe"
        )
    return MoEConfig("multihead", int(experts), int(per_head), int(heads), int(raw["expert_retrieval_size"]))


def legacy_config(raw: dict, generation: str, *, moe_kind: str | None) -> LegacyConfig:
    """Normalise `raw` (config.json) of a G1..G4 checkpoint; moe_kind from the weights (None: dense)."""
    if raw.get("model_type") != "doge":
        raise DogeExportError(f"config model_type is {raw.get('model_type')!r}, expected 'doge'")
    ratio = float(raw.get("dynamic_mask_ratio") or 0.0)
    if ratio > 0.0:
        raise DogeExportError(
            f"dynamic_mask_ratio is {ratio}: the ratio (kthvalue) masking of the Jan-Jun 2025 code is "
            "not implemented (every published config has 0.0); set it to 0.0 only if the checkpoint "
            "was trained that way"
        )
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    windowed = generation == "g4-jun2025"
    hidden_bias = bool(raw.get("hidden_bias", False))
    return LegacyConfig(
        raw=raw, generation=generation, vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rope_parameters=rope_parameters(raw),
        keep_window_size=int(raw.get("keep_window_size") or 2048) if windowed else UNBOUNDED_WINDOW,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(raw.get("attention_bias", hidden_bias)), mlp_bias=bool(raw.get("mlp_bias", hidden_bias)),
        is_moe=moe_kind is not None, moe=moe_config(raw, moe_kind) if moe_kind else None,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
