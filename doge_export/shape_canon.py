"""Shape arithmetic read from the graph inputs once, instead of from every activation.

Why: the torch exporter turns every `x.size(i)` of the model code into `Shape(x)` and then
Gather/Unsqueeze/Concat, per call site and per layer. Each chain reads a different tensor, so
ONNX Runtime cannot see that they compute the same numbers, and a session pays ~3.3 KiB for every
node of the graph it is given, even for nodes its own optimizer then removes. Measured on int4
Doge-20M's prefill (2026-12-03, anonymous memory of one session, prepacking off): 1526 -> 859
nodes, 6.5 -> 4.1 MiB.

What: `shapes_from_inputs(model)` replaces every `Shape` node whose dimensions shape_infer.py
knows, each an integer or a named dimension of a graph input (`batch`, `prompt`, `slots`), by a
Concat of constants and `Shape(input)[axis]`, one node per named dimension. Nothing else changes.
ONNX Runtime's optimizer, run after this (ort_offline.py), finds the per-layer copies identical,
merges them and folds what is constant. `outputs_agree` compares two graphs on given feeds; the
export keeps the rewrite only if it agrees with the graph before it (quantize.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .shape_infer import Mono, infer

PREFIX = "shape_of_input"


def shapes_from_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """-> (a copy of `model` with its knowable Shape nodes rewritten, how many were)."""
    model = _copy(model)
    facts = infer(model)
    sources = _named_dims(model)
    builder = _Builder(model, sources)
    inputs = {v.name for v in model.graph.input}
    rewritten = 0
    for node in model.graph.node:  # a Shape of a graph input already reads it: left as it is
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] in inputs:
            continue
        dims = facts.value(node.output[0])  # the dimensions it outputs (start/end applied)
        if dims and all(d is not None and (d.const is not None or d.symbol in sources) for d in dims):
            builder.replace(node, dims)
            rewritten += 1
    builder.finish()
    return model, rewritten


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _named_dims(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """named dimension -> (the first graph input that has it, its axis)."""
    sources: dict[str, tuple[str, int]] = {}
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in sources:
                sources[dim.dim_param] = (value.name, axis)
    return sources


class _Builder:
    """The shared pieces: one `[dim]` vector per named dimension, one initializer per constant run."""

    def __init__(self, model: onnx.ModelProto, sources: dict[str, tuple[str, int]]):
        self.model, self.sources = model, sources
        self.head: list[onnx.NodeProto] = []  # nodes that only read graph inputs: first in the graph
        self.symbols: dict[str, str] = {}
        self.constants: dict[tuple[int, ...], str] = {}

    def replace(self, node: onnx.NodeProto, dims: list[Mono]) -> None:
        pieces, run = [], []
        for dim in dims:
            if dim.const is not None:
                run.append(dim.const)
                continue
            if run:
                pieces.append(self._constant(run))
                run = []
            pieces.append(self._symbol(dim.symbol))
        if run:
            pieces.append(self._constant(run))
        node.ClearField("attribute")
        del node.input[:]
        node.input.extend(pieces)
        node.op_type = "Concat" if len(pieces) > 1 else "Identity"
        if len(pieces) > 1:
            node.attribute.append(helper.make_attribute("axis", 0))

    def finish(self) -> None:
        nodes = self.head + list(self.model.graph.node)
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)

    def _constant(self, values: list[int]) -> str:
        key = tuple(values)
        if key not in self.constants:
            name = f"{PREFIX}/const_" + "_".join(str(v).replace("-", "m") for v in key)
            self.model.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
            self.constants[key] = name
        return self.constants[key]

    def _symbol(self, symbol: str) -> str:
        if symbol not in self.symbols:
            source, axis = self.sources[symbol]
            shape, out = f"{PREFIX}/{source}", f"{PREFIX}/{symbol}"
            if not any(n.output[0] == shape for n in self.head):
                self.head.append(helper.make_node("Shape", [source], [shape], name=shape))
            self.head.append(helper.make_node("Gather", [shape, self._constant([axis])], [out], name=out, axis=0))
            self.symbols[symbol] = out
        return self.symbols[symbol]


def outputs_agree(before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                  rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Both graphs on ONNX Runtime's CPU kernels, each feed: every output close (NaN = NaN)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for m in (before, after)]
    for feed in feeds:
        expected, got = (s.run(None, feed) for s in sessions)
        for a, b in zip(expected, got):
            if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                return False
    return True
