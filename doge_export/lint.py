"""TensorRT compatibility lint for ONNX graphs (the rules of facts/tensorrt.md §9).

`lint_static` needs only `onnx`; `lint_with_tensorrt` runs the real ONNX parser and an AOT build
(TensorRT-RTX does both on a machine without a GPU). Both return findings; a bad graph never raises.
Rule ids are "R<n>-<name>", n being the rule's number in facts/tensorrt.md §9 (R0: not from §9).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import numpy_helper, shape_inference

from .lint_rules import (  # noqa: F401  (Finding and errors are part of this module's API)
    BAD_DTYPES, MAX_OPSET, MAX_RANK, MIN_OPSET, NONDETERMINISTIC, SHAPE_OPERANDS, Finding, _at, _attr,
    _dtype_name, _subgraphs, _walk, check_node, errors, node_label,
)


class _Graph:
    """What the rules look up: inferred types, build-time constants and the graph's I/O."""

    def __init__(self, model: onnx.ModelProto):
        self.inference_error = None
        try:
            model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as e:  # >2 GB protos, unregistered domains: keep the declared types
            self.inference_error = f"{type(e).__name__}: {e}"
        self.model, g = model, model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.types: dict[str, onnx.TypeProto] = {}
        self.init_dtypes: dict[str, int] = {}
        for sub in [g, *(s for n in _walk(g) for s in _subgraphs(n))]:
            for vi in [*sub.input, *sub.output, *sub.value_info]:
                if vi.type.HasField("tensor_type"):
                    self.types.setdefault(vi.name, vi.type)
            self.init_dtypes.update({i.name: i.data_type for i in sub.initializer})
        self.inputs = [vi.name for vi in g.input if vi.name not in self.init_dtypes]
        self.outputs = [vo.name for vo in g.output]
        self.consts = self._constants(g)

    def _constants(self, g: onnx.GraphProto) -> dict[str, np.ndarray | None]:
        """Tensors TensorRT sees as build-time constants; the value is None where not read here."""
        overridable = {vi.name for vi in g.input}
        consts = {i.name: _small_value(i) for i in g.initializer if i.name not in overridable}
        for node in g.node:
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant" and _attr(node, "value") is not None:
                consts[node.output[0]] = _small_value(_attr(node, "value"))
            elif node.op_type == "Shape" and self.is_static(node.input[0]):
                consts[node.output[0]] = None
            elif inputs and all(i in consts for i in inputs) and not _subgraphs(node) \
                    and node.op_type not in NONDETERMINISTIC:
                value = consts[inputs[0]] if node.op_type == "Identity" else None
                consts.update({o: value for o in node.output})
        return consts

    def dtype(self, name: str) -> int | None:
        if name in self.types:
            return self.types[name].tensor_type.elem_type or None
        return self.init_dtypes.get(name)

    def shape(self, name: str) -> list[int | str | None] | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def is_static(self, name: str) -> bool:
        shape = self.shape(name)
        return shape is not None and all(isinstance(d, int) for d in shape)


def _small_value(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The value of a small in-proto tensor (axes, K, zero points); None for weights."""
    if tensor.data_location == T.EXTERNAL or int(np.prod(tensor.dims)) > 4096:
        return None
    return numpy_helper.to_array(tensor)


def lint_static(model: onnx.ModelProto, *, step_graph: bool = False,
                fixed_dims: dict[str, int] | None = None) -> list[Finding]:
    """Check an ONNX model against the static TensorRT rules of facts/tensorrt.md §9.

    Args:
        model: the graph to check; external weights need not be loaded.
        step_graph: the graph is a decode step for CUDA-graph replay: every input dim must be
            static, no op may have a data-dependent shape, and Attention `is_causal=1` is an error.
        fixed_dims: symbolic dims that the engine's profile pins to one value (min = opt = max),
            e.g. {"batch": 1} for a step engine built for batch 1: they count as static.

    Returns:
        Every finding, errors and warnings, each naming its node; [] means the graph passes.
    """
    g = _Graph(model)
    findings = [] if g.inference_error is None else [Finding(
        "warning", "R0-inference", "model", "model",
        f"shape inference failed ({g.inference_error}); dtype rules see only declared types")]
    findings += _check_opset(g)
    findings += _check_io(g, step_graph, fixed_dims or {})
    findings += _check_dtypes(g)
    findings += _check_shape_tensors(g)
    for node in _walk(model.graph):
        findings += check_node(g, node, step_graph)
    return findings


def _check_opset(g: _Graph) -> list[Finding]:
    if g.opset is None or g.opset < MIN_OPSET:
        return [Finding("error", "R1-opset", "model", "model", f"default-domain opset is {g.opset}; "
                        f"TensorRT parses opset {MIN_OPSET}-{MAX_OPSET}: re-export with opset >= 17")]
    if g.opset > MAX_OPSET:
        return [Finding("warning", "R1-opset", "model", "model", f"opset {g.opset} is past the parser's range "
                        f"{MIN_OPSET}-{MAX_OPSET}; newer op versions may be misread: export with opset <= {MAX_OPSET}")]
    return []


def _check_io(g: _Graph, step_graph: bool, fixed_dims: dict[str, int]) -> Iterator[Finding]:
    for names in (g.inputs, g.outputs):
        for name in sorted({n for n in names if names.count(n) > 1}):
            yield Finding("error", "R6-io-names", name, "graph input",
                          f"'{name}' names more than one graph input or output: rename them apart")
    for name in sorted(set(g.inputs) & set(g.outputs)):
        yield Finding("error", "R6-io-names", name, "graph input", f"'{name}' is both a graph input and output; "
                      f"the parser renames the input to '__{name}': route the output through an Identity")
    for name in g.inputs:
        yield from _check_input_shape(g, name, step_graph, fixed_dims)


def _check_input_shape(g: _Graph, name: str, step_graph: bool, fixed_dims: dict[str, int]) -> Iterator[Finding]:
    def finding(severity: str, rule: str, message: str) -> Finding:
        return Finding(severity, rule, name, "graph input", f"graph input '{name}' {message}")

    shape = g.shape(name)
    if shape is None:
        yield finding("error", "R5-input-shape", "has no shape, so TensorRT imports it as a scalar: "
                      "declare its shape (dim_param for the dynamic dims)")
        return
    if len(shape) > MAX_RANK:
        yield finding("error", "R5-input-shape", f"has rank {len(shape)} > {MAX_RANK}: reshape it")
    dynamic = [d for d in shape if not isinstance(d, int) and d not in fixed_dims]
    if step_graph and dynamic:
        yield finding("error", "R21-step-static", f"has dynamic dims {shape}; CUDA-graph replay needs every "
                      "step-graph dim static: build the step engine with a one-point profile (doge-export trt "
                      "--batch N; lint with fixed_dims), or export the step with fixed dims")
    elif None in dynamic:
        yield finding("warning", "R5-input-shape", f"has an unnamed dynamic dim {shape}: name it (dim_param) "
                      "so that optimization profiles can be generated")


def _check_dtypes(g: _Graph) -> Iterator[Finding]:
    io = set(g.inputs) | set(g.outputs)
    producers = {o: n for n in _walk(g.model.graph) for o in n.output}
    for name in sorted(set(g.types) | set(g.init_dtypes)):
        dtype, node = g.dtype(name), producers.get(name)
        where = (node_label(node), node.op_type) if node else (name, "graph input" if name in io else "tensor")
        if dtype in BAD_DTYPES:
            yield Finding("error", "R4-dtype", *where, f"tensor '{name}' is {_dtype_name(dtype)}, which TensorRT "
                          "cannot hold: use FLOAT/FLOAT16/BFLOAT16/INT32/INT64/BOOL")
        elif dtype == T.DOUBLE:
            yield Finding("warning", "R4-dtype", *where,
                          f"tensor '{name}' is DOUBLE, silently downcast to FLOAT: export it as float32")
        elif dtype == T.UINT8 and name not in io:
            yield Finding("error", "R4-dtype", *where, f"tensor '{name}' is UINT8 inside the graph; TensorRT "
                          "allows UINT8 only at graph inputs and outputs: cast right after the input")


def _check_shape_tensors(g: _Graph) -> Iterator[Finding]:
    """R8: a rank-0/1 integer input whose values reach a shape operand becomes a shape tensor."""
    for name in g.inputs:
        shape = g.shape(name)
        if g.dtype(name) not in (T.INT32, T.INT64) or shape is None or len(shape) > 1:
            continue
        tainted = {name}
        for node in g.model.graph.node:
            operands = [node.input[i] for i in SHAPE_OPERANDS.get(node.op_type, ()) if i < len(node.input)]
            if tainted.intersection(operands):
                yield _at("warning", "R8-shape-tensor", node, f"graph input '{name}' reaches a shape operand "
                          "here, so it becomes a shape tensor (host memory, set_shape_input, no CUDA graphs): "
                          "keep it as data or make the shape static")
                break
            if tainted.intersection(node.input):
                tainted.update(node.output)


def lint_with_tensorrt(
    onnx_path: str | Path,
    *,
    flavor: str,
    compute_capability: str = "8.9",
    profiles: dict[str, tuple] | None = None,
    dynamic_dim_max: int = 64,
) -> list[Finding]:
    """Run TensorRT's real ONNX parser and builder on a file; report what fails, node by node.

    Args:
        onnx_path: the model file (external weights resolve relative to it).
        flavor: "tensorrt-rtx" (AOT for `compute_capability`, works without a GPU) or "tensorrt"
            (builds for the local GPU, so it needs one).
        profiles: input name -> (min, opt, max) shapes; None means each dynamic dim spans
            1..dynamic_dim_max with opt 1.

    Returns:
        Findings: parser errors with the node's name and op, or the errors the build logged, with the
        node named where the message names one. A missing TensorRT raises DogeExportError.
    """
    return build_with_findings(onnx_path, flavor=flavor, compute_capability=compute_capability,
                               profiles=profiles, dynamic_dim_max=dynamic_dim_max)[1]


def build_with_findings(onnx_path: str | Path, *, flavor: str, compute_capability: str = "8.9",
                        profiles: dict[str, tuple] | None = None, dynamic_dim_max: int = 64, **build_options):
    """lint_with_tensorrt's parse + build that keeps the plan: -> (BuildResult or None, findings).

    `build_options` go to trt_build.build_plan (workspace_bytes, optimization_level,
    timing_cache_path, hardware_compatibility); bad options raise DogeExportError.
    """
    import time

    from doge_export import trt_build

    trt = trt_build.trt_module(flavor)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ops = {n.name: n.op_type for n in _walk(graph) if n.name}
    parsed = trt_build.network_from_onnx(trt, onnx_path, flavor=flavor)
    if parsed.errors:
        return None, [Finding("error", "R0-trt-parse", e.node_name or f"node #{e.node_index}", e.op_type,
                              f"{flavor} {trt.__version__} parser: {e.desc}") for e in parsed.errors]
    if profiles is None:
        profiles = trt_build.default_profiles(parsed.network, dynamic_dim_max)
    start = time.perf_counter()
    plan, messages = trt_build.build_plan(trt, parsed, flavor=flavor, compute_capability=compute_capability,
                                          profiles=profiles, **build_options)
    if plan is not None:
        seconds = time.perf_counter() - start
        return trt_build.BuildResult(bytes(plan), seconds, flavor, trt.__version__, compute_capability), []
    found = [(m, _named_node(m, ops)) for m in messages or ["the build returned no plan and logged no error"]]
    return None, [Finding("error", "R0-trt-build", node, ops.get(node, ""),
                          f"{flavor} {trt.__version__} build for {compute_capability}: {m}") for m, node in found]


def _named_node(message: str, names) -> str:
    """The longest ONNX node name in a builder message (layers may add a suffix: `name_OutputLayer`)."""
    hits = [n for n in names if re.search(rf"(?<![\w./]){re.escape(n)}(?![A-Za-z0-9/]|\.\w)", message)]
    return max(hits, key=len, default="")
