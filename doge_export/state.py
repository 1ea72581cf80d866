"""The runtime's state buffers (numpy) and the row write of the step (DESIGN §3).

Buffers are allocated once per batch size and never move: ONNX Runtime binds them once, prefill
writes into them, and each step only writes the new row of each layer into its slot.
"""

from __future__ import annotations

import numpy as np

from .spec import EMPTY_POSITION, ROW_FIELDS, ModelInfo


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _stacked(info: ModelInfo, batch: int, shapes: dict) -> tuple[dict, dict]:
    """One [L, ...] array per field, and per layer a C-contiguous view named `field.i`."""
    stacked = {f: np.zeros((info.num_layers, batch, *shape), dtype) for f, (shape, dtype) in shapes.items()}
    views = {f"{f}.{i}": a[i] for f, a in stacked.items() for i in range(info.num_layers)}
    return stacked, views


class StateBuffers:
    """Per layer: key/value [B,G,C,D], bias [B,G,C], position [B,G,C] int64, all C-contiguous.

    The layers of a field are views of one [L, B, ...] array, so the step's row write is a
    handful of numpy operations for all layers together.
    """

    def __init__(self, info: ModelInfo, batch: int):
        self.info = info
        self.batch = batch
        dtype = numpy_dtype(info.dtype)
        G, C, D = info.num_kv_heads, info.capacity, info.head_dim
        shapes = {"key": ((G, C, D), dtype), "value": ((G, C, D), dtype), "bias": ((G, C), dtype),
                  "position": ((G, C), np.int64)}
        self.stacked, self.arrays = _stacked(info, batch, shapes)
        self.clear()

    def clear(self) -> None:
        self.stacked["key"].fill(0)
        self.stacked["value"].fill(0)
        self.stacked["bias"].fill(dtype_min(self.stacked["bias"].dtype))
        self.stacked["position"].fill(EMPTY_POSITION)

    def write_rows(self, rows, position_ids: np.ndarray) -> None:
        """rows: the step's outputs (RowBuffers, or a dict by name); position_ids [B,1].

        Writes each winning row into its slot, for every layer, batch row and KV head at once.
        """
        rows = rows.stacked if isinstance(rows, RowBuffers) else {
            f: np.stack([rows[f"{f}.{i}"] for i in range(self.info.num_layers)]) for f in ROW_FIELDS}
        slot = rows["slot"]  # [L,B,G]
        layer, b, g = np.nonzero(slot >= 0)
        s = slot[layer, b, g]
        state = self.stacked
        state["key"][layer, b, g, s] = rows["new_key"][layer, b, g]
        state["value"][layer, b, g, s] = rows["new_value"][layer, b, g]
        state["bias"][layer, b, g, s] = rows["new_bias"][layer, b, g]
        state["position"][layer, b, g, s] = position_ids[b, 0]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.stacked.values())


class RowBuffers:
    """The step's outputs per layer, new_key/new_value [B,G,D], new_bias [B,G], slot [B,G] int64:
    views of one [L, ...] array per field, bound once as the step's outputs."""

    def __init__(self, info: ModelInfo, batch: int):
        dtype = numpy_dtype(info.dtype)
        G, D = info.num_kv_heads, info.head_dim
        shapes = {"new_key": ((G, D), dtype), "new_value": ((G, D), dtype), "new_bias": ((G,), dtype),
                  "slot": ((G,), np.int64)}
        self.stacked, self.arrays = _stacked(info, batch, shapes)


def dtype_min(dtype: np.dtype) -> float:
    if dtype.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    return float(np.finfo(dtype).min)
