"""The graph contract as data (DESIGN §3): names, dtypes and symbolic shapes of both graphs.

Export, runners, validation, TensorRT profiles and the manifest all read it from here.
Symbolic dims: "batch" (B), "prompt" (T) and the step's "slots" (S); every other dim is fixed by
the artifact. State per layer i: key.i / value.i [B,G,C,D], bias.i [B,G,C], position.i [B,G,C]
int64 as prefill writes it; the step reads any first S slots of each (B,G) slot set, 1 <= S <= C,
which gives the same result as all C while slots S..C-1 are empty and at least one of the S is
(docs/runtime-contract.md §4): a runtime attends over the filled part only.
The step returns per layer the new row and where it goes: new_key.i / new_value.i [B,G,D],
new_bias.i [B,G], slot.i [B,G] int64 (-1: the new token lost and nothing is written).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATE_FIELDS = ("key", "value", "bias", "position")
ROW_FIELDS = ("new_key", "new_value", "new_bias", "slot")
EMPTY_POSITION = -1
BATCH, PROMPT, SLOTS = "batch", "prompt", "slots"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, bfloat16, int64
    shape: tuple  # ints and symbolic dim names


@dataclass(frozen=True)
class ModelInfo:
    """What a runtime must know about an artifact, independent of the backend."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    capacity: int  # C = min(max_context, keep_window_size) state slots
    keep_window_size: int
    max_prompt: int  # longest (padded) prompt prefill accepts
    max_context: int  # longest padded prompt + generated tokens
    dtype: str = "float32"  # activation / key / value dtype of the graphs
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    full_logits: bool = False  # prefill returns [B,T,V] instead of [B,V]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        d = dict(d)
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)


def state_names(layer: int) -> tuple[str, ...]:
    return tuple(f"{field}.{layer}" for field in STATE_FIELDS)


def row_names(layer: int) -> tuple[str, ...]:
    return tuple(f"{field}.{layer}" for field in ROW_FIELDS)


def state_specs(info: ModelInfo, slots: int | str | None = None) -> list[TensorSpec]:
    """Per layer key, value, bias, position; slots: the slot dim (default C, the prefill's)."""
    G, C, D = info.num_kv_heads, info.capacity if slots is None else slots, info.head_dim
    specs = []
    for i in range(info.num_layers):
        key, value, bias, position = state_names(i)
        specs += [
            TensorSpec(key, info.dtype, (BATCH, G, C, D)),
            TensorSpec(value, info.dtype, (BATCH, G, C, D)),
            TensorSpec(bias, info.dtype, (BATCH, G, C)),
            TensorSpec(position, "int64", (BATCH, G, C)),
        ]
    return specs


def row_specs(info: ModelInfo) -> list[TensorSpec]:
    G, D = info.num_kv_heads, info.head_dim
    specs = []
    for i in range(info.num_layers):
        key, value, bias, slot = row_names(i)
        specs += [
            TensorSpec(key, info.dtype, (BATCH, G, D)),
            TensorSpec(value, info.dtype, (BATCH, G, D)),
            TensorSpec(bias, info.dtype, (BATCH, G)),
            TensorSpec(slot, "int64", (BATCH, G)),
        ]
    return specs


def prefill_inputs(info: ModelInfo) -> list[TensorSpec]:
    return [TensorSpec(n, "int64", (BATCH, PROMPT)) for n in ("input_ids", "attention_mask", "position_ids")]


def prefill_outputs(info: ModelInfo) -> list[TensorSpec]:
    shape = (BATCH, PROMPT, info.vocab_size) if info.full_logits else (BATCH, info.vocab_size)
    return [TensorSpec("logits", "float32" if info.dtype == "float32" else info.dtype, shape)] + state_specs(info)


def step_inputs(info: ModelInfo) -> list[TensorSpec]:
    ids = [TensorSpec(n, "int64", (BATCH, 1)) for n in ("input_ids", "position_ids")]
    return ids + state_specs(info, SLOTS)


def step_outputs(info: ModelInfo) -> list[TensorSpec]:
    logits_dtype = "float32" if info.dtype == "float32" else info.dtype
    return [TensorSpec("logits", logits_dtype, (BATCH, info.vocab_size))] + row_specs(info)


def graph_specs(info: ModelInfo) -> dict[str, dict[str, list[TensorSpec]]]:
    return {
        "prefill": {"inputs": prefill_inputs(info), "outputs": prefill_outputs(info)},
        "step": {"inputs": step_inputs(info), "outputs": step_outputs(info)},
    }


def spec_to_json(specs: list[TensorSpec]) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]
