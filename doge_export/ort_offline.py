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

Only quantized artifacts get this: their graphs run on ONNX Runtime's CPU kernels only, while
the fp32 graphs must stay standard ONNX for TensorRT and the lint (DESIGN §2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

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
