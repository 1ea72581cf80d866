"""onnx's reference evaluator as a runner: executes the graphs in exactly the dtypes they declare.

For half-precision artifacts on a CPU machine. ONNX Runtime's CPU provider has no bf16 kernels and
runs fp16 graphs by inserting fp32 casts around nodes it lacks (so it skips roundings the graph
asks for); TensorRT, being strongly typed, runs the declared dtypes. The reference evaluator does
too, op by op in numpy (ml_dtypes for bf16). It is slow (about 1 s per Doge-20M prefill): meant for
tiny models and tests. MatMul is overridden to accumulate in fp32 and round once, as GPU tensor
cores and PyTorch's CPU half matmul do (numpy's bf16 matmul returns fp32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_gather_elements import GatherElements as _GatherElements
from onnx.reference.ops.op_matmul import MatMul as _MatMul

from ..errors import DogeExportError
from ..manifest import Manifest
from ..spec import row_names, state_names
from ..state import StateBuffers
from .base import Runner


class MatMulFp32(_MatMul):
    def _run(self, a, b):
        if a.dtype == np.float32 or a.dtype.kind not in "fV":
            return super()._run(a, b)
        return (np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype),)


class GatherElements(_GatherElements):
    def _run(self, data, indices, axis=0):
        # onnx 1.23's version rejects axis=-1 (it slices the index shape with dim + 1 == 0)
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)


def evaluator_from_onnx(path) -> ReferenceEvaluator:
    """Load a graph with its external weights (resolved next to the file)."""
    return ReferenceEvaluator(onnx.load(str(path)), new_ops=[MatMulFp32, GatherElements])


class OnnxReferenceRunner(Runner):
    name = "onnx-reference"

    def __init__(self, manifest: Manifest):
        super().__init__(manifest.info)
        self.prefill_graph = evaluator_from_onnx(manifest.graph_file("prefill"))
        self.step_graph = evaluator_from_onnx(manifest.graph_file("step"))
        self.state: StateBuffers | None = None
        self._state_names = [n for i in range(self.info.num_layers) for n in state_names(i)]
        self._row_names = [n for i in range(self.info.num_layers) for n in row_names(i)]

    def _prefill(self, input_ids, attention_mask, position_ids):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        outputs = self.prefill_graph.run(None, {k: np.ascontiguousarray(v, np.int64) for k, v in feed.items()})
        self.state = StateBuffers(self.info, input_ids.shape[0])
        for name, value in zip(self._state_names, outputs[1:]):
            self.state.arrays[name][...] = value
        return outputs[0].astype(np.float32)

    def _step(self, input_ids, position_ids):
        if self.state is None:
            raise DogeExportError("step() called before prefill()")
        pos = np.ascontiguousarray(position_ids, np.int64)
        feed = {"input_ids": np.ascontiguousarray(input_ids, np.int64), "position_ids": pos, **self.state.arrays}
        outputs = self.step_graph.run(None, feed)
        self.state.write_rows(dict(zip(self._row_names, outputs[1:])), pos)
        return outputs[0].astype(np.float32)
