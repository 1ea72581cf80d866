"""Export side of the rows-layout graphs (backends/ort_rows.py says why and when they run).

`write_rows_graphs` derives prefill.rows.onnx and step.rows.onnx from the exported graphs: the
tied matrix becomes a graph input ROWS [vocab, hidden] (the transpose of the initializer
lm_weight_t [hidden, vocab]), read by

    Gather(lm_weight_t, ids, axis=1) -> Transpose([1,0])   =>  Gather(lm_weight, ids, axis=0)
    MatMul(h [B,H], lm_weight_t)                            =>  Transpose(MatMul(lm_weight, h^T))

An input rather than an initializer: ONNX Runtime neither constant-folds nor prepacks an input,
and a program that loads the graph without supplying the matrix gets an error, not garbage.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from .backends.ort_rows import COLUMNS, ROWS, ROWS_MIN_BATCH

GRAPHS = ("prefill", "step")


def write_rows_graphs(folder: Path, weights: dict) -> dict | None:
    """Write {graph}.rows.onnx next to {graph}.onnx; returns the manifest's "lm_rows" entry, or
    None where the artifact has no fp32 tied matrix or a graph reads it some other way."""
    entry = next((t for t in weights["tensors"] if t["name"] == COLUMNS and t["dtype"] == "float32"), None)
    if entry is None:
        return None
    models = {}
    for graph in GRAPHS:
        model = onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)
        if not rewrite_for_rows(model):
            return None
        models[graph] = model
    for graph, model in models.items():
        onnx.save(model, str(folder / f"{graph}.rows.onnx"))
        onnx.checker.check_model(str(folder / f"{graph}.rows.onnx"))
    hidden, vocab = entry["shape"]
    return {
        "graphs": {g: f"{g}.rows.onnx" for g in GRAPHS},
        "input": {"name": ROWS, "shape": [vocab, hidden], "dtype": "float32",
                  "value": f"the transpose of the initializer {COLUMNS} (weights file)"},
        "min_batch": ROWS_MIN_BATCH,
        "why": f"from {ROWS_MIN_BATCH} rows on, the lm_head over [vocab, hidden] streams unpacked as fast as a "
               "prepacked [hidden, vocab] one, so a CPU session needs no second copy of the tied matrix; "
               "below that, the default graphs are faster (docs/runtime-contract.md section 4)",
    }


def rewrite_for_rows(model: onnx.ModelProto) -> bool:
    """In place: COLUMNS's readers read the input ROWS instead; False (model untouched) if a reader
    is neither of the two patterns."""
    graph = model.graph
    nodes = _rows_nodes(graph)
    if nodes is None:
        return False
    del graph.node[:]
    graph.node.extend(nodes)
    columns = next(t for t in graph.initializer if t.name == COLUMNS)
    hidden, vocab = columns.dims
    graph.initializer.remove(columns)
    graph.input.append(helper.make_tensor_value_info(ROWS, onnx.TensorProto.FLOAT, [vocab, hidden]))
    return True


def _rows_nodes(graph) -> list | None:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    if COLUMNS not in {t.name for t in graph.initializer}:
        return None
    rank = {o.name: len(o.type.tensor_type.shape.dim) for o in graph.output}
    nodes, dropped = [], set()
    for node in graph.node:
        if id(node) in dropped:
            continue
        if COLUMNS not in node.input:
            nodes.append(node)
        elif _is_embedding(node, consumers):
            (transpose,) = consumers[node.output[0]]
            nodes.append(helper.make_node("Gather", [ROWS, node.input[1]], list(transpose.output),
                                          name=f"{node.name}/rows", axis=0))
            dropped.add(id(transpose))
        elif node.op_type == "MatMul" and list(node.input) == [node.input[0], COLUMNS] and rank.get(node.output[0]) == 2:
            h, out = node.input[0], node.output[0]
            nodes += [helper.make_node("Transpose", [h], [f"{h}/rows_t"], name=f"{node.name}/rows_h", perm=[1, 0]),
                      helper.make_node("MatMul", [ROWS, f"{h}/rows_t"], [f"{out}/rows_t"], name=f"{node.name}/rows"),
                      helper.make_node("Transpose", [f"{out}/rows_t"], [out], name=f"{node.name}/rows_out", perm=[1, 0])]
        else:
            return None
    return nodes


def _is_embedding(node, consumers) -> bool:
    """Gather(COLUMNS, ids, axis=1) read only by a Transpose [1,0] (so ids is one-dimensional)."""
    if node.op_type != "Gather" or node.input[0] != COLUMNS:
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    readers = consumers.get(node.output[0], [])
    return (axis == 1 and len(readers) == 1 and readers[0].op_type == "Transpose"
            and [list(a.ints) for a in readers[0].attribute if a.name == "perm"] == [[1, 0]])
