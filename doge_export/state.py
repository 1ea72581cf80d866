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
        # flat views for write_rows: key/value [L*B*G*C, D], bias/position [L*B*G*C]
        self._flat = {f: a.reshape(-1, D) if a.ndim == 5 else a.reshape(-1) for f, a in self.stacked.items()}
        sets = np.arange(info.num_layers * batch * G)
        self._set_start = sets * C  # first flat slot of each (layer, batch row, head) set
        self._set_row = sets // G % batch  # its batch row
        self.clear()

    def clear(self) -> None:
        self.stacked["key"].fill(0)
        self.stacked["value"].fill(0)
        self.stacked["bias"].fill(dtype_min(self.stacked["bias"].dtype))
        self.stacked["position"].fill(EMPTY_POSITION)

    def write_rows(self, rows, position_ids: np.ndarray) -> None:
        """rows: the step's outputs (RowBuffers, or a dict by name); position_ids [B,1].

        Writes each winning row into its slot, for every layer, batch row and KV head at once:
        the (layer, row, head) slot sets are numbered 0..L*B*G-1 and indexed flat.
        """
        rows = rows.stacked if isinstance(rows, RowBuffers) else {
            f: np.stack([rows[f"{f}.{i}"] for i in range(self.info.num_layers)]) for f in ROW_FIELDS}
        slot = rows["slot"].reshape(-1)  # [L*B*G]
        won = np.flatnonzero(slot >= 0)
        target = self._set_start[won] + slot[won]  # flat slot index in [L*B*G*C]
        state = self._flat
        state["key"][target] = rows["new_key"].reshape(len(slot), -1)[won]
        state["value"][target] = rows["new_value"].reshape(len(slot), -1)[won]
        state["bias"][target] = rows["new_bias"].reshape(-1)[won]
        state["position"][target] = position_ids.reshape(-1)[self._set_row[won]]

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
