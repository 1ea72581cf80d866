"""The runtime's state buffers (numpy) and the row write of the step (DESIGN §3).

Buffers are allocated once per batch size and never move: ONNX Runtime binds them once, prefill
writes into them, and each step only writes the new row of each layer into its slot.
"""

from __future__ import annotations

import numpy as np

from .spec import EMPTY_POSITION, ModelInfo


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _layer_views(field: str, stacked: np.ndarray) -> dict:
    """`field.i` -> stacked[i]: C-contiguous per layer."""
    return {f"{field}.{i}": stacked[i] for i in range(stacked.shape[0])}


class StateBuffers:
    """Per layer: key/value [B,G,C,D], bias [B,G,C], position [B,G,C] int64, all C-contiguous.

    Memory layout (what makes the step's row write a handful of numpy calls for all layers):
    the L*B*G (layer, batch row, KV head) slot sets are numbered s = 0..N/C-1 (N = L*B*G*C slots),
    slot c of set s is flat slot s*C + c, and
      kv        [2N+2, D]: key slots 0..N-1, a spare row N, value slots N+1..2N, a spare row 2N+1
      bias/position [N+1]: slots 0..N-1 and a spare element N
    Each layer's tensors are contiguous views of the first N (or the value) slots; a row the step
    does not keep (slot -1) is written to the spare row instead of being filtered out.
    """

    def __init__(self, info: ModelInfo, batch: int):
        self.info = info
        self.batch = batch
        dtype = numpy_dtype(info.dtype)
        L, G, C, D = info.num_layers, info.num_kv_heads, info.capacity, info.head_dim
        n = L * batch * G * C
        self._spare = n
        self._kv = np.zeros((2 * n + 2, D), dtype)
        self._bias = np.zeros(n + 1, dtype)
        self._position = np.zeros(n + 1, np.int64)
        shape = (L, batch, G, C)
        self.stacked = {"key": self._kv[:n].reshape(*shape, D), "value": self._kv[n + 1:2 * n + 1].reshape(*shape, D),
                        "bias": self._bias[:n].reshape(shape), "position": self._position[:n].reshape(shape)}
        self.arrays = {k: v for f, a in self.stacked.items() for k, v in _layer_views(f, a).items()}
        sets = np.arange(L * batch * G)
        self._set_start = sets * C  # first flat slot of each set
        self._set_row = sets // G % batch  # its batch row
        self._kv_offset = np.array([[0], [n + 1]])  # key / value region starts
        self._target = np.empty(len(sets), np.int64)  # per set: the flat slot written this step
        self._kv_target = np.empty((2, len(sets)), np.int64)
        self.clear()

    def clear(self) -> None:
        self._kv.fill(0)
        self._bias.fill(dtype_min(self._bias.dtype))
        self._position.fill(EMPTY_POSITION)

    def write_rows(self, rows, position_ids: np.ndarray) -> None:
        """rows: the step's outputs (RowBuffers, or a dict by name); position_ids [B,1].

        Writes each set's new row into its slot (slot -1: into the spare row), for every layer,
        batch row and KV head at once: one indexed write per buffer.
        """
        if not isinstance(rows, RowBuffers):
            rows = RowBuffers.from_arrays(self.info, self.batch, rows)
        slot = rows.slot_flat  # [L*B*G]
        target = np.add(self._set_start, slot, out=self._target)
        np.copyto(target, self._spare, where=slot < 0)
        self._kv[np.add(self._kv_offset, target, out=self._kv_target).reshape(-1)] = rows.kv_flat
        self._bias[target] = rows.bias_flat
        self._position[target] = position_ids.reshape(-1)[self._set_row]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.stacked.values())


class RowBuffers:
    """The step's outputs per layer, new_key/new_value [B,G,D], new_bias [B,G], slot [B,G] int64,
    bound once as the step's outputs: views of kv [2, L, B, G, D] (new_key, new_value), bias and
    slot [L, B, G], so that write_rows reads each as one flat array."""

    def __init__(self, info: ModelInfo, batch: int):
        dtype = numpy_dtype(info.dtype)
        L, G, D = info.num_layers, info.num_kv_heads, info.head_dim
        kv = np.zeros((2, L, batch, G, D), dtype)
        self.stacked = {"new_key": kv[0], "new_value": kv[1], "new_bias": np.zeros((L, batch, G), dtype),
                        "slot": np.zeros((L, batch, G), np.int64)}
        self.arrays = {k: v for f, a in self.stacked.items() for k, v in _layer_views(f, a).items()}
        self.kv_flat = kv.reshape(-1, D)  # [2*L*B*G, D]: the keys of every set, then the values
        self.bias_flat = self.stacked["new_bias"].reshape(-1)
        self.slot_flat = self.stacked["slot"].reshape(-1)

    @classmethod
    def from_arrays(cls, info: ModelInfo, batch: int, arrays: dict) -> "RowBuffers":
        """A copy of the step's outputs given by name (`new_key.0`, ...)."""
        rows = cls(info, batch)
        for name, array in rows.arrays.items():
            array[...] = arrays[name]
        return rows


def dtype_min(dtype: np.dtype) -> float:
    if dtype.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    return float(np.finfo(dtype).min)
