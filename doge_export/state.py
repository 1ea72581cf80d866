"""The runtime's state buffers (numpy) and the row write of the step (DESIGN §3).

Buffers are allocated once per batch size and never move: ONNX Runtime binds them once, prefill
writes into them, and each step only writes the new row of each layer into its slot.
"""

from __future__ import annotations

import numpy as np

from .spec import EMPTY_POSITION, ModelInfo, row_names, state_names


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class StateBuffers:
    """Per layer: key/value [B,G,C,D], bias [B,G,C], position [B,G,C] int64, all C-contiguous."""

    def __init__(self, info: ModelInfo, batch: int):
        self.info = info
        self.batch = batch
        dtype = numpy_dtype(info.dtype)
        G, C, D = info.num_kv_heads, info.capacity, info.head_dim
        self.arrays: dict[str, np.ndarray] = {}
        for i in range(info.num_layers):
            key, value, bias, position = state_names(i)
            self.arrays[key] = np.zeros((batch, G, C, D), dtype)
            self.arrays[value] = np.zeros((batch, G, C, D), dtype)
            self.arrays[bias] = np.zeros((batch, G, C), dtype)
            self.arrays[position] = np.zeros((batch, G, C), np.int64)
        self.clear()

    def clear(self) -> None:
        for i in range(self.info.num_layers):
            key, value, bias, position = (self.arrays[n] for n in state_names(i))
            key.fill(0)
            value.fill(0)
            bias.fill(dtype_min(bias.dtype))
            position.fill(EMPTY_POSITION)

    def write_rows(self, rows: dict[str, np.ndarray], position_ids: np.ndarray) -> None:
        """rows: the step's outputs; position_ids [B,1]. Writes each winning row into its slot."""
        positions = position_ids[:, 0]
        for i in range(self.info.num_layers):
            new_key, new_value, new_bias, slot = (rows[n] for n in row_names(i))
            b, g = np.nonzero(slot >= 0)
            s = slot[b, g]
            key, value, bias, position = (self.arrays[n] for n in state_names(i))
            key[b, g, s] = new_key[b, g]
            value[b, g, s] = new_value[b, g]
            bias[b, g, s] = new_bias[b, g]
            position[b, g, s] = positions[b]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def dtype_min(dtype: np.dtype) -> float:
    if dtype.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    return float(np.finfo(dtype).min)
