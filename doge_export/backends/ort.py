"""ONNX Runtime runner: prefill and step sessions over state buffers that never move.

Imports neither torch nor transformers (a deployment box needs numpy + onnxruntime only).
- Weights: weights.bin is memory-mapped once and handed to both sessions as shared initializers.
- State: numpy arrays per layer (state.py), bound once through IO binding; prefill writes its
  state outputs straight into them, the step reads them in place, and the runtime writes only the
  new row of each layer into its slot.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import DogeExportError
from ..manifest import Manifest
from ..spec import row_names, state_names
from ..state import StateBuffers, numpy_dtype
from .base import Runner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if provider not in PROVIDERS:
        raise DogeExportError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)} or auto")
    wanted = PROVIDERS[provider]
    if wanted not in available:
        raise DogeExportError(
            f"ONNX Runtime provider {wanted} is not available (available: {', '.join(available)}); "
            "install onnxruntime-gpu for cuda, or use --provider cpu"
        )
    return [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])


def shared_initializers(manifest: Manifest) -> dict[str, ort.OrtValue]:
    """OrtValues over a read-only memory map of weights.bin, one per listed tensor."""
    weights = manifest.data["weights"]
    mapped = np.memmap(manifest.path(weights["file"]), dtype=np.uint8, mode="r")
    values = {}
    for t in weights["tensors"]:
        array = np.ndarray(tuple(t["shape"]), numpy_dtype(t["dtype"]), buffer=mapped, offset=t["offset"])
        values[t["name"]] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def session_from_onnx(path, initializers, providers, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    for name, value in initializers.items():
        opts.add_initializer(name, value)
    return ort.InferenceSession(str(path), opts, providers=providers)


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, *, provider: str = "cpu", threads: int | None = None):
        super().__init__(manifest.info)
        providers = resolve_providers(provider)
        self._weights = shared_initializers(manifest)  # must outlive the sessions
        self.prefill_session = session_from_onnx(manifest.graph_file("prefill"), self._weights, providers, threads)
        self.step_session = session_from_onnx(manifest.graph_file("step"), self._weights, providers, threads)
        self.providers = self.step_session.get_providers()
        self.state: StateBuffers | None = None
        self._bind = None

    def _allocate(self, batch: int) -> None:
        """State, step outputs and both IO bindings for this batch size; bound once."""
        info = self.info
        self.state = StateBuffers(info, batch)
        dtype = numpy_dtype(info.dtype)
        logits_dtype = np.float32 if info.dtype == "float32" else dtype
        self.step_logits = np.zeros((batch, info.vocab_size), logits_dtype)
        self.rows = {}
        G, D = info.num_kv_heads, info.head_dim
        for i in range(info.num_layers):
            key, value, bias, slot = row_names(i)
            self.rows.update({key: np.zeros((batch, G, D), dtype), value: np.zeros((batch, G, D), dtype),
                              bias: np.zeros((batch, G), dtype), slot: np.zeros((batch, G), np.int64)})
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in {**self.state.arrays, **self.rows}.items()}
        self._values["logits"] = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
        self._step_binding = self.step_session.io_binding()
        self._prefill_binding = self.prefill_session.io_binding()
        self._prefill_binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
        for i in range(info.num_layers):
            for name in state_names(i):
                self._step_binding.bind_ortvalue_input(name, self._values[name])
                self._prefill_binding.bind_ortvalue_output(name, self._values[name])
            for name in row_names(i):
                self._step_binding.bind_ortvalue_output(name, self._values[name])
        self._step_binding.bind_ortvalue_output("logits", self._values["logits"])

    def _prefill(self, input_ids, attention_mask, position_ids):
        batch = input_ids.shape[0]
        if self.state is None or self.state.batch != batch:
            self._allocate(batch)
        b = self._prefill_binding
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            b.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        self.prefill_session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def _step(self, input_ids, position_ids):
        if self.state is None:
            raise DogeExportError("step() called before prefill()")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        self._step_binding.bind_cpu_input("input_ids", ids)
        self._step_binding.bind_cpu_input("position_ids", pos)
        self.step_session.run_with_iobinding(self._step_binding)
        self.state.write_rows(self.rows, pos)
        return self.step_logits.astype(np.float32, copy=True)
