"""The PyTorch reference for legacy Doge generations (G1..G4): the checkpoint's own names, our code.

`LegacyDogeForCausalLM` holds the parameters under the names the checkpoint uses (word_embed,
pre_layernorm, pre_residual.weight, feed_forward.router_gate.bias, ...) and answers to the native
names the export wrappers read (embed_tokens, input_layernorm, input_residual, mlp, ...) through
aliases. Its forward is driven like transformers' model by the torch runner: (input_ids,
attention_mask, position_ids, cache) -> an output with .logits and .cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import LegacyConfig
from .layouts import Layout
from .modules import Attention, DenseMLP, MultiHeadCDMoE, Residual, RMSNorm, RouterCDMoE, Rotary


class _Aliased(nn.Module):
    """Resolves native names (self.aliases: native -> dotted checkpoint name) to the registered ones."""

    def __getattr__(self, name):
        aliases = self.__dict__.get("aliases") or {}
        if name in aliases and aliases[name] != name:
            obj = self
            for part in aliases[name].split("."):
                obj = getattr(obj, part)
            return obj
        return super().__getattr__(name)

    def _register(self, native: str, value) -> None:
        """Register `value` under the checkpoint's name for `native` (a module, or a Residual)."""
        actual = self.aliases[native].split(".")[0]
        if isinstance(value, nn.Parameter):
            self.register_parameter(actual, value)
        else:
            self.add_module(actual, value)


class DecoderLayer(_Aliased):
    def __init__(self, config: LegacyConfig, layout: Layout, router_bias: bool):
        super().__init__()
        self.aliases = {k: v for k, v in layout.names.items() if k not in ("embed_tokens", "norm")}
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self._register("input_layernorm", RMSNorm(hidden, eps))
        self._register("self_attn", Attention(config, layout))
        self._register("post_attention_layernorm", RMSNorm(hidden, eps))
        self._register("mlp", _ffn(config, layout, router_bias))
        for native in ("input_residual", "post_attention_residual"):
            dotted = self.aliases[native]
            self._register(native, Residual(hidden) if "." in dotted else nn.Parameter(torch.ones(hidden)))

    def forward(self, h, cos, sin, allowed, cached):
        out = self.self_attn(self.input_layernorm(h), cos, sin, allowed, cached)
        h = self.input_residual * h + out
        return self.post_attention_residual * h + self.mlp(self.post_attention_layernorm(h))


def _ffn(config: LegacyConfig, layout: Layout, router_bias: bool) -> nn.Module:
    if not config.is_moe:
        return DenseMLP(config)
    return RouterCDMoE(config, router_bias) if layout.moe == "router" else MultiHeadCDMoE(config)


class Backbone(_Aliased):
    def __init__(self, config: LegacyConfig, layout: Layout, router_bias: bool):
        super().__init__()
        self.aliases = {"embed_tokens": layout.names["embed_tokens"], "norm": layout.names["norm"]}
        self._register("embed_tokens", nn.Embedding(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, layout, router_bias) for _ in range(config.num_hidden_layers))
        self._register("norm", RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.rotary_emb = Rotary(config)


@dataclass
class CacheLayer:
    """One layer's growing cache. The dynamic-mask value w of each position is cached with its
    key and value, computed once when the position enters: w depends on that position's v only
    (facts §1.7), and recomputing it over the whole cache every step, as the original code does,
    changes it by an ulp from one step to the next (GEMM blocking depends on the cache length),
    which breaks the exact ties of repeated tokens at random instead of by the tie rule. (A token
    seen in the prompt and again in a step still differs by an ulp: prefill and step project it in
    GEMMs of different shapes, in PyTorch as in ONNX Runtime.)"""

    keys: torch.Tensor | None = None  # [B,G,L,D]: k after RoPE
    values: torch.Tensor | None = None  # [B,G,L,D]: raw v
    bias: torch.Tensor | None = None  # [B,H,L]: w = exp(A * softplus(dt_proj(v)))

    def update(self, k, v, w):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        self.bias = w if self.bias is None else torch.cat([self.bias, w], dim=2)
        return self.keys, self.values, self.bias


class Cache:
    """The growing cache of generate(): every position, padding included."""

    def __init__(self, num_layers: int):
        self.layers = [CacheLayer() for _ in range(num_layers)]

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]


@dataclass
class Output:
    logits: torch.Tensor
    cache: Cache


def allowed_keys(attention_mask: torch.Tensor, past: int, S: int) -> torch.Tensor:
    """[B, past+S] 0/1 -> [B,1,S,past+S] bool: key j visible to query i (causal and not padding)."""
    L = attention_mask.shape[1]
    query = torch.arange(past, past + S)[:, None]
    causal = torch.arange(L)[None, :] <= query
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class LegacyDogeForCausalLM(nn.Module):
    def __init__(self, config: LegacyConfig, layout: Layout, *, router_bias: bool = False, tied: bool = True):
        super().__init__()
        self.config, self.layout = config, layout
        self.model = Backbone(config, layout, router_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Cache | None = None,
                use_cache: bool = True, logits_to_keep: int = 0, **_) -> Output:
        B, S = input_ids.shape
        cache = cache if cache is not None else Cache(len(self.model.layers))
        past = cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(B, past + S, dtype=torch.int64)
        if position_ids is None:
            position_ids = torch.arange(past, past + S)[None].expand(B, S)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(h, position_ids)
        allowed = allowed_keys(attention_mask, past, S)
        for layer, cached in zip(self.model.layers, cache.layers):
            h = layer(h, cos, sin, allowed, cached)
        h = self.model.norm(h)
        return Output(self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h), cache)
