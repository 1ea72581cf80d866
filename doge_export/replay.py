"""A reference runner whose answers are recorded once and replayed for a second runner.

Validation feeds both sides the reference's own greedy tokens (lockstep.py), so validating a
second set of graphs on the same cases (the rows-layout graphs, lm_rows.py) makes exactly the same
reference calls again. Replaying them saves what dominates validation time: transformers eager on
the 2048-token case (Doge-60M: half of a 55 s export). Each replayed call checks that its inputs
are the recorded ones, and re-appends the tie-log entries its recorded call made.
"""

from __future__ import annotations

import copy

import numpy as np

from .backends.base import Runner
from .errors import DogeExportError


class ReplayedReference(Runner):
    """Wraps `reference` (whose calls append to `tie_log`); call replay() after the first pass."""

    name = "replayed-reference"

    def __init__(self, reference: Runner, tie_log: list):
        super().__init__(reference.info)
        self.inner, self.tie_log = reference, tie_log
        if hasattr(reference, "description"):
            self.description = reference.description
        self.calls: list[tuple] = []  # (kind, inputs, output, tie-log entries) in call order
        self.replaying, self.at = False, 0

    def replay(self) -> None:
        """From here on, answer from the record, from its first call."""
        self.replaying, self.at = True, 0

    @property
    def cache(self):  # state_checks asks for it: present whenever the wrapped runner keeps one
        return getattr(self.inner, "cache", None)

    def _call(self, kind: str, inputs: tuple, run):
        if not self.replaying:
            start = len(self.tie_log)
            output = copy.deepcopy(run())
            self.calls.append((kind, tuple(np.array(a, copy=True) for a in inputs), output, self.tie_log[start:]))
            return output
        if self.at == len(self.calls):
            raise DogeExportError(f"replayed reference: a {kind} call past the {len(self.calls)} recorded ones")
        recorded_kind, recorded_inputs, output, ties = self.calls[self.at]
        if kind != recorded_kind or not all(np.array_equal(a, b) for a, b in zip(inputs, recorded_inputs)):
            raise DogeExportError(f"replayed reference: call {self.at} ({kind}) differs from the recorded "
                                  f"{recorded_kind} call")
        self.at += 1
        self.tie_log.extend(ties)
        return copy.deepcopy(output)

    def _prefill(self, input_ids, attention_mask, position_ids):
        return self._call("prefill", (input_ids, attention_mask, position_ids),
                          lambda: self.inner.prefill(input_ids, attention_mask, position_ids))

    def _step(self, input_ids, position_ids):
        return self._call("step", (input_ids, position_ids), lambda: self.inner.step(input_ids, position_ids))

    def state_rows(self, input_ids, attention_mask, capacity: int) -> dict:
        return self._call("state", (input_ids, attention_mask, np.array(capacity)),
                          lambda: self.inner.state_rows(input_ids, attention_mask, capacity))
