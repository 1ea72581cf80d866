"""Symbolic shapes of an ONNX graph's tensors, in terms of the graph inputs' named dimensions.

Dimensions are monomials over the named dimensions (`Mono`: an integer times `batch`, `prompt`,
...), so products and exact quotients (Reshape's -1) stay known; a sum such as `prompt + 1` is
unknown (None). Small int tensors (shape vectors, indices) are followed by value, which is how
a Reshape or Expand target built from `Shape` outputs stays known. Operators outside the tables
give unknown shapes: a reader of `Facts` must treat None as "could be anything".

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


def _broadcast(shapes: list[Dims | None]) -> Dims | None:
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


def _numel(shape: Dims | None) -> Mono | None:
    if shape is None or any(d is None for d in shape):
        return None
    total = Mono(1)
    for d in shape:
        total = total * d
    return total


def _reshape(data: Dims | None, target: Dims | None, allowzero: int) -> Dims | None:
    if target is None:
        return None
    out = [data[i] if (t == Mono(0) and not allowzero and data is not None and i < len(data)) else t
           for i, t in enumerate(target)]
    if Mono(-1) in out:
        rest = [d for d in out if d != Mono(-1)]
        total, known = _numel(data), _numel(rest)
        inferred = total.divide(known) if total is not None and known is not None else None
        out = [inferred if d == Mono(-1) else d for d in out]
    return [None if (d is not None and d.const is not None and d.const < 0) else d for d in out]


def _normal_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- shape rules: (node, facts) -> list of output shapes (None: unknown) ------------------------

def _same(node, facts):
    return [facts.shape(node.input[0])]


def _elementwise(node, facts):
    return [_broadcast([facts.shape(i) for i in node.input if i])]


def _matmul(node, facts):
    a, b = facts.shape(node.input[0]), facts.shape(node.input[1])
    if a is None or b is None or len(a) < 2 or len(b) < 2 or attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        return [None]
    a = a[:-2] + a[-2:][::-1] if attr(node, "transA", 0) else a
    b = b[:-2] + b[-2:][::-1] if attr(node, "transB", 0) else b
    batch = _broadcast([a[:-2], b[:-2]])
    return [None if batch is None else batch + [a[-2], b[-1]]]


def _matmul_nbits(node, facts):
    a = facts.shape(node.input[0])
    return [None if a is None else a[:-1] + [Mono(attr(node, "N"))]]


def _transpose(node, facts):
    data = facts.shape(node.input[0])
    if data is None:
        return [None]
    perm = attr(node, "perm") or list(range(len(data)))[::-1]
    return [[data[p] for p in perm]]


def _reshape_rule(node, facts):
    return [_reshape(facts.shape(node.input[0]), facts.value(node.input[1]), attr(node, "allowzero", 0))]


def _expand(node, facts):
    target = facts.value(node.input[1])
    return [None if target is None else _broadcast([facts.shape(node.input[0]), target])]


def _constant_of_shape(node, facts):
    return [facts.value(node.input[0])]


def _split(node, facts):
    data = facts.shape(node.input[0])
    sizes = facts.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split")
    if data is None or sizes is None or len(sizes) != len(node.output):
        return [None] * len(node.output)
    axis = _normal_axis(attr(node, "axis", 0), len(data))
    return [data[:axis] + [Mono(s)] + data[axis + 1:] for s in sizes]


def _concat(node, facts):
    shapes = [facts.shape(i) for i in node.input]
    if any(s is None for s in shapes):
        return [None]
    axis = _normal_axis(attr(node, "axis"), len(shapes[0]))
    dims = [s[axis] for s in shapes]
    joined = Mono(sum(d.const for d in dims)) if all(d is not None and d.const is not None for d in dims) else None
    return [shapes[0][:axis] + [joined] + shapes[0][axis + 1:]]


def _gather(node, facts):
    data, indices = facts.shape(node.input[0]), facts.shape(node.input[1])
    if data is None or indices is None:
        return [None]
    axis = _normal_axis(attr(node, "axis", 0), len(data))
    return [data[:axis] + indices + data[axis + 1:]]


def _gather_block_quantized(node, facts):
    """Packed int4 data ([..., blocks, bytes] uint8) unpacks two values per byte along quantize_axis."""
    data, indices = facts.shape(node.input[0]), facts.shape(node.input[1])
    if data is None or indices is None:
        return [None]
    gather_axis = _normal_axis(attr(node, "gather_axis", 0), len(data))
    out = data[:gather_axis] + indices + data[gather_axis + 1:]
    quantize_axis = _normal_axis(attr(node, "quantize_axis", 1), len(data))
    if facts.dtypes.get(node.input[0]) == onnx.TensorProto.UINT8 and attr(node, "bits", 4) == 4:
        if quantize_axis == gather_axis:
            return [None]
        q = quantize_axis if quantize_axis < gather_axis else quantize_axis + len(indices) - 1
        out[q] = None if out[q] is None else out[q] * Mono(2)
    return [out]


def _unsqueeze(node, facts):
    data = facts.shape(node.input[0])
    axes = facts.ints(node.input[1]) if len(node.input) > 1 else attr(node, "axes")
    if data is None or axes is None:
        return [None]
    rank = len(data) + len(axes)
    axes = sorted(_normal_axis(a, rank) for a in axes)
    out = list(data)
    for a in axes:
        out.insert(a, Mono(1))
    return [out]


def _squeeze(node, facts):
    data = facts.shape(node.input[0])
    axes = facts.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if data is None or axes is None:
        return [None]
    drop = {_normal_axis(a, len(data)) for a in axes}
    return [[d for i, d in enumerate(data) if i not in drop]]


def _slice(node, facts):
    data = facts.shape(node.input[0])
    starts, ends = facts.ints(node.input[1]), facts.ints(node.input[2])
    axes = facts.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = facts.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if data is None or starts is None or ends is None:
        return [None]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    out = list(data)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _normal_axis(axis, len(data))
        out[axis] = _sliced_dim(data[axis], start, end, step)
    return [out]


def _sliced_dim(dim: Mono | None, start: int, end: int, step: int) -> Mono | None:
    """Named dimensions are >= 1 (the runtimes refuse an empty batch, prompt or state), so the
    first or last element of one is one element."""
    if dim is not None and dim.const is not None:
        return Mono(len(range(*slice(start, end, step).indices(dim.const))))
    if dim is None or step != 1:
        return None
    if start == 0 and end >= 2**31 - 1:
        return dim
    return Mono(1) if (start, end) == (0, 1) or (start == -1 and end >= 2**31 - 1) else None


def _reduce(node, facts):
    data = facts.shape(node.input[0])
    axes = facts.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if data is None:
        return [None]
    axes = {_normal_axis(a, len(data)) for a in (axes if axes is not None else range(len(data)))}
    if node.op_type == "ArgMax" or node.op_type == "ArgMin":
        axes = {_normal_axis(attr(node, "axis", 0), len(data))}
    keep = attr(node, "keepdims", 1)
    return [[Mono(1) if i in axes else d for i, d in enumerate(data) if keep or i not in axes]]


def _range(node, facts):
    start, limit, delta = (facts.value(i) for i in node.input)
    if None in (start, limit, delta):
        return [[None]]
    if start == [Mono(0)] and delta == [Mono(1)]:
        return [limit]
    s, l, d = start[0].const if start[0] else None, limit[0].const if limit[0] else None, delta[0].const if delta[0] else None
    if None in (s, l, d) or d == 0:
        return [[None]]
    return [[Mono(len(range(s, l, d)))]]


def _shape(node, facts):
    dims = _shape_slice(node, facts.shape(node.input[0]))
    return [None if dims is None else [Mono(len(dims))]]


def _shape_slice(node, data: Dims | None) -> Dims | None:
    if data is None:
        return None
    start, end = attr(node, "start", 0), attr(node, "end", len(data))
    return data[slice(*slice(start, end).indices(len(data)))]


def _layer_norm(node, facts):
    data = facts.shape(node.input[0])
    return [data] + [None] * (len(node.output) - 1)


def _skip_layer_norm(node, facts):
    data = facts.shape(node.input[0])
    return [data if i in (0, 3) else None for i in range(len(node.output))]


SAME = ("Neg", "Exp", "Sin", "Cos", "Softplus", "Reciprocal", "Cast", "Sqrt", "Not", "Identity", "Clip",
        "Softmax", "CumSum", "Erf", "Relu", "Sigmoid", "Tanh", "Log", "Abs", "Floor", "Ceil", "Round",
        "ScatterElements", "ScatterND", "EyeLike", "IsNaN", "IsInf", "Sign", "QuickGelu", "FastGelu")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Xor", "Equal", "Less", "Greater",
               "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Mod")
SHAPE_RULES = {
    **{op: _same for op in SAME}, **{op: _elementwise for op in ELEMENTWISE},
    "MatMul": _matmul, "FusedMatMul": _matmul, "MatMulNBits": _matmul_nbits, "Transpose": _transpose,
    "Reshape": _reshape_rule, "Expand": _expand, "ConstantOfShape": _constant_of_shape, "Split": _split,
    "Concat": _concat, "Gather": _gather, "GatherBlockQuantized": _gather_block_quantized,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Slice": _slice, "Range": _range, "Shape": _shape,
    "ReduceMax": _reduce, "ReduceMin": _reduce, "ReduceSum": _reduce, "ReduceMean": _reduce,
    "ArgMax": _reduce, "ArgMin": _reduce,
    "SimplifiedLayerNormalization": _layer_norm, "LayerNormalization": _layer_norm,
    "SkipSimplifiedLayerNormalization": _skip_layer_norm,
}


# -- value rules for small int tensors: (node, facts) -> flattened elements or None ------------

def _value_shape(node, facts):
    return _shape_slice(node, facts.shape(node.input[0]))


def _value_passthrough(node, facts):
    return facts.value(node.input[0])


def _value_cast(node, facts):
    to = attr(node, "to")
    return facts.value(node.input[0]) if to in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) else None


def _value_gather(node, facts):
    data, indices = facts.value(node.input[0]), facts.ints(node.input[1])
    shape = facts.shape(node.input[0])
    if data is None or indices is None or shape is None or len(shape) != 1:
        return None
    n = len(data)
    return [data[i + n if i < 0 else i] if -n <= i < n else None for i in indices]


def _value_concat(node, facts):
    parts = [facts.value(i) for i in node.input]
    if any(p is None for p in parts) or any(len(facts.shape(i) or [None, None]) != 1 for i in node.input):
        return None
    return [v for p in parts for v in p]


def _value_slice(node, facts):
    data, starts, ends = facts.value(node.input[0]), facts.ints(node.input[1]), facts.ints(node.input[2])
    axes = facts.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
    steps = facts.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if data is None or starts is None or ends is None or axes not in ([0], [-1]) or len(facts.shape(node.input[0]) or []) != 1:
        return None
    return data[slice(starts[0], ends[0], steps[0])]


def _arith(op: str, a: Mono | None, b: Mono | None) -> Mono | None:
    if a is None or b is None:
        return None
    if op == "Mul":
        return a * b
    if op == "Div":
        return a.divide(b)
    if a.const is not None and b.const is not None:
        return Mono({"Add": a.const + b.const, "Sub": a.const - b.const,
                     "Max": max(a.const, b.const), "Min": min(a.const, b.const)}[op])
    if op in ("Add", "Sub") and b == Mono(0):
        return a
    return b if op == "Add" and a == Mono(0) else None


def _value_arith(node, facts):
    a, b = facts.value(node.input[0]), facts.value(node.input[1])
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    n = max(len(a), len(b))
    return [_arith(node.op_type, a[i % len(a)], b[i % len(b)]) for i in range(n)]


def _equal(a: Mono | None, b: Mono | None) -> Mono | None:
    """1/0, or None; a dimension (a monomial with named dimensions) is never negative."""
    if a is None or b is None:
        return None
    if a.const is not None and b.const is not None:
        return Mono(int(a.const == b.const))
    const = a.const if a.const is not None else b.const
    return Mono(0) if const is not None and const < 0 else (Mono(1) if a == b else None)


def _value_equal(node, facts):
    a, b = facts.value(node.input[0]), facts.value(node.input[1])
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    return [_equal(a[i % len(a)], b[i % len(b)]) for i in range(max(len(a), len(b)))]


def _value_where(node, facts):
    cond, a, b = (facts.value(i) for i in node.input)
    if cond is None or a is None or b is None or None in cond:
        return None
    n = max(len(cond), len(a), len(b))
    if any(len(v) not in (1, n) for v in (cond, a, b)):
        return None
    return [a[i % len(a)] if cond[i % len(cond)].const else b[i % len(b)] for i in range(n)]


def _value_constant_of_shape(node, facts):
    count, fill = facts.ints(node.input[0]), attr(node, "value")
    if count is None or len(count) != 1 or count[0] > MAX_VALUES:
        return None
    element = numpy_helper.to_array(fill).reshape(-1)[0] if fill is not None else 0
    is_int = fill is None or fill.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    return [Mono(int(element))] * count[0] if is_int else None


def _values_split(node, facts) -> list[Dims | None]:
    """Split of a 1-D value by known sizes: one value per output."""
    data = facts.value(node.input[0])
    shapes = _split(node, facts)
    if data is None or len(facts.shape(node.input[0]) or []) != 1 or any(s is None for s in shapes):
        return [None] * len(node.output)
    sizes, out, at = [s[0].const for s in shapes], [], 0
    for size in sizes:
        out.append(data[at:at + size])
        at += size
    return out


VALUE_RULES = {
    "Equal": _value_equal, "Where": _value_where, "ConstantOfShape": _value_constant_of_shape,
    "Shape": _value_shape, "Cast": _value_cast, "Gather": _value_gather, "Concat": _value_concat,
    "Slice": _value_slice, **{op: _value_passthrough for op in ("Unsqueeze", "Squeeze", "Reshape", "Identity")},
    **{op: _value_arith for op in ("Add", "Sub", "Mul", "Div", "Max", "Min")},
}


def _values(node, facts) -> list[Dims | None]:
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "Split":
        return _values_split(node, facts)
    rule = VALUE_RULES.get(node.op_type)
    return [rule(node, facts)] if rule else []


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
        for name, value in zip(node.output, _values(node, facts)):
            if value is not None and len(value) <= MAX_VALUES:
                facts.values[name] = value
    return facts
