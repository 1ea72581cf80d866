"""Random-weight checkpoints in each Doge generation's own layout and config keys (facts §2, §3).

The tensor names and shapes are spelled out here, independently of doge_export.legacy, so loading
them tests the loader's naming as well as its math. Shapes are test-sized (the `tiny` preset's):
vocab 512, hidden 64, 2 layers, 4 heads (2 KV heads; G1 is MHA), head dim 16, max_position 64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
MOE = {"experts": 64, "per_tok": 4, "heads": 2, "retrieval": 16}  # K = 8 keys
AUTO_MAP = {"AutoConfig": "configuration_doge.DogeConfig", "AutoModelForCausalLM": "modeling_doge.DogeForCausalLM"}
DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 64}


def config_for(generation: str, shape: dict, moe: bool) -> dict:
    """config.json as that generation's code wrote it (its own keys and defaults)."""
    base = {"architectures": ["DogeForCausalLM"], "model_type": "doge", "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
            "rope_theta": 10000.0, "is_moe": moe, **{k: v for k, v in shape.items() if k != "num_key_value_heads"}}
    if generation == "g1-binary-mask":  # first Doge-20M-Instruct: MHA, no kv key, bos 1 / eos 2 / pad 0
        return {**base, "auto_map": AUTO_MAP, "hidden_bias": False, "hidden_dropout": 0.0, "rope_scaling": None,
                "expert_retrieval_size": MOE["retrieval"], "num_cdmmoe_experts": MOE["experts"],
                "num_cdmmoe_heads": MOE["heads"], "num_cdmmoe_experts_per_head": MOE["per_tok"],
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
                "transformers_version": "4.46.1"}
    kv = {"num_key_value_heads": shape["num_key_value_heads"]}
    legacy = {**base, **kv, "auto_map": AUTO_MAP, "hidden_bias": False, "hidden_dropout": 0.0,
              "dynamic_mask_ratio": 0.0, "rope_scaling": DYNAMIC_ROPE, "bos_token_id": 0, "eos_token_id": 1,
              "pad_token_id": 2}
    if generation == "g2-jan2025":  # no tie key (trained tied), num_cdmoe_* keys, vision leftovers
        return {**legacy, "expert_retrieval_size": MOE["retrieval"],
                "num_cdmoe_experts": MOE["experts"] if moe else 16348, "num_cdmoe_heads": MOE["heads"],
                "num_cdmoe_experts_per_head": MOE["per_tok"], "num_channels": 3, "patch_size": 16,
                "transformers_version": "4.47.1"}
    routed = {"num_experts": MOE["experts"], "num_experts_per_tok": MOE["per_tok"], "norm_topk_prob": False}
    if generation == "g3-feb2025":  # keep_window_size present but inert at dynamic_mask_ratio 0
        return {**legacy, **routed, "keep_window_size": 16, "tie_word_embeddings": True,
                "transformers_version": "4.48.1"}
    assert generation == "g4-jun2025", generation
    return {**base, **kv, **routed, "attention_bias": False, "mlp_bias": False, "hidden_dropout": 0.0,
            "keep_window_size": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0},
            "sliding_window": None, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
            "tie_word_embeddings": True, "transformers_version": "4.53.0"}


NAMES = {  # embed, final norm, per layer: attn norm, attention, attn residual, ffn norm, ffn, ffn residual
    "g1-binary-mask": ("model.word_embed", "model.final_layernorm", "pre_sequence_layernorm", "attn",
                       "post_sequence_residual.weight", "pre_state_layernorm", "feed_forward",
                       "post_state_residual.weight"),
    "g2-jan2025": ("model.word_embed", "model.final_layernorm", "pre_layernorm", "self_attn",
                   "pre_residual.weight", "post_layernorm", "feed_forward", "post_residual.weight"),
    "g4-jun2025": ("model.embed_tokens", "model.norm", "input_layernorm", "self_attn", "input_residual",
                   "post_attention_layernorm", "mlp", "post_attention_residual"),
}
NAMES["g3-feb2025"] = NAMES["g2-jan2025"]


def tensor_shapes(generation: str, shape: dict, moe: bool, router_bias: bool, lm_head: bool) -> dict:
    V, hidden, inter = shape["vocab_size"], shape["hidden_size"], shape["intermediate_size"]
    H = shape["num_attention_heads"]
    G = H if generation == "g1-binary-mask" else shape["num_key_value_heads"]
    D = hidden // H
    embed, final, attn_norm, attn, attn_res, ffn_norm, ffn, ffn_res = NAMES[generation]
    out = {f"{embed}.weight": (V, hidden), f"{final}.weight": (hidden,)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            f"{p}{attn_norm}.weight": (hidden,), f"{p}{attn}.q_proj.weight": (H * D, hidden),
            f"{p}{attn}.k_proj.weight": (G * D, hidden), f"{p}{attn}.v_proj.weight": (G * D, hidden),
            f"{p}{attn}.A": (H,), f"{p}{attn}.dt_proj.weight": (H, G * D), f"{p}{attn}.o_proj.weight": (hidden, H * D),
            f"{p}{attn_res}": (hidden,), f"{p}{ffn_norm}.weight": (hidden,), f"{p}{ffn_res}": (hidden,),
            f"{p}{ffn}.gate_proj.weight": (inter, hidden), f"{p}{ffn}.up_proj.weight": (inter, hidden),
            f"{p}{ffn}.down_proj.weight": (hidden, inter),
        })
        if moe:
            out.update(_moe_shapes(f"{p}{ffn}.", generation, hidden, router_bias))
    if lm_head:
        out["lm_head.weight"] = (V, hidden)
    return out


def _moe_shapes(p: str, generation: str, hidden: int, router_bias: bool) -> dict:
    E, K = MOE["experts"], math.isqrt(MOE["experts"])
    out = {f"{p}down_embed.weight": (E, hidden), f"{p}up_embed.weight": (E, hidden)}
    if generation in ("g1-binary-mask", "g2-jan2025"):
        out[f"{p}queries.weight"] = (MOE["heads"] * MOE["retrieval"], hidden)
        out[f"{p}keys"] = (MOE["heads"], K, 2, MOE["retrieval"] // 2)
    else:
        out[f"{p}router_gate.weight"] = (2 * K, hidden)
        if router_bias:
            out[f"{p}router_gate.bias"] = (2 * K,)
    return out


def random_tensor(name: str, shape: tuple, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """Non-degenerate values (as model.randomize_): a live dynamic mask, peaked logits."""
    if name.endswith(".A"):
        a = torch.randn(shape, generator=gen) * 0.75
        return a.abs() * torch.tensor([1.0, -1.0]).repeat(shape[0])[: shape[0]]  # both signs: G1's two regimes
    if len(shape) == 1 and not name.endswith("bias"):  # norms and residual scales
        return torch.rand(shape, generator=gen) + 0.5
    if name.endswith("bias"):
        return torch.randn(shape, generator=gen) * 0.5
    if name.endswith("keys"):
        return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    if "embed_tokens" in name or "word_embed" in name or "lm_head" in name:
        return torch.randn(shape, generator=gen) * 2.8 / math.sqrt(hidden)
    if "embed" in name:
        return torch.randn(shape, generator=gen) / math.sqrt(hidden)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def write_checkpoint(out: Path, generation: str, *, moe: bool = False, router_bias: bool = False,
                     lm_head: bool | None = None, seed: int = 0, shape: dict = TINY) -> Path:
    """config.json + model.safetensors of `generation` in `out`; returns `out`."""
    from safetensors.torch import save_file

    config = config_for(generation, shape, moe)
    lm_head = (not config.get("tie_word_embeddings", True)) if lm_head is None else lm_head
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, s, shape["hidden_size"], gen).contiguous()
               for name, s in tensor_shapes(generation, shape, moe, router_bias, lm_head).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """The references run tiny ops: one thread is ~10x faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
