"""Export wrappers: Doge's forward on explicit tensors, with the bounded keep-window state.

Both wrappers reuse transformers' modules and weights (norms, projections, MLP/CDMoE) and own only
what tracing would get wrong: attention with the dynamic mask and its keep-window, dynamic NTK
RoPE computed from the positions, and the state (DESIGN §3).

State per layer i (C slots, G KV heads, D head dim):
  key [B,G,C,D], value [B,G,C,D]  (key after k_norm and RoPE, raw value: what the cache holds)
  bias [B,G,C] float32-like       exp(A*softplus(dt_proj(v))) of the slot; dtype-min = empty
  position [B,G,C] int64          position id of the slot's token; -1 = empty
Tie rule (DESIGN §3): among equal biases the earlier position wins a place in the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import FusedLinear, fused_gate_up, fused_qkv
from .legacy.layouts import NATIVE, Layout, layout_of
from .mlp import cdmoe, dense_mlp
from .numerics import in_fp32
from .rope import ElementwiseRope, MatrixRope, RotaryFromPositions

EMPTY_POSITION = -1


def min_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def softmax_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 of the half-precision scores (+ additive mask), as transformers' eager does.

    The mask is added in the activation dtype, as in transformers. In fp16, finfo.min + a score
    below -16 overflows to -inf there, and a fully masked row (a left-padding query) becomes NaN;
    here the fp32 scores are clipped to fp16's finite range first, which changes nothing in any
    row that has a key to attend to, and keeps fully masked rows (and +inf biases) finite.
    """
    if scores.dtype == torch.float32:
        return F.softmax(scores, dim=-1, dtype=torch.float32)
    half = scores.dtype
    scores = scores.float()
    if half == torch.float16:  # bf16 spans fp32's range: its min + a score stays finite
        limit = torch.finfo(torch.float16).max
        scores = scores.clamp(-limit, limit)
    return F.softmax(scores, dim=-1)


def scale_scores(scores: torch.Tensor, D) -> torch.Tensor:
    """scores * D**-0.5. Half precision: D is read as a constant (torch 2.13's TorchScript exporter
    casts a shape-derived bf16 scale to COMPLEX128) and the product is taken in fp32 and rounded
    once, as PyTorch multiplies a half tensor by a Python float."""
    if scores.dtype == torch.float32:
        return scores * D**-0.5
    scale = float(int(D)) ** -0.5
    return in_fp32(lambda s: s * scale, scores)


def dynamic_bias(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """w = exp(A * softplus(dt)) in dt's dtype, rounded where transformers rounds it.

    transformers computes it op by op in the activation dtype (softplus, Mul, exp each rounded to
    fp16/bf16); Softplus and Exp go through in_fp32 so the graph rounds exactly once per op too.
    """
    return in_fp32(torch.exp, A * in_fp32(F.softplus, dt))


def project_qkv(attn, x: torch.Tensor, rope, layout: Layout = NATIVE, token_bias=None, qkv: FusedLinear | None = None):
    """x [B,S,hidden] -> q [B,S,H,D], k [B,S,G,D] (normed, rotated), v [B,S,G,D], w [B,G,S].

    Token-major, so a one-token step needs no transposes (heads_first gives [B,heads,S,D]).
    rope: ElementwiseRope or MatrixRope (its query may carry the attention scale). qkv: the fused
    q/k/v projection (fused.py), else the three modules. With a bias per query head (legacy
    layouts) the state heads are the H query heads: k/v are repeated per query head and w is
    [B,H,S]. `token_bias` [B,G,S], when given, replaces w (layer 0, where the bias is a function of
    the token id alone: see token_bias_table).
    """
    B, S, _ = x.shape
    D = attn.head_dim
    q, k, v_flat = qkv(x) if qkv is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    q, k, v = (t.reshape(B, S, -1, D) for t in (q, k, v_flat))
    if layout.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope.query(q), rope.key(k)
    dt = attn.dt_proj(v_flat)  # [B,S,G]
    w = dynamic_bias(attn.A, dt).transpose(-1, -2) if token_bias is None else token_bias  # [B,G,S]
    if layout.bias_heads == "query" and k.shape[2] != q.shape[2]:
        G, R = k.shape[2], q.shape[2] // k.shape[2]
        k = k[:, :, :, None].expand(B, S, G, R, D).reshape(B, S, -1, D)
        v = v[:, :, :, None].expand(B, S, G, R, D).reshape(B, S, -1, D)
    return q, k, v, w


def heads_first(*tensors: torch.Tensor):
    """[B,S,heads,D] -> [B,heads,S,D] each."""
    return tuple(t.transpose(1, 2) for t in tensors)


def keep_window(bias: torch.Tensor, visible_key: torch.Tensor, window: int) -> torch.Tensor:
    """Which keys each query row keeps: [B,G,T(query i),T(key j)] bool.

    bias [B,G,T] (dtype-min where the key is padding); visible_key [B,1,1,T].
    Key j is kept by row i iff j <= i, j is not padding, and fewer than `window` visible keys
    j' <= i beat it (larger bias, or equal bias at an earlier position): exactly a stable
    top-`window` over the row, with no shape-dependent branch and no TopK.
    """
    T = bias.shape[-1]
    idx = torch.arange(T, device=bias.device)
    earlier = idx[:, None] < idx[None, :]  # [j', j]
    bj, bjp = bias[:, :, None, :], bias[:, :, :, None]
    beats = (bjp > bj) | ((bjp == bj) & earlier)  # [B,G,j',j]
    count = torch.cumsum(beats.float(), dim=2)  # [B,G,i,j]: beaters among j' <= i
    causal = idx[None, :] <= idx[:, None]  # [i,j]
    return causal & visible_key & (count < window)


def grouped_attention(q, k, v, bias):
    """q [B,H,S,D], k/v [B,G,L,D], bias [B,G,S,L] additive -> [B,S,H*D]; softmax in fp32."""
    B, H, S, D = q.shape
    G = k.shape[1]
    q5 = q.view(B, G, H // G, S, D)
    scores = scale_scores(torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)), D) + bias.unsqueeze(2)
    probs = softmax_fp32(scores).to(q.dtype)
    out = torch.matmul(probs, v.unsqueeze(2))  # [B,G,R,S,D]
    return out.reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)


def compact_state(kept_last, k, v, w, positions, capacity: int):
    """Write the kept rows of the prompt into `capacity` slots, in position order.

    kept_last [B,G,T] bool; k/v [B,G,T,D]; w [B,G,T]; positions [B,T].
    Slot s of set (b,g) takes the s-th kept token, or an empty row: one row Gather per output
    tensor, which writes the C-slot state once (a scatter into a zeroed C-slot tensor, then a
    slice, wrote it three times: 10% of a batch-8 Doge-60M prefill). No TopK and no
    data-dependent shape.
    """
    B, G, T, D = k.shape
    rank = torch.cumsum(kept_last.long(), dim=-1) - 1
    slot = torch.where(kept_last, rank, torch.full_like(rank, capacity))  # [B,G,T]; C: dropped
    tokens = torch.arange(T, device=k.device).expand(B, G, T)
    empty = torch.full((B, G, capacity + 1), T, dtype=torch.long, device=k.device)  # token T: the empty row
    source = empty.scatter(2, slot, tokens)[:, :, :capacity]  # [B,G,C]: which token each slot takes
    rows = source + torch.arange(B * G, device=k.device).view(B, G, 1) * (T + 1)  # [B,G,C] into [B*G*(T+1)]

    def gather(x, fill):  # x [B,G,T,...] -> [B,G,C,...], slots without a token get `fill`
        padded = torch.cat((x, torch.full_like(x[:, :, :1], fill)), dim=2)  # [B,G,T+1,...]
        # indices [B,G,C] give the output its shape: no Reshape copies the (bound) output after
        return padded.reshape(B * G * (T + 1), *x.shape[3:])[rows]

    pos = positions[:, None, :].expand(B, G, T)
    return gather(k, 0), gather(v, 0), gather(w, min_value(w.dtype)), gather(pos, EMPTY_POSITION)


def prefill_attention(attn, x, rope, valid, positions, capacity, layout: Layout = NATIVE, **projection):
    """x [B,T,hidden]; valid [B,T] bool (left padding) -> (out [B,T,hidden], state tuple).
    projection: token_bias / qkv, passed on to project_qkv."""
    q, k, v, w = project_qkv(attn, x, rope, layout, **projection)
    q, k, v = heads_first(q, k, v)
    minv = min_value(x.dtype)
    visible_key = valid[:, None, None, :]
    bias = torch.where(valid[:, None, :], w, torch.full_like(w, minv))  # [B,G,T]
    kept = keep_window(bias, visible_key, attn.keep_window_size)
    mask = torch.where(kept, bias[:, :, None, :], torch.full_like(bias[:, :, None, :], minv))
    out = attn.o_proj(grouped_attention(q, k, v, mask))
    state = compact_state(kept[:, :, -1, :], k, v, bias, positions, capacity)
    return out, state


def evict_slot(bias, position, new_bias, slot_index=None):
    """One step of the eviction rule, per batch row and KV head.

    bias/position [B,G,S], new_bias [B,G,1], slot_index [S] (arange(S); given once for all layers)
    -> slot [B,G,1] int64 (-1: the new token lost), slot_mask [B,G,S] bool (slot excluded from this
    step), new_wins [B,G,1] bool.
    Among the S slots and the new token the smallest bias is left out; among equal biases the
    latest position loses, and the new token is always the latest; among empty slots (equal bias
    and position) the first. (keepdim and scalar fills throughout: no Unsqueeze nodes, and no
    shape arithmetic on the symbolic slot dim, in the step graph.)
    """
    smallest = bias.min(dim=-1, keepdim=True).values  # [B,G,1]
    candidates = torch.where(bias == smallest, position, position.new_full((), -2))
    victim = candidates.argmax(dim=-1, keepdim=True)  # latest position among the smallest
    new_wins = new_bias > smallest
    slot = torch.where(new_wins, victim, victim.new_full((), -1))
    if slot_index is None:
        slot_index = torch.arange(bias.shape[-1], device=bias.device)
    slot_mask = (slot_index == victim) & new_wins
    return slot, slot_mask, new_wins


def step_attention(attn, x, rope, past, layout: Layout = NATIVE, slot_index=None, **projection):
    """x [B,1,hidden]; past = (key, value, bias, position) -> (out, (new_k, new_v, new_b, slot)).

    The cache is only read: scores against the S slots and against the new key are softmaxed
    together (S+1 numbers per head) and only the new row comes back. S is symbolic (any first S
    slots of the C, see spec.py), so nothing here reshapes along it. Each query head meets the
    cache in its own one-row MatMul ([B,G,R,1,D] x [B,G,1,D,S]): ONNX Runtime's CPU GEMM then
    streams K and V in place (its M=1 kernels) instead of packing a copy of them per call, which
    it does for a [R,D] x [D,S] product. rope (MatrixRope) folds the 1/sqrt(D) into q in fp32.
    """
    key, value, bias, position = past
    q, k, v, w = project_qkv(attn, x, rope, layout, **projection)  # q [B,1,H,D], k/v [B,1,G,D], w [B,G,1]
    B, _, H, D = q.shape
    G = k.shape[2]  # from k, not the cache: a Shape of the cache would not fold (symbolic S)
    minv = bias.new_full((), min_value(x.dtype))
    slot, slot_mask, new_wins = evict_slot(bias, position, w, slot_index)
    slot_bias = torch.where(slot_mask, minv, bias)  # [B,G,S]
    own_bias = torch.where(new_wins, w, minv)  # [B,G,1]
    q5 = q.view(B, G, H // G, 1, D)  # S = 1: token-major is head-major
    k5, v5 = k.view(B, G, 1, 1, D), v.view(B, G, 1, 1, D)
    scores_cache = scaled(torch.matmul(q5, key.unsqueeze(2).transpose(-1, -2)), D, rope)  # [B,G,R,1,S]
    scores_own = scaled(own_score(q5, k5), D, rope)  # [B,G,R,1,1]
    biases = torch.cat((slot_bias, own_bias), dim=-1).view(B, G, 1, 1, -1)  # [B,G,1,1,S+1]
    probs = softmax_fp32(torch.cat((scores_cache, scores_own), dim=-1) + biases).to(q.dtype)
    out = torch.matmul(probs[..., :-1], value.unsqueeze(2)) + probs[..., -1:] * v5  # [B,G,R,1,D]
    out = attn.o_proj(out.reshape(B, 1, H * D))
    return out, (k[:, 0], v[:, 0], w[..., 0], slot[..., 0])


def scaled(scores: torch.Tensor, D, rope) -> torch.Tensor:
    """scores * D**-0.5, unless the rope already folded the scale into q."""
    return scores if rope.query_scaled else scale_scores(scores, D)


def own_score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [..., 1, D] . k [..., 1, D] -> [..., 1, 1]. In half precision a MatMul, which accumulates
    in fp32 like transformers' q @ k^T; a half Mul + ReduceSum would round every product."""
    if q.dtype == torch.float32:
        return (q * k).sum(-1, keepdim=True)
    return torch.matmul(q, k.transpose(-1, -2))


@torch.no_grad()
def token_bias_table(model) -> torch.Tensor:
    """Layer 0's dynamic-mask bias of every token id: [V, bias heads].

    In layer 0, v = v_proj(input_layernorm(embedding)) has no position in it, so the bias is a
    function of the token id, and repeated tokens must tie exactly (DESIGN §3). Computed per
    position by GEMMs of different shapes (prompt vs step, growing caches), the same token's bias
    comes out an ulp apart (measured in torch: 1.04512882 vs 1.04512894), and which repeat keeps
    its place would then depend on kernel tiling. One table row per token makes the tie exact.
    """
    layer = model.model.layers[0]
    attn = layer.self_attn
    embedding = model.model.embed_tokens.weight  # [V, hidden]
    v = attn.v_proj(layer.input_layernorm(embedding[None]))  # [1, V, G*D]
    return dynamic_bias(attn.A, attn.dt_proj(v))[0]  # [V, G]


class DogeGraph(nn.Module):
    """Shared pieces of both wrappers: embedding, layers' non-attention parts, lm_head."""

    def __init__(self, model, max_context: int | None = None):
        super().__init__()
        self.model = model
        self.config = model.config
        self.rotary = RotaryFromPositions(model.config, max_context)
        self.layout = layout_of(model)  # native, or the legacy generation's (legacy/layouts.py)
        self.tied = model.lm_head.weight is model.model.embed_tokens.weight
        if self.tied:
            # One [hidden, vocab] matrix serves the lm_head MatMul and the embedding Gather
            # (axis 1), so the exported graph holds the tied weight once.
            self.lm_weight_t = nn.Parameter(model.lm_head.weight.detach().t().contiguous())
        self.layer0_bias = nn.Parameter(token_bias_table(model), requires_grad=False)  # [V, G]
        layers = self.layers()
        # fused projections (fused.py) per layer index, where the modules allow it
        self.qkv = nn.ModuleDict({str(i): f for i, l in enumerate(layers) if (f := fused_qkv(l.self_attn))})
        self.gate_up = nn.ModuleDict({str(i): f for i, l in enumerate(layers) if (f := fused_gate_up(l.mlp))})

    def projection(self, layer_index: int, input_ids: torch.Tensor) -> dict:
        """project_qkv's keyword arguments for this layer: token_bias (layer 0), qkv (fused)."""
        extra = {"qkv": self.qkv[str(layer_index)]} if str(layer_index) in self.qkv else {}
        if (bias := self.token_bias(layer_index, input_ids)) is not None:
            extra["token_bias"] = bias
        return extra

    def token_bias(self, layer_index: int, input_ids: torch.Tensor):
        """[B,G,S] bias of layer 0 looked up by token id; None for the other layers (computed)."""
        if layer_index != 0 or self.layout.mask == "binary":
            return None
        return self.layer0_bias[input_ids].transpose(-1, -2)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tied:
            return self.model.model.embed_tokens(input_ids)
        B, S = input_ids.shape
        cols = self.lm_weight_t.index_select(1, input_ids.reshape(-1))  # [hidden, B*S]
        return cols.t().reshape(B, S, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden [..., hidden] -> [..., vocab]
        if self.tied:
            return torch.matmul(hidden, self.lm_weight_t)
        return self.model.lm_head(hidden)

    def mlp(self, layer_index: int, layer, h: torch.Tensor) -> torch.Tensor:
        x = layer.post_attention_layernorm(h)
        gate_up = self.gate_up[str(layer_index)] if str(layer_index) in self.gate_up else None
        if not self.config.is_moe:
            out = dense_mlp(layer.mlp, x, gate_up)
        elif self.layout.moe == "multihead":
            from .legacy.export import multihead_cdmoe

            out = multihead_cdmoe(layer.mlp, x, gate_up)
        else:
            out = cdmoe(layer.mlp, x, gate_up)
        return layer.post_attention_residual * h + out

    def attention(self):
        """(prefill, step) attention functions of this layout."""
        if self.layout.mask == "binary":
            from .legacy.export import binary_prefill_attention, binary_step_attention

            return binary_prefill_attention, binary_step_attention
        return prefill_attention, step_attention

    def layers(self):
        return self.model.model.layers[: self.config.num_hidden_layers]


class PrefillWrapper(DogeGraph):
    """(input_ids, attention_mask, position_ids) [B,T] int64 -> logits, then 4 state tensors per layer.

    logits are [B,V] for the last position, or [B,T,V] with full_logits.
    """

    def __init__(self, model, capacity: int, full_logits: bool = False, max_context: int | None = None):
        super().__init__(model, max_context)
        self.capacity = capacity
        self.full_logits = full_logits

    def forward(self, input_ids, attention_mask, position_ids):
        h = self.embed(input_ids)
        rope = ElementwiseRope(*self.rotary(position_ids, h.dtype))
        valid = attention_mask.bool()
        states = []
        attention = self.attention()[0]
        for i, layer in enumerate(self.layers()):
            attn_in = layer.input_layernorm(h)
            out, state = attention(layer.self_attn, attn_in, rope, valid, position_ids, self.capacity, self.layout,
                                   **self.projection(i, input_ids))
            h = layer.input_residual * h + out
            h = self.mlp(i, layer, h)
            states.extend(state)
        h = self.model.model.norm(h)
        logits = self.logits(h if self.full_logits else h[:, -1])
        return (logits, *states)


class StepWrapper(DogeGraph):
    """(input_ids, position_ids) [B,1] int64 + 4 state tensors per layer -> logits [B,V], then
    per layer the new row: key [B,G,D], value [B,G,D], bias [B,G], slot [B,G] int64 (-1 = none)."""

    def forward(self, input_ids, position_ids, *past):
        h = self.embed(input_ids)
        rope = MatrixRope(*self.rotary(position_ids, h.dtype), fold_scale=h.dtype == torch.float32)
        rows = []
        attention = self.attention()[1]
        # arange(S) once for every layer's eviction rule (S: the symbolic slot dim)
        extra = {} if self.layout.mask == "binary" else {"slot_index": torch.arange(past[2].shape[-1])}
        for i, layer in enumerate(self.layers()):
            attn_in = layer.input_layernorm(h)
            out, row = attention(layer.self_attn, attn_in, rope, past[4 * i : 4 * i + 4], self.layout,
                                 **extra, **self.projection(i, input_ids))
            h = layer.input_residual * h + out
            h = self.mlp(i, layer, h)
            rows.extend(row)
        h = self.model.model.norm(h)
        return (self.logits(h[:, 0]), *rows)
