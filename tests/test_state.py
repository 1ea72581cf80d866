"""The runtime's state buffers: layout, and the row write of every layer, batch row and head at once."""

import numpy as np

from doge_export import state as state_module
from doge_export.spec import EMPTY_POSITION, ModelInfo
from doge_export.state import RowBuffers, StateBuffers

INFO = ModelInfo(vocab_size=10, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, capacity=5,
                 keep_window_size=5, max_prompt=8, max_context=16)
L, B, G, C, D = INFO.num_layers, 2, INFO.num_kv_heads, INFO.capacity, INFO.head_dim


def filled_rows(rng, width: int = C) -> RowBuffers:
    rows = RowBuffers(INFO, B)
    rows.stacked["new_key"][...] = rng.standard_normal((L, B, G, D))
    rows.stacked["new_value"][...] = rng.standard_normal((L, B, G, D))
    rows.stacked["new_bias"][...] = rng.standard_normal((L, B, G))
    rows.stacked["slot"][...] = rng.integers(-1, width, (L, B, G))
    return rows


def expected_state(before: dict, rows: RowBuffers, positions: np.ndarray) -> dict:
    """The row write, one (layer, row, head) at a time."""
    after = {name: a.copy() for name, a in before.items()}
    for i in range(L):
        for b in range(B):
            for g in range(G):
                slot = rows.arrays[f"slot.{i}"][b, g]
                if slot < 0:
                    continue  # the step did not keep this row
                after[f"key.{i}"][b, g, slot] = rows.arrays[f"new_key.{i}"][b, g]
                after[f"value.{i}"][b, g, slot] = rows.arrays[f"new_value.{i}"][b, g]
                after[f"bias.{i}"][b, g, slot] = rows.arrays[f"new_bias.{i}"][b, g]
                after[f"position.{i}"][b, g, slot] = positions[b, 0]
    return after


def test_layer_views_are_contiguous_and_start_empty():
    state = StateBuffers(INFO, B)
    assert len(state.arrays) == 4 * L
    for name, array in state.arrays.items():
        assert array.flags.c_contiguous, name
    assert state.arrays["key.2"].shape == (B, G, C, D) and state.arrays["position.0"].shape == (B, G, C)
    assert (state.arrays["position.1"] == EMPTY_POSITION).all()
    assert (state.arrays["bias.0"] == np.finfo(np.float32).min).all()
    assert state.nbytes() == L * B * G * C * (2 * D * 4 + 4 + 8)  # the spare rows are not state


def test_write_rows_matches_the_per_layer_loop_and_skips_unkept_rows():
    rng = np.random.default_rng(0)
    state = StateBuffers(INFO, B)
    for name, array in state.arrays.items():  # a state that is not all empty
        array[...] = rng.integers(0, 50, array.shape)
    for step in range(4):
        rows = filled_rows(rng)
        rows.stacked["slot"][0, 1, 0] = -1  # at least one row the step does not keep
        positions = np.array([[100 + step], [200 + step]])
        want = expected_state(state.arrays, rows, positions)
        state.write_rows(rows, positions)
        for name, array in state.arrays.items():
            np.testing.assert_array_equal(array, want[name], err_msg=name)


def test_write_rows_takes_the_outputs_by_name():
    rng = np.random.default_rng(1)
    by_buffers, by_name = StateBuffers(INFO, B), StateBuffers(INFO, B)
    rows = filled_rows(rng)
    positions = np.array([[7], [9]])
    by_buffers.write_rows(rows, positions)
    by_name.write_rows({name: array.copy() for name, array in rows.arrays.items()}, positions)
    for name, array in by_buffers.arrays.items():
        np.testing.assert_array_equal(by_name.arrays[name], array, err_msg=name)


def test_the_width_moves_every_set_in_place_and_loses_no_slot(monkeypatch):
    """After a prefill that filled 3 of the 5 slots, the step reads 4 (3 + an empty one, in steps
    of 2); rows written at width 4 land where the per-layer loop puts them; the width then grows
    back to all 5 with every slot where it was, and a new prefill starts again from 5."""
    monkeypatch.setattr(state_module, "WIDTH_STEP", 2)
    rng = np.random.default_rng(2)
    state = StateBuffers(INFO, B)
    pointers = {state._kv.ctypes.data, state._bias.ctypes.data, state._position.ctypes.data}
    for name, array in state.capacity_arrays.items():  # what prefill writes: slots 0..2 filled
        kind = name.split(".")[0]
        array[:, :, :3] = rng.integers(0, 50, array[:, :, :3].shape) if kind != "position" else np.arange(3)
    state.after_prefill()
    before = state.full_arrays()
    assert state.used == 3 and state.width == C
    assert state.fit_width() and state.width == 4
    assert state.arrays["key.1"].shape == (B, G, 4, D) and all(a.flags.c_contiguous for a in state.arrays.values())
    for name, array in state.full_arrays().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    rows = filled_rows(rng, width=4)
    rows.stacked["slot"][1, 0, 1] = -1
    positions = np.array([[30], [31]])
    want = expected_state(state.full_arrays(), rows, positions)
    state.write_rows(rows, positions)
    assert state.advance() and state.width == C  # used 4 = width: grown to C
    for name, array in state.full_arrays().items():
        np.testing.assert_array_equal(array, want[name], err_msg=name)
        np.testing.assert_array_equal(state.arrays[name], want[name], err_msg=name)
    assert not state.advance() and state.width == C
    assert {state._kv.ctypes.data, state._bias.ctypes.data, state._position.ctypes.data} == pointers
