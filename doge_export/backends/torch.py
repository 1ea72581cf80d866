"""The reference runner: transformers' DogeForCausalLM (eager) with its own growing cache, or, for
a legacy generation, our reference of it (doge_export.legacy), driven the same way.

It drives the model exactly as `generate()` does (one prefill call, then one call per token with
the attention mask extended by one), so it is also a fallback runtime.
"""

from __future__ import annotations

import numpy as np
import torch

from ..legacy.layouts import layout_of
from ..legacy.state import cached_state
from ..reference import make_topk_stable, reset_rotary, set_token_ids
from ..spec import ModelInfo
from .base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model, info: ModelInfo, *, stable_topk: bool = False, tie_log: list | None = None):
        super().__init__(info)
        self.model = model.eval()
        if stable_topk:
            make_topk_stable(self.model, tie_log)
        layout = layout_of(model)
        self.description = ("transformers DogeForCausalLM (eager attention)" if layout.generation == "native"
                            else f"our PyTorch reference of the {layout.generation} generation (doge_export.legacy)")
        if layout.keep_window:
            self.description += " with a stable keep-window top-k" if stable_topk else " with torch.topk"
        self.cache = None
        self.mask = None
        self.ids = None  # every token fed so far [B, L] (the stable reference's layer-0 lookup)

    def _track(self, input_ids) -> torch.Tensor:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=-1)
        set_token_ids(self.model, self.ids)
        return ids

    @torch.no_grad()
    def _prefill(self, input_ids, attention_mask, position_ids):
        reset_rotary(self.model)
        self.ids = None
        input_ids = self._track(input_ids)
        self.mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64))
        out = self.model(
            input_ids=input_ids,
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
            input_ids=self._track(input_ids),
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
        biases keeps, in position order; the rest of the C slots empty. G1 (binary mask) keeps
        every prompt row, padding included, with its 0/dtype-min mask value as the bias.
        """
        mask = torch.from_numpy(np.asarray(attention_mask)).bool()
        positions = torch.from_numpy(np.where(attention_mask == 1, np.cumsum(attention_mask, -1) - 1, 0))
        out = {}
        for i in range(len(self.model.model.layers)):
            k, v, w, keep_all = cached_state(self.model, self.cache, i, mask)
            keep = torch.ones_like(w, dtype=torch.bool) if keep_all else _stable_top(w, capacity) & mask[:, None, :]
            rows = _slots(k, v, w, positions, keep, capacity)
            out.update({f"{name}.{i}": a for name, a in zip(("key", "value", "bias", "position"), rows)})
        return out


def _stable_top(w: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B,S,T] -> bool: the `capacity` largest per row, the earlier position winning ties."""
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices[..., :capacity]
    return torch.zeros_like(w, dtype=torch.bool).scatter(-1, order, True)


def _slots(k, v, w, positions, keep, capacity: int):
    """The kept rows in position order in `capacity` slots; the rest empty (bias min, position -1)."""
    B, S, T, D = k.shape
    key = np.zeros((B, S, capacity, D), np.float32)
    value, bias = np.zeros_like(key), np.full((B, S, capacity), np.finfo(np.float32).min, np.float32)
    position = np.full((B, S, capacity), -1, np.int64)
    for b in range(B):
        for s in range(S):
            idx = torch.nonzero(keep[b, s]).flatten()
            n = len(idx)
            key[b, s, :n], value[b, s, :n] = k[b, s, idx].float().numpy(), v[b, s, idx].float().numpy()
            bias[b, s, :n], position[b, s, :n] = w[b, s, idx].float().numpy(), positions[b, idx].numpy()
    return key, value, bias, position
