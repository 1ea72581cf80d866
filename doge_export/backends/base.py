"""The runner interface every backend implements (STYLE habit 7).

A runner owns one generation's state: `prefill` starts it from a (left-padded) batch, `step`
advances it by one token per row. Arrays are numpy; logits come back as float32 [B,V].
Runners are context managers: the session/engine opens on enter and is freed on exit.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from ..spec import ModelInfo


class Runner(ABC):
    name = "base"

    def __init__(self, info: ModelInfo):
        self.info = info
        self.last_latency = 0.0  # seconds of the last prefill/step call, run call only

    @abstractmethod
    def _prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """[B,T] int64 x3 -> logits [B,V] float32 for the last position; (re)starts the state."""

    @abstractmethod
    def _step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """[B,1] int64 x2 -> logits [B,V] float32; appends the token to the state."""

    def prefill(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        start = time.perf_counter()
        logits = self._prefill(input_ids, attention_mask, position_ids)
        self.last_latency = time.perf_counter() - start
        return logits

    def step(self, input_ids, position_ids) -> np.ndarray:
        start = time.perf_counter()
        logits = self._step(input_ids, position_ids)
        self.last_latency = time.perf_counter() - start
        return logits

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
