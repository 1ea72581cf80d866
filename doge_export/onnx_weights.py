"""One weights file for both graphs: deduplicate initializers by content, name them once.

The exporter writes each graph with its own copies of the weights (and, for TorchScript, names
like `onnx::MatMul_123`). Here every initializer above a small size is hashed; equal tensors get
one canonical name in both graphs and one region of `weights.bin`, so prefill and step share the
file on disk and a runtime can share one in-memory copy (ONNX Runtime: add_initializer).

Large Constant nodes are weights too: the exporter writes tensors it computed at export (the
dynamic-RoPE inverse-frequency table, [6145, 64] fp32, 1.5 MiB) as Constant nodes inside each
graph. Left there, every ONNX Runtime session held its own copies of it (the parsed graph and
the initializer made from it): 1.5-1.9 MiB more per session for Doge-20M (2026-12-03). They are
made initializers first, so they land in weights.bin and are shared like any weight.

The listing marks the tensors that graphs Gather rows of (`"gathered": true`: the embedding, its
quantized scales, the RoPE table): a runtime that maps weights.bin reads only a few rows of them
per token, so it can keep their pages from being mapped 64 KiB at a time (runtime contract §4).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto

INLINE_LIMIT = 1024  # bytes: smaller constants stay inside the graph
ALIGN = 64  # bytes: every tensor starts on a 64-byte boundary (mmap- and SIMD-friendly)
# op type -> the inputs it reads rows of (the data, and GatherBlockQuantized's scales)
GATHERED_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2)}


def _raw_bytes(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def _content_key(tensor: TensorProto, data: bytes) -> tuple:
    return (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:  # subgraphs (If/Loop) may read initializers too
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, renames)
    for out in graph.output:
        if out.name in renames:
            raise AssertionError(f"initializer {out.name} is a graph output")


def _canonical_name(name: str, taken: dict[str, dict]) -> str:
    base = name if not name.startswith("onnx::") else "weight"
    candidate, n = base, 0
    while candidate in taken:
        n += 1
        candidate = f"{base}.{n}"
    return candidate


def constants_to_initializers(graph: onnx.GraphProto, min_bytes: int = INLINE_LIMIT) -> int:
    """Constant nodes holding a tensor of min_bytes or more become initializers of the same name
    (top-level graph only); -> how many moved."""
    keep, moved = [], 0
    for node in graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and node.attribute[0].name == "value" and len(_raw_bytes(value)) >= min_bytes:
            tensor = graph.initializer.add()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            moved += 1
        else:
            keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def share_weights(models: dict[str, onnx.ModelProto], out_dir: Path, file_name: str = "weights.bin") -> dict:
    """Move the large initializers (and large Constant nodes) of all `models` into one
    deduplicated external file.

    Mutates the models (initializers become external references); returns stats.
    """
    regions: dict[tuple, tuple[str, int, int]] = {}  # content key -> (name, offset, length)
    tensors = []  # the manifest's listing: what a runtime needs to map the file itself
    listed: dict[str, dict] = {}  # canonical name -> its entry in tensors
    offset = 0
    with open(out_dir / file_name, "wb") as f:
        for model in models.values():
            constants_to_initializers(model.graph)
            gathered = _gathered_names(model.graph)
            renames = {}
            for tensor in model.graph.initializer:
                data = _raw_bytes(tensor)
                if len(data) < INLINE_LIMIT:
                    continue
                key = _content_key(tensor, data)
                if key not in regions:
                    pad = (-offset) % ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                    f.write(data)
                    regions[key] = (_canonical_name(tensor.name, listed), offset, len(data))
                    tensors.append(_listing(tensor, *regions[key]))
                    listed[regions[key][0]] = tensors[-1]
                    offset += len(data)
                name, start, length = regions[key]
                if tensor.name in gathered:
                    listed[name]["gathered"] = True
                if tensor.name != name:
                    renames[tensor.name] = name
                tensor.name = name
                _make_external(tensor, file_name, start, length)
            _rename_inputs(model.graph, renames)
            _dedupe_initializer_list(model.graph)
    return {"file": file_name, "bytes": offset, "tensors": tensors}


def _gathered_names(graph: onnx.GraphProto) -> set[str]:
    return {node.input[i] for node in graph.node for i in GATHERED_INPUTS.get(node.op_type, ())
            if i < len(node.input)}


def _listing(tensor: TensorProto, name: str, offset: int, length: int) -> dict:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
    if tensor.data_type == TensorProto.BFLOAT16:
        dtype = "bfloat16"
    return {"name": name, "dtype": dtype, "shape": list(tensor.dims), "offset": offset, "length": length}


def _make_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    tensor.data_location = TensorProto.EXTERNAL


def _dedupe_initializer_list(graph: onnx.GraphProto) -> None:
    """Within one graph, equal tensors now share a name: keep one initializer per name."""
    seen, keep = set(), []
    for tensor in graph.initializer:
        if tensor.name not in seen:
            seen.add(tensor.name)
            keep.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(keep)
