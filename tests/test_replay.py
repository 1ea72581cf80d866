"""ReplayedReference: the reference's answers recorded once, replayed for a second runner."""

from __future__ import annotations

import numpy as np
import pytest

from doge_export.backends.base import Runner
from doge_export.errors import DogeExportError
from doge_export.replay import ReplayedReference
from doge_export.spec import ModelInfo


class Counting(Runner):
    """Logits from a counter (every real call answers differently); logs one tie per step."""

    description = "counting"

    def __init__(self, info, tie_log):
        super().__init__(info)
        self.calls, self.tie_log, self.cache = 0, tie_log, object()

    def _prefill(self, input_ids, attention_mask, position_ids):
        self.calls += 1
        return np.full((len(input_ids), 4), float(self.calls), np.float32)

    def _step(self, input_ids, position_ids):
        self.calls += 1
        self.tie_log.append(("near", False, 1e-7, [(0, int(position_ids[0, 0]))]))
        return np.full((len(input_ids), 4), float(self.calls), np.float32)

    def state_rows(self, input_ids, attention_mask, capacity):
        return {"key.0": np.full((1, 1, capacity, 2), float(self.calls))}


@pytest.fixture
def tiny_info():
    return ModelInfo(vocab_size=4, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2, capacity=3,
                     keep_window_size=3, max_prompt=8, max_context=8)


def _session(runner):
    ids = np.array([[5, 6]])
    first = runner.prefill(ids, np.ones_like(ids), np.array([[0, 1]]))
    rows = runner.state_rows(ids, np.ones_like(ids), 3)
    second = runner.step(np.array([[7]]), np.array([[2]]))
    return first, rows, second


def test_replay_answers_what_was_recorded_without_calling_again(tiny_info):
    ties = []
    inner = Counting(tiny_info, ties)
    replayed = ReplayedReference(inner, ties)
    recorded = _session(replayed)
    assert inner.calls == 2 and len(ties) == 1 and replayed.description == "counting"
    ties.clear()
    replayed.replay()
    again = _session(replayed)
    assert inner.calls == 2  # nothing recomputed
    assert ties == [("near", False, 1e-7, [(0, 2)])]  # the step's tie entry, logged again
    np.testing.assert_array_equal(again[0], recorded[0])
    np.testing.assert_array_equal(again[1]["key.0"], recorded[1]["key.0"])
    np.testing.assert_array_equal(again[2], recorded[2])
    assert replayed.cache is inner.cache


def test_replay_refuses_calls_that_were_not_recorded(tiny_info):
    ties = []
    replayed = ReplayedReference(Counting(tiny_info, ties), ties)
    _session(replayed)
    replayed.replay()
    ids = np.array([[5, 9]])
    with pytest.raises(DogeExportError, match=r"call 0 \(prefill\) differs"):
        replayed.prefill(ids, np.ones_like(ids), np.array([[0, 1]]))
    replayed.replay()
    _session(replayed)
    with pytest.raises(DogeExportError, match="past the 3 recorded"):
        replayed.step(np.array([[7]]), np.array([[3]]))
