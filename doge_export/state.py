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


WIDTH_STEP = 64  # the attended width grows in steps of this many slots


class StateBuffers:
    """Per layer: key/value [B,G,S,D], bias [B,G,S], position [B,G,S] int64, all C-contiguous.

    S, the width, is how many slots of each slot set the step reads: C after prefill (which
    writes all C), then, where the step graph takes a symbolic slot dim, only as many as hold
    tokens plus at least one empty slot (fit_width), growing by WIDTH_STEP as tokens arrive. The
    eviction rule then picks the same slot as over all C, and the empty slots it skips add exact
    zeros to the softmax: the step reads the filled part of the state only.

    Memory layout (what makes the step's row write a handful of numpy calls for all layers):
    the L*B*G (layer, batch row, KV head) slot sets are numbered s = 0..L*B*G-1 (N = L*B*G*C
    slots); set s of layer l = s // (B*G) starts at flat slot l*B*G*C + (s % (B*G))*S, and
      kv        [2N+2, D]: key slots 0..N-1, a spare row N, value slots N+1..2N, a spare row 2N+1
      bias/position [N+1]: slots 0..N-1 and a spare element N
    Each layer's tensors are contiguous views of the first B*G*S slots of its region; a row the
    step does not keep (slot -1) is written to the spare row instead of being filtered out.
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
        sets = batch * G
        # per field: [L, B*G*C, ...], each layer's region
        self._regions = {"key": self._kv[:n].reshape(L, sets * C, D),
                         "value": self._kv[n + 1:2 * n + 1].reshape(L, sets * C, D),
                         "bias": self._bias[:n].reshape(L, sets * C), "position": self._position[:n].reshape(L, sets * C)}
        self._empty = {"key": 0, "value": 0, "bias": dtype_min(dtype), "position": EMPTY_POSITION}
        all_sets = np.arange(L * sets)
        self._layer_start = all_sets // sets * (sets * C)
        self._set_in_layer = all_sets % sets
        self._set_row = all_sets // G % batch  # its batch row
        self._kv_offset = np.array([[0], [n + 1]])  # key / value region starts
        self._target = np.empty(len(all_sets), np.int64)  # per set: the flat slot written this step
        self._kv_target = np.empty((2, len(all_sets)), np.int64)
        self._set_views(C)
        self.capacity_arrays = self.arrays  # all C slots: what prefill writes
        self.used = 0  # slots [used, C) of every set are empty
        self.clear()

    def _set_views(self, width: int) -> None:
        L, B, G = self.info.num_layers, self.batch, self.info.num_kv_heads
        self.width = width
        self.stacked = {f: r[:, :B * G * width].reshape(L, B, G, width, *r.shape[2:]) for f, r in self._regions.items()}
        self.arrays = {k: v for f, a in self.stacked.items() for k, v in _layer_views(f, a).items()}
        self._set_start = self._layer_start + self._set_in_layer * width  # first flat slot of each set

    def clear(self) -> None:
        self._kv.fill(self._empty["key"])
        self._bias.fill(self._empty["bias"])
        self._position.fill(self._empty["position"])
        self._set_views(self.info.capacity)
        self.used = 0

    def after_prefill(self) -> None:
        """Prefill has written all C slots of every set: views back to width C, `used` measured."""
        self._set_views(self.info.capacity)
        occupied = (self._regions["position"] != EMPTY_POSITION) | (self._regions["bias"] != self._empty["bias"])
        per_slot = occupied.reshape(-1, self.info.capacity).any(axis=0)  # [C]: any set holds this slot
        self.used = int(per_slot.nonzero()[0][-1]) + 1 if per_slot.any() else 0

    def fit_width(self) -> bool:
        """Move to the narrowest width that holds every token plus an empty slot (or C); True when
        the width changed (the views are new: rebind them)."""
        C = self.info.capacity
        width = min(C, -(-(self.used + 1) // WIDTH_STEP) * WIDTH_STEP)
        if width == self.width:
            return False
        self._relayout(width)
        return True

    def advance(self) -> bool:
        """After a step's write_rows: every set gained at most one slot. True when the width grew."""
        self.used = min(self.used + 1, self.info.capacity)
        return self.used >= self.width and self.width < self.info.capacity and self.fit_width()

    def _relayout(self, width: int) -> None:
        """Each layer's sets from `self.width` slots apart to `width` apart, in place. Growing, the
        new slots are filled empty (sets move up, the last first); shrinking, the dropped slots
        [width, S) must be empty (sets move down, the first first)."""
        old, sets = self.width, self.batch * self.info.num_kv_heads
        keep = min(old, width)
        order = range(sets - 1, -1, -1) if width > old else range(sets)
        for j in order:
            for field, region in self._regions.items():
                if j:
                    region[:, j * width:j * width + keep] = region[:, j * old:j * old + keep]
                if width > old:
                    region[:, j * width + old:(j + 1) * width] = self._empty[field]
        self._set_views(width)

    def full_arrays(self) -> dict[str, np.ndarray]:
        """Copies of every state tensor at all C slots (the empty ones filled in), by name."""
        C, out = self.info.capacity, {}
        for name, array in self.arrays.items():
            full = np.full(array.shape[:2] + (C,) + array.shape[3:], self._empty[name.split(".")[0]], array.dtype)
            full[:, :, :self.width] = array
            out[name] = full
        return out

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
        return sum(r.nbytes for r in self._regions.values())


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
