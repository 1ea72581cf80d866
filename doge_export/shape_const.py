"""Constant shape operands where the arithmetic that computes them is not needed.

Why: after shape_canon.py, each Reshape and Expand of the traced graph still reads a target that
Concat/Unsqueeze/Gather nodes compute from the graph inputs at run time, and a few Slice bounds
are computed from dimensions that are static. ONNX Runtime pays ~3.3 KiB of session memory per
node of the graph it is given (shape_canon.py), so every chain that can be a constant is worth
removing.

What `constant_operands(model)` does, from the symbolic shapes of shape_infer.py:
- an int operand whose elements are all known integers becomes an initializer;
- a Reshape target becomes a constant when every output dimension is an integer, equals the
  input's dimension on the same axis (written 0, "copy"), or is the one left over (written -1);
- an Expand shape becomes a constant when every output dimension is an integer or equals the
  input's aligned dimension (written 1: broadcasting keeps the input's);
- then the nodes that nothing reads any more are removed.
The export keeps the result only if its outputs agree with the graph before (ort_offline.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .shape_infer import Dims, Facts, Mono, attr, infer

PREFIX = "constant_operand"
INT_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
STANDARD = ("", "ai.onnx")


def constant_operands(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """-> (a copy of `model` with constant shape operands, how many operands of the nodes left
    became constants)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    facts = infer(copy)
    pool = _Constants(copy)
    for node in copy.graph.node:
        if node.domain not in STANDARD:
            continue
        for index, name in enumerate(node.input):
            if index and name and not pool.is_constant(name):
                constant = _known_ints(facts, name) or _target(node, index, facts)
                if constant is not None:
                    node.input[index] = pool.add(*constant)
    remove_dead_nodes(copy)
    made = set(pool.made.values())
    return copy, sum(name in made for node in copy.graph.node for name in node.input)


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drops nodes none of whose outputs is read (by a node or as a graph output); -> how many."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return removed


def _known_ints(facts: Facts, name: str) -> tuple[np.ndarray, int] | None:
    """(elements, dtype) of an int tensor whose shape and elements are all known integers."""
    dtype, values, shape = facts.dtypes.get(name), facts.ints(name), facts.shape(name)
    if dtype not in INT_TYPES or values is None or shape is None or any(d is None or d.const is None for d in shape):
        return None
    return np.array(values, INT_TYPES[dtype]).reshape([d.const for d in shape]), dtype


def _target(node: onnx.NodeProto, index: int, facts: Facts) -> tuple[np.ndarray, int] | None:
    """The constant shape operand of a Reshape (input 1) or an Expand (input 1), or None."""
    source, out = facts.shape(node.input[0]), facts.shape(node.output[0])
    if index != 1 or source is None or out is None:
        return None
    if node.op_type == "Reshape" and not attr(node, "allowzero", 0):
        target = _reshape_target(source, out)
    elif node.op_type == "Expand" and None not in out and None not in source:
        target = _expand_target(source, out)
    else:
        return None
    return None if target is None else (np.array(target, np.int64), onnx.TensorProto.INT64)


def _reshape_target(source: Dims, out: Dims) -> list[int] | None:
    """[..] with 0 = the input's dimension on that axis and at most one -1 (the rest, which is
    how an unknown output dimension such as `prompt + 1` is written), or None."""
    target = []
    for axis, dim in enumerate(out):
        if dim is not None and dim.const is not None and dim.const > 0:
            target.append(dim.const)
        elif dim is not None and axis < len(source) and source[axis] == dim:
            target.append(0)
        else:
            target.append(-1)
    return target if target.count(-1) <= 1 and Mono(0) not in out else None


def _expand_target(source: Dims, out: Dims) -> list[int] | None:
    """[..] with 1 where the output keeps the input's aligned dimension, or None."""
    offset = len(out) - len(source)
    if offset < 0:
        return None
    target = []
    for axis, dim in enumerate(out):
        if dim.const is not None:
            target.append(dim.const)
        elif axis >= offset and source[axis - offset] == dim:
            target.append(1)
        else:
            return None
    return target


class _Constants:
    """New initializers, one per distinct (dtype, shape, elements)."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
        self.names |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
        self.made: dict[tuple, str] = {}

    def is_constant(self, name: str) -> bool:
        return name in self.names

    def add(self, array: np.ndarray, dtype: int) -> str:
        key = (dtype, array.shape, tuple(array.reshape(-1).tolist()))
        if key not in self.made:
            name = f"{PREFIX}/{len(self.made)}"
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.made[key] = name
            self.names.add(name)
        return self.made[key]
