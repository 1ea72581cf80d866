"""Load a G1..G4 checkpoint folder into the legacy reference, under the checkpoint's own names.

lm_head is tied to the embedding when the checkpoint has none (or its config says tie): legacy
configs often omit the key although the models were trained tied (facts §7.2). router_gate.bias is
kept when present (Mar/Apr 2025 MoE checkpoints, facts §2). Every other missing or unexpected
tensor is refused with its name: nothing is initialised at random, nothing is silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DogeExportError
from .config import legacy_config
from .layouts import LAYOUTS
from .model import LegacyDogeForCausalLM

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old saves carry


def moe_kind(shapes: dict) -> str | None:
    """"router" | "multihead" | None (dense), from the feed-forward tensor names."""
    if any(k.endswith("router_gate.weight") for k in shapes):
        return "router"
    if any(k.endswith("feed_forward.queries.weight") for k in shapes):
        return "multihead"
    return None


def build_legacy(raw: dict, generation: str, shapes: dict) -> LegacyDogeForCausalLM:
    """An uninitialised legacy model whose parameters have the checkpoint's names and shapes."""
    config = legacy_config(raw, generation, moe_kind=moe_kind(shapes))
    router_bias = any(k.endswith("router_gate.bias") for k in shapes)
    tied = "lm_head.weight" not in shapes or config.tie_word_embeddings
    return LegacyDogeForCausalLM(config, LAYOUTS[generation], router_bias=router_bias, tied=tied)


def read_state_dict(path: Path, use_safetensors: bool) -> dict[str, torch.Tensor]:
    state = {}
    if use_safetensors:
        from safetensors.torch import load_file

        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(str(f)))
    else:
        for f in sorted(path.glob("*.bin")):
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def load_legacy(path: Path, raw: dict, generation: str, shapes: dict, use_safetensors: bool) -> LegacyDogeForCausalLM:
    model = build_legacy(raw, generation, shapes)
    state = {k: v for k, v in read_state_dict(path, use_safetensors).items() if not k.endswith(IGNORED_SUFFIXES)}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied:
        state.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DogeExportError(
            f"'{path}' does not fit the {generation} layout its names suggest: "
            f"{str(exc).splitlines()[-1].strip()}; refusing to guess"
        ) from None
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise DogeExportError(
            f"'{path}' does not match the {generation} layout: missing {missing[:6] or 'none'}, "
            f"unexpected {result.unexpected_keys[:6] or 'none'}. Nothing was loaded at random; "
            "please open an issue with the checkpoint's key list"
        )
    return model.float().eval()
