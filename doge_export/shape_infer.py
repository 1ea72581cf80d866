"""Symbolic shapes of an ONNX graph's tensors, in terms of the graph inputs' named dimensions.

Dimensions are monomials over the named dimensions (`Mono`: an integer times `batch`, `prompt`,
...), so products and exact quotients (Reshape's -1) stay known; a sum such as `prompt + 1` is
unknown (None). Small int tensors (shape vectors, indices) are followed by value, which is how
a Reshape or Expand target built from `Shape` outputs stays known. Operators without a rule
(shape_rules.py) give unknown shapes: a reader of `Facts` must treat None as "could be anything".

Used by shape_canon.py, which needs to know which `Shape` nodes read only named dimensions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

MAX_VALUES = 64  # int tensors up to this size are followed by value (shape vectors, indices)


@dataclass(frozen=True)
class Mono:
    """coef * product(syms): a dimension as an integer times named dimensions."""

    coef: int
    syms: tuple[str, ...] = ()

    def __mul__(self, other: Mono) -> Mono:
        return Mono(self.coef * other.coef, tuple(sorted(self.syms + other.syms)))

    def divide(self, other: Mono) -> Mono | None:
        """Exact quotient, or None."""
        left = Counter(self.syms)
        left.subtract(other.syms)
        if other.coef == 0 or self.coef % other.coef or any(n < 0 for n in left.values()):
            return None
        return Mono(self.coef // other.coef, tuple(sorted(left.elements())))

    @property
    def const(self) -> int | None:
        return None if self.syms else self.coef

    @property
    def symbol(self) -> str | None:
        return self.syms[0] if self.coef == 1 and len(self.syms) == 1 else None


Dims = list  # list[Mono | None]: one entry per axis, None where unknown


@dataclass
class Facts:
    """What is known per tensor name: its shape (None: not even the rank) and, for small int
    tensors, its elements (flattened)."""

    shapes: dict[str, Dims | None] = field(default_factory=dict)
    values: dict[str, Dims] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)

    def shape(self, name: str) -> Dims | None:
        return self.shapes.get(name) if name else None

    def value(self, name: str) -> Dims | None:
        return self.values.get(name) if name else None

    def ints(self, name: str) -> list[int] | None:
        """The elements of `name` when they are all known integers."""
        vals = self.value(name)
        if vals is None or any(v is None or v.const is None for v in vals):
            return None
        return [v.const for v in vals]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _record_constant(facts: Facts, name: str, tensor: onnx.TensorProto) -> None:
    facts.shapes[name] = [Mono(int(d)) for d in tensor.dims]
    facts.dtypes[name] = tensor.data_type
    if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and \
            int(np.prod(tensor.dims)) <= MAX_VALUES and tensor.data_location != onnx.TensorProto.EXTERNAL:
        facts.values[name] = [Mono(int(v)) for v in numpy_helper.to_array(tensor).reshape(-1)]


def broadcast(shapes: list[Dims | None]) -> Dims | None:
    """numpy broadcasting of known shapes; an axis is unknown unless every operand agrees or is 1."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        known = {d for d in dims if d is not None and d != Mono(1)}
        out.append(known.pop() if len(known) == 1 and None not in dims else
                   Mono(1) if all(d == Mono(1) for d in dims) else None)
    return out


def numel(shape: Dims | None) -> Mono | None:
    if shape is None or any(d is None for d in shape):
        return None
    total = Mono(1)
    for d in shape:
        total = total * d
    return total


def reshaped(data: Dims | None, target: Dims | None, allowzero: int) -> Dims | None:
    if target is None:
        return None
    copy = lambda i: data[i] if data is not None and i < len(data) else None  # noqa: E731  (0: copy the input's dim)
    out = [copy(i) if t == Mono(0) and not allowzero else t for i, t in enumerate(target)]
    if Mono(-1) in out:
        rest = [d for d in out if d != Mono(-1)]
        total, known = numel(data), numel(rest)
        inferred = total.divide(known) if total is not None and known is not None else None
        out = [inferred if d == Mono(-1) else d for d in out]
    return [None if (d is not None and d.const is not None and d.const < 0) else d for d in out]


def normal_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _input_shape(value: onnx.ValueInfoProto) -> Dims | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [Mono(d.dim_value) if d.HasField("dim_value") else Mono(1, (d.dim_param,)) if d.dim_param else None
            for d in value.type.tensor_type.shape.dim]


def _constant_node(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node given as `value`, `value_int` or `value_ints`."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.array(helper.get_attribute_value(a), np.int64))
    return None


def infer(model: onnx.ModelProto) -> Facts:
    """Shapes (and small int values) of every tensor of `model`'s main graph, in node order."""
    from .shape_rules import SHAPE_RULES, value_dtype, values_of  # the rules build on this module's types

    facts = Facts()
    for value in model.graph.input:
        facts.shapes[value.name] = _input_shape(value)
        facts.dtypes[value.name] = value.type.tensor_type.elem_type
    for tensor in model.graph.initializer:
        _record_constant(facts, tensor.name, tensor)
    for node in model.graph.node:
        constant = _constant_node(node) if node.op_type == "Constant" else None
        if constant is not None:
            _record_constant(facts, node.output[0], constant)
            continue
        rule = SHAPE_RULES.get(node.op_type) if node.domain in ("", "ai.onnx", "com.microsoft") else None
        shapes = rule(node, facts) if rule else [None] * len(node.output)
        for name, shape in zip(node.output, shapes):
            facts.shapes[name] = shape
        for name, value in zip(node.output, values_of(node, facts)):
            if value is not None and len(value) <= MAX_VALUES:
                facts.values[name] = value
                facts.dtypes[name] = value_dtype(node, facts)
    return facts
