"""The per-operator rules of shape_infer.py: output shapes, and elements of small int tensors.

A shape rule maps (node, facts) to one shape per output (None: unknown); a value rule to the
flattened elements of its output (None: unknown). An operator without a rule has unknown outputs.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from .shape_infer import MAX_VALUES, Dims, Mono, attr, broadcast, normal_axis, reshaped

# -- shape rules: (node, facts) -> list of output shapes (None: unknown) ------------------------

def _same(node, facts):
    return [facts.shape(node.input[0])]


def _elementwise(node, facts):
    return [broadcast([facts.shape(i) for i in node.input if i])]


def _matmul(node, facts):
    a, b = facts.shape(node.input[0]), facts.shape(node.input[1])
    if a is None or b is None or len(a) < 2 or len(b) < 2 or attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        return [None]
    a = a[:-2] + a[-2:][::-1] if attr(node, "transA", 0) else a
    b = b[:-2] + b[-2:][::-1] if attr(node, "transB", 0) else b
    batch = broadcast([a[:-2], b[:-2]])
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
    return [reshaped(facts.shape(node.input[0]), facts.value(node.input[1]), attr(node, "allowzero", 0))]


def _expand(node, facts):
    target = facts.value(node.input[1])
    return [None if target is None else broadcast([facts.shape(node.input[0]), target])]


def _constant_of_shape(node, facts):
    return [facts.value(node.input[0])]


def _split(node, facts):
    data = facts.shape(node.input[0])
    sizes = facts.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split")
    if data is None or sizes is None or len(sizes) != len(node.output):
        return [None] * len(node.output)
    axis = normal_axis(attr(node, "axis", 0), len(data))
    return [data[:axis] + [Mono(s)] + data[axis + 1:] for s in sizes]


def _concat(node, facts):
    shapes = [facts.shape(i) for i in node.input]
    if any(s is None for s in shapes):
        return [None]
    axis = normal_axis(attr(node, "axis"), len(shapes[0]))
    dims = [s[axis] for s in shapes]
    joined = Mono(sum(d.const for d in dims)) if all(d is not None and d.const is not None for d in dims) else None
    return [shapes[0][:axis] + [joined] + shapes[0][axis + 1:]]


def _gather(node, facts):
    data, indices = facts.shape(node.input[0]), facts.shape(node.input[1])
    if data is None or indices is None:
        return [None]
    axis = normal_axis(attr(node, "axis", 0), len(data))
    return [data[:axis] + indices + data[axis + 1:]]


def _gather_block_quantized(node, facts):
    """Packed int4 data ([..., blocks, bytes] uint8) unpacks two values per byte along quantize_axis."""
    data, indices = facts.shape(node.input[0]), facts.shape(node.input[1])
    if data is None or indices is None:
        return [None]
    gather_axis = normal_axis(attr(node, "gather_axis", 0), len(data))
    out = data[:gather_axis] + indices + data[gather_axis + 1:]
    quantize_axis = normal_axis(attr(node, "quantize_axis", 1), len(data))
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
    axes = sorted(normal_axis(a, rank) for a in axes)
    out = list(data)
    for a in axes:
        out.insert(a, Mono(1))
    return [out]


def _squeeze(node, facts):
    data = facts.shape(node.input[0])
    axes = facts.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if data is None or axes is None:
        return [None]
    drop = {normal_axis(a, len(data)) for a in axes}
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
        axis = normal_axis(axis, len(data))
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
    axes_input = len(node.input) > 1 and node.input[1]
    axes = facts.ints(node.input[1]) if axes_input else attr(node, "axes")
    if data is None or (axes_input and axes is None):  # axes computed at run time: unknown
        return [None]
    axes = {normal_axis(a, len(data)) for a in (axes if axes is not None else range(len(data)))}
    if node.op_type == "ArgMax" or node.op_type == "ArgMin":
        axes = {normal_axis(attr(node, "axis", 0), len(data))}
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


def value_dtype(node, facts) -> int | None:
    """The element type of a value rule's output: Shape gives int64, Cast its `to`, Equal bool,
    Where its second operand's, ConstantOfShape its fill's, the others their first operand's."""
    if node.op_type == "Shape":
        return onnx.TensorProto.INT64
    if node.op_type == "Cast":
        return attr(node, "to")
    if node.op_type == "Equal":
        return onnx.TensorProto.BOOL
    if node.op_type == "ConstantOfShape":
        fill = attr(node, "value")
        return onnx.TensorProto.FLOAT if fill is None else fill.data_type
    return facts.dtypes.get(node.input[1 if node.op_type == "Where" else 0])


def values_of(node, facts) -> list[Dims | None]:
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "Split":
        return _values_split(node, facts)
    rule = VALUE_RULES.get(node.op_type)
    return [rule(node, facts)] if rule else []
