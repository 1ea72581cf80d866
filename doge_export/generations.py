"""Which Doge code generation a checkpoint was written by, decided from its weights.

`model_type` is "doge" in every generation, so names and shapes are the only evidence
(facts/doge-variants.md §2, §7.1). Detection never guesses: an unknown layout is refused with
the evidence that was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DogeExportError

# generation name -> (dates, what it is); the export status lives in SUPPORTED
GENERATIONS = {
    "native": ("2025-08 ->", "transformers DogeForCausalLM: q/k-norm, A and dt_proj per KV head"),
    "g4-jun2025": ("2025-06 .. 2025-08", "native names, no q/k-norm, A and dt_proj per query head"),
    "g3-feb2025": ("2025-02 .. 2025-06", "pre_layernorm/feed_forward names, single-router CDMoE"),
    "g2-jan2025": ("2024-12 .. 2025-02", "pre_layernorm/feed_forward names, multi-head product-key CDMoE"),
    "g1-binary-mask": ("2024-12", "first Doge-20M-Instruct: MHA, binary dynamic mask"),
    "g0-inner-func": ("2024-11 .. 2024-12", "inner-function attention (v_queries/v_keys/v_embed)"),
}
SUPPORTED = {"native", "g4-jun2025", "g3-feb2025", "g2-jan2025", "g1-binary-mask"}
G0_REFUSAL = (
    "its values are not a projection but embeddings retrieved by a top-k similarity (v_queries, "
    "v_keys, v_embed), its mask is a learned [heads, max_position] table and its keys are never "
    "rotated; the public description is not exact enough to write a reference that provably "
    "computes what that code computed, so no artifact could be validated. Re-train or convert it "
    "to a later generation"
)


@dataclass(frozen=True)
class Detection:
    generation: str
    evidence: tuple[str, ...]


def _has(keys, fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _first(shapes: dict[str, tuple[int, ...]], suffix: str):
    for name, shape in shapes.items():
        if name.endswith(suffix):
            return name, shape
    return None, None


def _bias_per_query_head(shapes, config: dict, attn: str, evidence: list[str]) -> bool:
    """A [H] and dt_proj -> H, as G1..G4 have them; records the shapes as evidence."""
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    _, a_shape = _first(shapes, f"{attn}.A")
    _, dt_shape = _first(shapes, f"{attn}.dt_proj.weight")
    evidence.append(f"{attn}.A shape {list(a_shape or ())}, dt_proj.weight {list(dt_shape or ())} "
                    f"(config: {heads} heads, {kv} KV heads)")
    return heads is not None and a_shape == (heads,) and dt_shape is not None and dt_shape[0] == heads


def _moe_evidence(keys, evidence: list[str]) -> None:
    if _has(keys, "router_gate.bias"):
        evidence.append("single CDMoE router with a bias (router_gate.bias: Mar/Apr 2025; kept)")
    elif _has(keys, "router_gate"):
        evidence.append("single CDMoE router (router_gate), logits read as [2, tokens, K] across tokens")
    elif _has(keys, "feed_forward.queries."):
        evidence.append("multi-head product-key CDMoE (feed_forward.queries / keys), per token")
    else:
        evidence.append("dense MLP")


def _g2_family(keys, shapes, config: dict, evidence: list[str]) -> str | None:
    """Jan..Jun 2025 names (pre_layernorm, pre_residual.weight, feed_forward): G2 or G3."""
    evidence.append("pre_layernorm / pre_residual.weight / feed_forward names")
    if not _bias_per_query_head(shapes, config, "self_attn", evidence):
        return None
    if _has(keys, "feed_forward.queries_proj"):
        raise DogeExportError(
            "this checkpoint has the Feb-2025 layout with a queries_proj/keys router "
            "(feed_forward.queries_proj: the 2025-03-02 development code, superseded by router_gate "
            "on 2025-03-17); no published checkpoint of it is known and it is not supported. "
            "Please open an issue with the checkpoint's name and key list"
        )
    _moe_evidence(keys, evidence)
    if _has(keys, "feed_forward.router_gate"):
        return "g3-feb2025"
    if not _has(keys, "feed_forward.queries.") and "keep_window_size" in config:
        evidence.append("config has keep_window_size (Feb-2025 code); dense Jan- and Feb-2025 layers "
                        "compute the same graph at dynamic_mask_ratio 0")
    return "g2-jan2025"


def _legacy_names_generation(keys, shapes, config: dict, evidence: list[str]) -> str | None:
    """Generations G0-G3, recognised by their pre-native parameter names."""
    if _has(keys, "attn.v_queries") or _has(keys, "attn.v_embed"):
        evidence.append("inner-function value retrieval weights (attn.v_queries / attn.v_embed)")
        return "g0-inner-func"
    if _has(keys, "pre_sequence_layernorm") or _has(keys, "post_sequence_residual"):
        evidence.append("pre_sequence_layernorm / post_sequence_residual / attn.* names")
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if kv not in (None, heads) or not _bias_per_query_head(shapes, config, "attn", evidence):
            evidence.append("expected MHA with A [heads] and dt_proj hidden -> heads")
            return None
        _moe_evidence(keys, evidence)
        return "g1-binary-mask"
    if _has(keys, "pre_layernorm") or _has(keys, "pre_residual.weight"):
        return _g2_family(keys, shapes, config, evidence)
    return None


def _native_names_generation(keys, shapes, config: dict, evidence: list[str]) -> str | None:
    """Native-named checkpoints: native (q/k-norm, A per KV head) or G4 (no norm, A per head)."""
    if not _has(keys, "self_attn.A") or not _has(keys, "input_residual"):
        return None
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    _, a_shape = _first(shapes, "self_attn.A")
    has_norm = _has(keys, "self_attn.q_norm.weight") and _has(keys, "self_attn.k_norm.weight")
    evidence.append(f"native names; q_norm/k_norm {'present' if has_norm else 'absent'}")
    evidence.append(f"self_attn.A shape {list(a_shape)} (heads {heads}, KV heads {kv})")
    if has_norm and a_shape == (kv,):
        _moe_evidence(keys, evidence)
        return "native"
    if not has_norm and a_shape == (heads,):
        _moe_evidence(keys, evidence)
        return "g4-jun2025"
    return None


def detect_generation(shapes: dict[str, tuple[int, ...]], config: dict) -> Detection:
    """shapes: parameter name -> shape, as stored in the checkpoint; config: its config.json."""
    evidence: list[str] = []
    keys = list(shapes)
    name = (_legacy_names_generation(keys, shapes, config, evidence)
            or _native_names_generation(keys, shapes, config, evidence))
    if name is None:
        sample = ", ".join(sorted(keys)[:8])
        raise DogeExportError(
            "unknown Doge weight layout: it matches no known generation "
            f"(evidence: {'; '.join(evidence) or 'none'}; first keys: {sample}). "
            "Refusing to guess; please open an issue with the checkpoint's key list."
        )
    if "lm_head.weight" not in shapes:
        evidence.append("no lm_head.weight: tied to the embedding")
    return Detection(name, tuple(evidence))


def require_supported(detection: Detection) -> None:
    if detection.generation in SUPPORTED:
        return
    dates, what = GENERATIONS[detection.generation]
    raise DogeExportError(
        f"this checkpoint is the '{detection.generation}' Doge generation ({dates}: {what}); "
        f"evidence: {'; '.join(detection.evidence)}. It cannot be exported: {G0_REFUSAL}."
    )


def checkpoint_shapes(path: Path, *, allow_pickle: bool) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter name -> shape without loading the weights; and whether they are safetensors."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        shapes = {}
        for f in files:
            with safe_open(f, framework="numpy") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        return shapes, True
    pickles = sorted(path.glob("*.bin"))
    if not pickles:
        raise DogeExportError(f"'{path}' has no *.safetensors (or *.bin) weights")
    if not allow_pickle:
        raise DogeExportError(
            f"'{path}' holds only pickle weights ({pickles[0].name}); loading pickle can run "
            "arbitrary code. Convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    import torch  # only for explicitly allowed pickle checkpoints

    shapes = {}
    for f in pickles:
        state = torch.load(f, map_location="cpu", weights_only=True)
        shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes, False
