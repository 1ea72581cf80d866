"""Per-node TensorRT rules (facts/tensorrt.md §9) and the vocabulary every lint rule shares.

lint.py holds the graph-level rules and the entry points; each rule here takes the graph's lookup
tables (lint._Graph) and one node, and yields Findings that name that node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto as T

MIN_OPSET, MAX_OPSET = 9, 24  # the ONNX parser's supported range
MAX_RANK, TOPK_MAX_K = 8, 3840
MIN_FUSED_ROWS = 4  # measured, TensorRT-RTX 1.7.1 SM89: Attention with B*H*S_q < 4 static rows fails to build
TRT_CUSTOM_OPS = {"TRT_Attention", "TRT_KVCacheUpdate", "TRT_QuantizedAttention", "TRT_MoE"}
DENIED_OPS = {
    "Unique", "SplitToSequence", "ConcatFromSequence", "RegexFullMatch", "TfIdfVectorizer", "BitShift",
    "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "Multinomial",
    "Bernoulli", "Det", "Compress", "Col2Im", "CenterCropPad", "ImageDecoder", "MaxRoiPool", "MaxUnpool",
    "AffineGrid", "NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss", "MelWeightMatrix",
}
DENIED_PREFIXES = ("Sequence", "Optional", "String", "Bitwise")
BAD_DTYPES = {T.STRING, T.INT16, T.UINT16, T.UINT32, T.UINT64, T.COMPLEX64, T.COMPLEX128,
              T.FLOAT8E5M2, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2FNUZ}
FLOATS = {T.FLOAT, T.FLOAT16, T.BFLOAT16}
FLOAT_ONLY_OPS = {"Sqrt", "Reciprocal", "Exp", "Log", "Softplus", "Sigmoid", "Tanh", "Erf", "Sin", "Cos",
                  "Softmax", "LogSoftmax", "LayerNormalization", "RMSNormalization", "RotaryEmbedding",
                  "Attention"}
CAST_OK = FLOATS | {T.INT32, T.INT64, T.UINT8, T.BOOL}
CAST_WARN = {T.INT8: "INT8 casts are discouraged: quantize with QuantizeLinear/DequantizeLinear",
             T.DOUBLE: "TensorRT turns DOUBLE into FLOAT: cast to float32 explicitly"}
DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression"}  # Unique, Compress: denied outright
CONST_OPERANDS = {"Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"), "CumSum": (1, "axis"),
                  "OneHot": (1, "depth"), "Dropout": (2, "training_mode")}
SHAPE_OPERANDS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Slice": (1, 2),
                  "Range": (0, 1, 2), "TopK": (1,), "Tile": (1,)}
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}
CAUSAL_ADVICE = ("TensorRT applies an UPPER-LEFT causal mask, so with fewer queries than keys a query sees "
                 "only the first keys: pass an explicit bool attn_mask built from the positions "
                 "(or TRT_Attention causal_kind='lower_right', TensorRT 11)")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" (fails to parse or build, or runs wrong) | "warning"
    rule: str  # "R15-topk"
    node: str  # the node's name; for graph-level findings the tensor (or "model")
    op_type: str  # the node's op; "graph input", "tensor" or "model" for graph-level findings
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.severity} {self.rule} {self.op_type} '{self.node}': {self.message}"


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or a stand-in built from its first output for an unnamed node."""
    return node.name or f"<unnamed {node.op_type} -> {node.output[0] if node.output else '?'}>"


def _at(severity: str, rule: str, node: onnx.NodeProto, message: str) -> Finding:
    return Finding(severity, rule, node_label(node), node.op_type, message)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def _walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, If/Loop/Scan bodies included."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _walk(sub)


def _dtype_name(dtype: int | None) -> str:
    return T.DataType.Name(dtype) if dtype else "?"



def check_node(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        if op not in TRT_CUSTOM_OPS:
            yield _at("error", "R2-domain", node, f"'{node.domain}::{op}' is not built into TensorRT and needs a "
                      "plugin: express it in default-domain ONNX ops")
        return
    if op in DENIED_OPS or op.startswith(DENIED_PREFIXES) or not onnx.defs.has(op):
        yield _at("error", "R3-unsupported-op", node,
                  f"TensorRT's ONNX parser does not support '{op}': rewrite the graph without it")
        return
    for name in node.input[: 3 if op == "Attention" else 1] if op in FLOAT_ONLY_OPS else []:
        if g.dtype(name) not in (None, *FLOATS):
            yield _at("error", "R10-float-only", node, f"input '{name}' is {_dtype_name(g.dtype(name))}; TensorRT "
                      f"runs {op} in FLOAT/FLOAT16/BFLOAT16 only: Cast it to float first")
    if op in DATA_DEPENDENT_OPS:
        yield _at("error" if step_graph else "warning", "R21-data-dependent", node, f"{op}'s output shape "
                  "depends on data (and needs a plugin in TensorRT-RTX 1.7), which blocks CUDA graphs: "
                  "compute a fixed-size result instead (a mask with Where, or TopK)")
    controls = [i for i in node.input[:2] if i and i not in g.consts] if op in ("If", "Loop") else []
    if step_graph and controls:
        yield _at("error", "R21-data-dependent", node, f"{op} driven by tensor values {controls} blocks "
                  "CUDA-graph replay of a step graph: compute both branches and Where them, or unroll")
    rule = _OP_RULES.get(op) or (_check_constant if op.startswith("Reduce") else None)
    if rule is not None:
        yield from rule(g, node, step_graph)


def _check_matmul(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    for name in node.input[:2]:
        if g.dtype(name) not in (None, *FLOATS):
            yield _at("error", "R9-matmul-dtype", node, f"input '{name}' is {_dtype_name(g.dtype(name))}; "
                      f"TensorRT has no integer {node.op_type}: Cast the operands to float, or quantize with Q/DQ")


def _check_cast(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    to = _attr(node, "to") if node.op_type == "Cast" else g.dtype(node.input[1])
    if to is None or to in CAST_OK:
        return
    if to in CAST_WARN:
        yield _at("warning", "R11-cast-target", node, f"cast to {_dtype_name(to)}: {CAST_WARN[to]}")
    else:
        yield _at("error", "R11-cast-target", node, f"TensorRT cannot cast to {_dtype_name(to)}; quantized types "
                  "come only from Q/DQ: cast to FLOAT/FLOAT16/BFLOAT16/INT32/INT64/BOOL/UINT8")


def _check_logic(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    for name in node.input[:1] if node.op_type == "Where" else node.input:
        if g.dtype(name) not in (None, T.BOOL):
            yield _at("error", "R12-bool-logic", node, f"input '{name}' is {_dtype_name(g.dtype(name))}; "
                      f"TensorRT's {node.op_type} needs BOOL here: compare, or Cast to bool first")


def _check_outside_table(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    dtype = g.dtype(node.input[0])
    if node.op_type == "CumSum":
        yield from _check_constant(g, node)
    if dtype == T.BOOL or (node.op_type == "CumSum" and dtype in (T.INT32, T.INT64)):
        yield _at("warning", "R12-outside-table", node, f"{node.op_type} on {_dtype_name(dtype)} is outside "
                  "TensorRT's documented type table (it built in TensorRT-RTX 1.7): check your TensorRT version")


def _check_constant(g, node: onnx.NodeProto, step_graph: bool = False) -> Iterator[Finding]:
    index, what = CONST_OPERANDS.get(node.op_type, (1, "axes"))
    name = node.input[index] if index < len(node.input) else ""
    if name and name not in g.consts:
        yield _at("error", "R14-constant-operand", node, f"{what} '{name}' is not a build-time constant: make "
                  "it an initializer or a Constant node")
    value = g.consts.get(name)
    if node.op_type == "Dropout" and value is not None and bool(np.asarray(value).reshape(-1)[0]):
        yield _at("error", "R14-constant-operand", node, "training_mode is True: export in eval mode")


def _check_topk(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    if _attr(node, "sorted", 1) != 1:
        yield _at("error", "R15-topk", node, "TensorRT does not support TopK sorted=0: set sorted=1")
    k_name = node.input[1] if len(node.input) > 1 else None
    if k_name is not None and k_name not in g.consts:
        yield _at("warning", "R15-topk", node, f"K '{k_name}' is not constant, so it becomes a shape input "
                  "(set_shape_input, no CUDA graphs): make K an initializer if it is fixed")
        return
    k = _attr(node, "k") if k_name is None else g.consts[k_name]  # opset < 10: K is an attribute
    if k is not None and int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX_K:
        yield _at("error", "R15-topk", node, f"K={int(np.asarray(k).reshape(-1)[0])} exceeds TensorRT's maximum "
                  f"{TOPK_MAX_K}, so the build fails: take the top-k in chunks, or lower K")


def _check_layernorm(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    if len([o for o in node.output if o]) > 1:
        yield _at("error", "R16-layernorm-outputs", node,
                  "TensorRT's LayerNormalization has only output Y: drop the Mean/InvStdDev outputs")


def _check_attention(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    q_shape, q_dtype = g.shape(node.input[0]), g.dtype(node.input[0])
    mask = node.input[3] if len(node.input) > 3 else ""
    problems = [
        (len([o for o in node.output if o]) > 1, "has more than output Y; return present K/V from other nodes"),
        (any(node.input[4:7]), "has past_key/past_value/nonpad_kv_seqlen; pass the full K/V and an attn_mask"),
        (_attr(node, "softcap", 0.0) != 0.0, "sets softcap; remove it"),
        (_attr(node, "qk_matmul_output_mode") is not None, "sets qk_matmul_output_mode; remove it"),
        (q_shape is not None and not (len(q_shape) == 4 or (len(q_shape) == 3 and _attr(node, "q_num_heads")
                                                              and _attr(node, "kv_num_heads"))),
         f"has Q of shape {q_shape}; use rank 4, or rank 3 with q_num_heads/kv_num_heads"),
        (bool(mask) and len(g.shape(mask) or []) > 4, "has an attn_mask of rank > 4"),
        (bool(mask) and g.dtype(mask) not in (None, T.BOOL, q_dtype), "has an attn_mask that is neither BOOL "
         "nor the Q/K dtype"),
    ]
    for failed, message in problems:
        if failed:
            yield _at("error", "R17-attention", node, f"TensorRT rejects this Attention: it {message}")
    rows = _query_rows(q_shape, _attr(node, "q_num_heads"))
    if rows is not None and rows < MIN_FUSED_ROWS and _attr(node, "TRT_decomposable") != 1:
        yield _at("warning", "R17-attention-kernel", node, f"only {rows} query rows (batch x heads x length); "
                  "TensorRT-RTX 1.7.1 has no fused kernel below 4 and the SM89 build fails: add attribute "
                  "TRT_decomposable=1 (not standard ONNX), or write the attention as MatMul/Softmax/MatMul")
    if _attr(node, "is_causal", 0) == 1 and step_graph:
        yield _at("error", "R17-attention-causal", node, f"is_causal=1 in a step graph: {CAUSAL_ADVICE}")
    elif _attr(node, "is_causal", 0) == 1 and not _same_length(q_shape, g.shape(node.input[1])):
        yield _at("warning", "R17-attention-causal", node,
                  f"is_causal=1 where the query length may differ from the key length: {CAUSAL_ADVICE}")


def _query_rows(q_shape, q_num_heads: int | None) -> int | None:
    """batch x query heads x query length, when static; rank 3 is [B, S, heads * D]."""
    if q_shape is None or not all(isinstance(d, int) for d in q_shape):
        return None
    if len(q_shape) == 4:
        return q_shape[0] * q_shape[1] * q_shape[2]
    return q_shape[0] * q_shape[1] * q_num_heads if len(q_shape) == 3 and q_num_heads else None


def _same_length(q_shape, k_shape) -> bool:
    axis = -2 if q_shape is not None and len(q_shape) == 4 else 1
    return q_shape is not None and k_shape is not None and q_shape[axis] is not None \
        and q_shape[axis] == k_shape[axis]


def _check_tensor_scatter(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    cache, update = node.input[0], node.input[1]
    shape, axis, dtype = g.shape(cache), _attr(node, "axis", -2), g.dtype(cache)
    index = node.input[2] if len(node.input) > 2 else ""
    problems = [
        ((g.opset or 0) < 24, f"needs opset >= 24 (the model has {g.opset})"),
        (_attr(node, "mode", "linear") != "linear", "supports only mode='linear'"),
        (shape is not None and (len(shape) != 4 or axis not in (-2, 2)), f"needs a rank-4 cache and axis=-2, "
         f"got {shape} and axis={axis}"),
        (cache not in g.inputs, f"needs past_cache '{cache}' to be a graph input, with no Identity/Cast between"),
        (cache in g.inputs and shape is not None and len(shape) == 4 and not isinstance(shape[axis], int),
         f"needs a static size on the cache axis, got {shape}: export with a fixed capacity"),
        (dtype not in (None, *FLOATS) or dtype != (g.dtype(update) or dtype), "needs past_cache and update of "
         "one dtype, FLOAT/FLOAT16/BFLOAT16"),
        (bool(index) and g.dtype(index) not in (None, T.INT32, T.INT64), "needs INT32/INT64 write_indices"),
        (node.output[0] not in g.outputs, f"needs its output '{node.output[0]}' to be a graph output (TensorRT "
         "aliases it onto the cache input)"),
    ]
    for failed, message in problems:
        if failed:
            yield _at("error", "R18-tensorscatter", node, f"TensorRT's KV-cache update {message}")


def _check_scatter(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    if node.op_type == "ScatterND" and _attr(node, "reduction", "none") != "none":
        yield _at("error", "R19-scatter", node, f"TensorRT supports ScatterND only with reduction='none', got "
                  f"'{_attr(node, 'reduction')}': scatter, then reduce with separate ops")
    if node.op_type == "ScatterElements" and g.dtype(node.input[0]) == T.BOOL:
        yield _at("error", "R19-scatter", node, "TensorRT's ScatterElements does not take BOOL data: "
                  "scatter an INT32 Cast and compare back")


def _check_rope(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    if len(node.input) > 3 and node.input[3] and g.dtype(node.input[3]) not in (None, T.INT64):
        yield _at("error", "R22-rope", node, f"position_ids '{node.input[3]}' must be INT64 for TensorRT: Cast it")


def _check_qdq(g, node: onnx.NodeProto, step_graph: bool) -> Iterator[Finding]:
    zp = node.input[2] if len(node.input) > 2 else ""
    value = g.consts.get(zp)
    if zp and (zp not in g.consts or (value is not None and np.any(value.astype(np.float64) != 0))):
        yield _at("error", "R22-qdq-zero-point", node, f"zero point '{zp}' is not a constant zero; TensorRT "
                  "quantizes symmetrically only: drop the zero point")


_OP_RULES = {
    "MatMul": _check_matmul, "Gemm": _check_matmul, "Cast": _check_cast, "CastLike": _check_cast,
    **dict.fromkeys(("Not", "And", "Or", "Xor", "Where"), _check_logic),
    **dict.fromkeys(("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "CumSum"), _check_outside_table),
    **dict.fromkeys(("Squeeze", "Unsqueeze", "OneHot", "Dropout"), _check_constant),
    "TopK": _check_topk, "LayerNormalization": _check_layernorm, "Attention": _check_attention,
    "TensorScatter": _check_tensor_scatter, "ScatterND": _check_scatter, "ScatterElements": _check_scatter,
    "RotaryEmbedding": _check_rope, "QuantizeLinear": _check_qdq, "DequantizeLinear": _check_qdq,
}

