"""torch -> two ONNX graphs (prefill, step) that share one weights file.

Exporter: the TorchScript exporter (`dynamo=False`) by default. Measured on Doge-20M here
(benchmarks/exporter_choice.md): it traces both wrappers in seconds, while the dynamo exporter
takes minutes per graph; its one drawback, tied weights written twice, does not arise because
the wrappers hold the tied matrix once and onnx_weights.py deduplicates whatever remains.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from . import spec
from .errors import DogeExportError
from .onnx_weights import share_weights
from .quantize import BLOCK_SIZE as QUANT_BLOCK
from .precision import dtype_name, model_dtype, torch_dtype
from .spec import ModelInfo
from .wrappers import PrefillWrapper, StepWrapper

EXPORTERS = ("torchscript", "dynamo")
QUANT_BLOCKS = (16, 32, 64, 128, 256)  # --quant-block choices
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64}


@dataclass(frozen=True)
class ExportConfig:
    max_context: int | None = None  # None: 4 x max_position_embeddings (the dynamic NTK range)
    max_prompt: int | None = None  # None: min(max_context, max_position_embeddings)
    full_logits: bool = False
    exporter: str = "torchscript"
    opset: int = 17
    dtype: str = "float32"  # graph dtype: float32, float16 or bfloat16 (fp32/fp16/bf16 accepted)
    quantize: str | None = None  # weight-only "int8" / "int4" after validation (quantize.py); fp32 only
    quant_block: int = QUANT_BLOCK  # input features per quantization scale

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.quantize is not None:
            if self.quantize not in ("int8", "int4"):
                raise DogeExportError(f"--quantize {self.quantize!r} is not supported; choose int8 or int4")
            if self.dtype != "float32":
                raise DogeExportError(f"--quantize needs fp32 graphs (CPU weight-only quantization), got "
                                      f"--dtype {self.dtype}; drop one of the two options")
        if self.quant_block not in QUANT_BLOCKS:
            raise DogeExportError(f"--quant-block must be one of {', '.join(map(str, QUANT_BLOCKS))} (a power "
                                  f"of two that MatMulNBits takes), got {self.quant_block}")
        if self.quant_block != QUANT_BLOCK and self.quantize is None:
            raise DogeExportError("--quant-block sets the block of --quantize int8|int4; add --quantize, "
                                  "or drop --quant-block")
        if self.exporter not in EXPORTERS:
            raise DogeExportError(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        for name in ("max_context", "max_prompt"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DogeExportError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def model_info(config, export: ExportConfig) -> ModelInfo:
    """The artifact's ModelInfo from a DogeConfig and the export options."""
    max_context = export.max_context or 4 * config.max_position_embeddings
    max_prompt = export.max_prompt or min(max_context, config.max_position_embeddings)
    if max_prompt > max_context:
        raise DogeExportError(f"--max-prompt {max_prompt} exceeds --max-context {max_context}")
    eos = config.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return ModelInfo(
        vocab_size=config.vocab_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        capacity=min(max_context, config.keep_window_size),
        keep_window_size=config.keep_window_size,
        max_prompt=max_prompt,
        max_context=max_context,
        dtype=export.dtype,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None),
        full_logits=export.full_logits,
    )


def _example_prefill(info: ModelInfo):
    T = min(5, info.max_prompt)
    ids = torch.randint(3, info.vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.int64)
    mask[1, :1] = 0  # a left-padded row, so no padding path is traced away
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _example_step(info: ModelInfo):
    B, G, C, D = 2, info.num_kv_heads, info.capacity, info.head_dim
    dtype = torch_dtype(info.dtype)
    ids = torch.randint(3, info.vocab_size, (B, 1))
    pos = torch.full((B, 1), 7, dtype=torch.int64)
    state = []
    for _ in range(info.num_layers):
        position = torch.arange(C).expand(B, G, C).contiguous()
        state += [torch.randn(B, G, C, D).to(dtype), torch.randn(B, G, C, D).to(dtype),
                  torch.rand(B, G, C).to(dtype), position]
    return (ids, pos, *state)


def _dynamic_axes(specs: list[spec.TensorSpec]) -> dict:
    axes = {}
    for s in specs:
        dyn = {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
        if dyn:
            axes[s.name] = dyn
    return axes


def onnx_from_torch(wrapper, args, inputs, outputs, export: ExportConfig, path: Path) -> onnx.ModelProto:
    """Trace `wrapper(*args)` into an ONNX graph whose I/O follows `inputs`/`outputs` (spec)."""
    names_in, names_out = [s.name for s in inputs], [s.name for s in outputs]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, str(path), input_names=names_in, output_names=names_out,
            dynamic_axes=_dynamic_axes(inputs + outputs), opset_version=export.opset,
            dynamo=export.exporter == "dynamo", do_constant_folding=True,
        )
    model = onnx.load(str(path))
    path.unlink()
    for extra in path.parent.glob(path.name + ".data"):
        extra.unlink()
    _stamp_io(model, inputs, outputs)
    return model


def _stamp_io(model: onnx.ModelProto, inputs, outputs) -> None:
    """Give graph inputs/outputs exactly the spec's dtypes and (symbolic) shapes."""
    for value, s in zip(list(model.graph.input) + list(model.graph.output), inputs + outputs):
        assert value.name == s.name, (value.name, s.name)
        value.type.tensor_type.elem_type = ONNX_DTYPES[s.dtype]
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in s.shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def check_graph_io(model: onnx.ModelProto, inputs, outputs, graph: str) -> None:
    """The exported graph's I/O must equal the spec: names, order, dtypes, shapes."""
    got = [(v.name, v.type.tensor_type.elem_type, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
           for v in list(model.graph.input) + list(model.graph.output)]
    want = [(s.name, ONNX_DTYPES[s.dtype], tuple(s.shape)) for s in inputs + outputs]
    if got != want:
        bad = next((g, w) for g, w in zip(got + [None] * len(want), want + [None] * len(got)) if g != w)
        raise DogeExportError(f"{graph} graph I/O differs from the spec: got {bad[0]}, expected {bad[1]}")


def export_graphs(model, info: ModelInfo, export: ExportConfig, out_dir: Path, log=print) -> dict:
    """Write prefill.onnx, step.onnx and weights.bin into out_dir; returns timings and sizes.

    `model` must already be in info.dtype (precision.cast_model).
    """
    if model_dtype(model) != info.dtype:
        raise DogeExportError(f"model is {model_dtype(model)} but the graphs are to be {info.dtype}: "
                              "cast it first with doge_export.precision.cast_model")
    graphs, timings = {}, {}
    specs = spec.graph_specs(info)
    wrappers = {
        "prefill": (PrefillWrapper(model, info.capacity, info.full_logits, info.max_context), _example_prefill(info)),
        "step": (StepWrapper(model, info.max_context), _example_step(info)),
    }
    for name, (wrapper, args) in wrappers.items():
        start = time.perf_counter()
        log(f"exporting the {name} graph ({export.exporter}) ...")
        graphs[name] = onnx_from_torch(wrapper.eval(), args, specs[name]["inputs"],
                                       specs[name]["outputs"], export, out_dir / f".{name}.trace.onnx")
        timings[name] = round(time.perf_counter() - start, 2)
    stats = share_weights(graphs, out_dir)
    for name, graph in graphs.items():
        check_graph_io(graph, specs[name]["inputs"], specs[name]["outputs"], name)
        onnx.save(graph, str(out_dir / f"{name}.onnx"))
        onnx.checker.check_model(str(out_dir / f"{name}.onnx"))
    report = {"export_seconds": timings, "nodes": {n: len(g.graph.node) for n, g in graphs.items()},
              "opset": export.opset, "exporter": export.exporter, "dtype": info.dtype}
    return {"export": report, "weights": stats}

