"""The reference runner: transformers' DogeForCausalLM (eager) with its own growing cache.

It drives the model exactly as `generate()` does (one prefill call, then one call per token with
the attention mask extended by one), so it is also a fallback runtime.
"""

from __future__ import annotations

import numpy as np
import torch

from ..reference import make_topk_stable, reset_rotary
from ..spec import ModelInfo
from .base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model, info: ModelInfo, *, stable_topk: bool = False, tie_log: list | None = None):
        super().__init__(info)
        self.model = model.eval()
        if stable_topk:
            make_topk_stable(self.model, tie_log)
        self.cache = None
        self.mask = None

    @torch.no_grad()
    def _prefill(self, input_ids, attention_mask, position_ids):
        reset_rotary(self.model)
        self.mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        out = self.model(
            input_ids=torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
            attention_mask=self.mask,
            position_ids=torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1].float().numpy()

    @torch.no_grad()
    def _step(self, input_ids, position_ids):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        out = self.model(
            input_ids=torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
            attention_mask=self.mask,
            position_ids=torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1].float().numpy()

    @torch.no_grad()
    def state_rows(self, input_ids, attention_mask, capacity: int) -> dict[str, np.ndarray]:
        """The bounded state the artifact must hold after prefill, built from this runner's cache.

        Per layer: the rows a stable top-`capacity` (earlier position wins) over the valid keys'
        biases keeps, in position order; the rest of the C slots empty.
        """
        mask = torch.from_numpy(np.asarray(attention_mask)).bool()
        positions = torch.from_numpy(np.where(attention_mask == 1, np.cumsum(attention_mask, -1) - 1, 0))
        out = {}
        for i, layer in enumerate(self.model.model.layers):
            attn, cached = layer.self_attn, self.cache.layers[i]
            k, v = cached.keys, cached.values  # [B,G,T,D]
            B, G, T, D = k.shape
            dt = attn.dt_proj(v.transpose(1, 2).reshape(B, T, -1))
            w = torch.exp(attn.A * torch.nn.functional.softplus(dt)).transpose(-1, -2)  # [B,G,T]
            w = torch.where(mask[:, None, :], w, torch.finfo(w.dtype).min)
            order = torch.sort(w, dim=-1, descending=True, stable=True).indices[..., :capacity]
            keep = torch.zeros_like(mask[:, None, :].expand(B, G, T)).scatter(-1, order, True) & mask[:, None, :]
            key = np.zeros((B, G, capacity, D), np.float32)
            value, bias = np.zeros_like(key), np.full((B, G, capacity), np.finfo(np.float32).min, np.float32)
            position = np.full((B, G, capacity), -1, np.int64)
            for b in range(B):
                for g in range(G):
                    idx = torch.nonzero(keep[b, g]).flatten()
                    n = len(idx)
                    key[b, g, :n], value[b, g, :n] = k[b, g, idx].numpy(), v[b, g, idx].numpy()
                    bias[b, g, :n], position[b, g, :n] = w[b, g, idx].numpy(), positions[b, idx].numpy()
            out.update({f"key.{i}": key, f"value.{i}": value, f"bias.{i}": bias, f"position.{i}": position})
        return out
