"""ONNX Runtime's graph optimizer run once, at export, on the CPU-only (quantized) graphs.

Why: an ONNX Runtime session keeps per-node structures for the graph it was *given*, not only
for the graph its optimizer leaves, so a session over the torch exporter's graph holds the
shape arithmetic that constant folding removed. Measured on int4 Doge-20M (2026-12-03, anonymous
memory a session adds, prepacking off): step 5.8 -> 3.8 MiB, prefill 9.5 -> 6.6 MiB; the C++
runtime's peak RSS 52.2 -> 46.2 MiB. The runtimes optimize again at load (ORT_ENABLE_ALL), which
finds nothing more to fold, so the kernels that run are the same.

Level EXTENDED: constant folding, redundant nodes removed and ONNX Runtime's CPU fusions
(SimplifiedLayerNormalization, FusedMatMul, ...): contrib ops, as MatMulNBits already is, but no
machine-specific layout (that is level ALL, which ORT warns must not leave the machine). The
batch dimension stays free: no dimension is specialized here.

Before the graphs are saved, their shape arithmetic is rewritten to read the graph inputs
(shape_canon.py) and optimized again: the per-layer copies then merge. Measured on int4 Doge-20M
(2026-12-03): prefill 1526 -> 850 nodes, session 6.6 -> 4.0 MiB; step 772 -> 592 nodes, 3.9 ->
3.2 MiB; the C++ runtime's peak RSS 42.5 -> 40.4 MiB. The rewrite is kept only where both graphs
give the same outputs on a few prompts and states (`optimize_graphs`).

Only quantized artifacts get this: their graphs run on ONNX Runtime's CPU kernels only, while
the fp32 graphs must stay standard ONNX for TensorRT and the lint (DESIGN §2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from .shape_canon import outputs_agree, shapes_from_inputs
from .shape_const import constant_operands
from .spec import ModelInfo

LEVEL = "extended"


def optimize_offline(model: onnx.ModelProto) -> onnx.ModelProto:
    """-> `model` as ONNX Runtime's optimizer saves it at level EXTENDED (initializers inline;
    inputs, outputs and their symbolic dimensions unchanged)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="doge-ort-offline-") as tmp:
        source, optimized = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(source))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.disable_prepacking", "1")  # no packed copies: only the graph
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        result = onnx.load(str(optimized))
    _check_interface(model, result)
    return result


def optimize_graphs(graphs: dict[str, onnx.ModelProto], info: ModelInfo, log=print) -> tuple[dict, dict]:
    """{"prefill", "step"} -> (the same optimized and with shared shape arithmetic, the manifest's
    record of it: `offline_record` plus, per graph, how many Shape nodes read the inputs now and
    how many shape operands became constants)."""
    optimized = {g: optimize_offline(model) for g, model in graphs.items()}
    feeds = agreement_feeds(optimized["prefill"], info)
    record = {**offline_record(), "shapes_from_inputs": {}, "constant_operands": {}}
    for g, model in optimized.items():
        rewritten, read, constants = _shared_shapes(model)
        if (read or constants) and outputs_agree(model, rewritten, feeds[g]):
            log(f"  {g}: {read} Shape nodes read the graph inputs, {constants} shape operands are constants; "
                f"{len(model.graph.node)} -> {len(rewritten.graph.node)} nodes")
            optimized[g] = rewritten
            record["shapes_from_inputs"][g], record["constant_operands"][g] = read, constants
        elif read or constants:
            log(f"  {g}: shape rewrite changed the outputs; kept the graph without it (please report this)")
    return optimized, record


def _shared_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """-> (`model` with its Shape nodes reading the inputs, then its shape operands constant where
    they can be, optimized again; how many Shape nodes; how many operands)."""
    rewritten, read = shapes_from_inputs(model)
    rewritten, constants = constant_operands(optimize_offline(rewritten))
    return optimize_offline(rewritten), read, constants


def agreement_feeds(prefill: onnx.ModelProto, info: ModelInfo) -> dict[str, list[dict]]:
    """Inputs to compare two versions of each graph on: prompts of 1, 5 (left-padded, batch 2)
    and up to 33 tokens; steps over the state the 5-token prefill left, at all C slots and at
    the first 64 (the step takes any first S slots)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    prompts = []
    for batch, length in ((1, 1), (2, min(5, info.max_prompt)), (1, min(33, info.max_prompt))):
        mask = np.ones((batch, length), np.int64)
        mask[1:, :1] = 0
        prompts.append({"input_ids": rng.integers(3, info.vocab_size, (batch, length)), "attention_mask": mask,
                        "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)})
    session = ort.InferenceSession(prefill.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    state = dict(zip(names, session.run(None, prompts[1])))
    steps = []
    for slots in sorted({info.capacity, min(64, info.capacity)}):
        feed = {n: v[:, :, :slots] for n, v in state.items() if n != "logits"}
        steps.append({**feed, "input_ids": rng.integers(3, info.vocab_size, (2, 1)),
                      "position_ids": prompts[1]["position_ids"][:, -1:] + 1})
    return {"prefill": prompts, "step": steps}


def offline_record() -> dict:
    """The manifest's note of it: the graphs need an ONNX Runtime that has these contrib ops."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "level": LEVEL}


def _check_interface(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The runtimes bind by name and override the `batch` dimension: both must survive."""
    def interface(model):
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*model.graph.input, *model.graph.output]]
    assert interface(before) == interface(after), "ONNX Runtime's optimizer changed the graph's inputs or outputs"
