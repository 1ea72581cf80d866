"""TensorRT runner: the prefill and step engines over device buffers that never move.

I/O is bound by tensor name from the spec; every buffer is a torch CUDA tensor allocated once
(the step engine's batch is fixed), so addresses stay put and the step can be captured in a CUDA
graph and replayed. State: per field (key, value, bias, position) one allocation holds every
layer's tensor at a 256-byte aligned offset plus one spare row; the prefill engine writes the state
into it, the step engine reads it, and the step's new rows are written into their slots by one
device-side `index_copy_` per field over all layers, captured in the same CUDA graph as the step
engine. Rows whose slot is -1 (the new token lost the eviction) go to the spare row.

Why this row write and not TensorRT's KV-cache-update layer (IKVCacheUpdateLayer, ONNX
TensorScatter; facts/tensorrt.md §2.3): that layer writes one index per batch row (writeIndices
[B]) for all heads of a rank-4 [B,H,S,D] cache, and only at linear positions; Doge evicts per KV
head (slot [B,G]), sometimes writes nothing (slot -1), and also keeps rank-3 bias and position
tensors; it would also need opset 24 / TensorRT >= 10.15 in graphs that ONNX Runtime runs too.
The write moves B*G*(2D+2) numbers per layer and step: the cache itself is never copied.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import trt_build
from ..errors import DogeExportError
from ..manifest import Manifest
from ..spec import ROW_FIELDS, STATE_FIELDS, graph_specs
from ..trt_engines import check_engines, rebuild_hint
from .base import Runner

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "BOOL": torch.bool}
ALIGN = 256  # bytes: TensorRT's required address alignment


def aligned_zeros(shape, dtype, device) -> torch.Tensor:
    """A zeroed contiguous tensor whose address is 256-byte aligned (CUDA allocations already are)."""
    numel, size = math.prod(shape), torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(numel + ALIGN // size, dtype=dtype, device=device)
    offset = (-raw.data_ptr() % ALIGN) // size
    return raw[offset:offset + numel].view(shape)


def aligned_rows(row: tuple, dtype) -> int:
    """The smallest number of rows of `row` numbers of `dtype` that spans a multiple of 256 bytes."""
    row_bytes = math.prod(row) * torch.empty((), dtype=dtype).element_size()
    return ALIGN // math.gcd(ALIGN, row_bytes)


class Arena:
    """`layers` tensors of `shape` in one allocation, each 256-byte aligned, plus one spare row.

    A row is the trailing `row` dims (D for key/value, a single number for bias/position);
    `rows` views the whole allocation as [n, row numel] for index_copy_. Each layer takes
    `stride` rows: n_rows rounded up to a multiple of `multiple` (a multiple of aligned_rows).
    """

    def __init__(self, layers: int, shape: tuple, row: tuple, dtype, device, multiple: int | None = None):
        row_numel = math.prod(row)
        self.n_rows = math.prod(shape) // row_numel
        multiple = multiple or aligned_rows(row, dtype)
        assert multiple % aligned_rows(row, dtype) == 0, (multiple, row, dtype)
        self.stride = -(-self.n_rows // multiple) * multiple  # rows per layer, rounded up to stay aligned
        self.spare = layers * self.stride
        self.storage = aligned_zeros(((self.spare + 1) * row_numel,), dtype, device)
        self.rows = self.storage.view(self.spare + 1, row_numel)
        self.tensors = [self.storage[i * self.stride * row_numel:(i * self.stride + self.n_rows) * row_numel]
                        .view(shape) for i in range(layers)]

    def all_rows(self) -> torch.Tensor:
        """[layers * n_rows, row numel]: every layer's rows back to back (a copy when padded)."""
        layers = len(self.tensors)
        return self.rows[: self.spare].view(layers, self.stride, -1)[:, : self.n_rows].reshape(layers * self.n_rows, -1)


def device_compute_capability(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


class TrtRunner(Runner):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, *, device: str = "cuda", cuda_graph: bool = True, trt=None):
        """Open both engines of `manifest`; `trt` is the TensorRT module (None: the engines' flavour)."""
        super().__init__(manifest.info)
        self.device = torch.device(device)
        flavor = ((manifest.data.get("engines") or {}).get("step") or {}).get("flavor", "tensorrt-rtx")
        self.trt = trt or trt_build.trt_module(flavor)
        local_cc = device_compute_capability(self.device)
        self.records = check_engines(manifest, self.trt.__version__, local_cc)
        self.batch = self.fixed_batch = self.records["step"]["batch"]  # validate.default_cases reads fixed_batch
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        specs = graph_specs(manifest.info)
        self.engines = {g: self._load(manifest, g, specs[g], local_cc) for g in ("prefill", "step")}
        self.contexts = {g: e.create_execution_context() for g, e in self.engines.items()}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.use_graph = cuda_graph and self.stream is not None
        self.graph, self.graph_error, self.prefilled = None, None, False
        self._allocate()

    def _load(self, manifest: Manifest, graph: str, spec: dict, local_cc):
        record = self.records[graph]
        plan = manifest.path(record["file"]).read_bytes()
        hint = rebuild_hint(manifest.folder, record, local_cc)
        if hasattr(self.runtime, "get_engine_validity"):  # TensorRT-RTX
            validity, diagnostics = self.runtime.get_engine_validity(plan)
            if validity == self.trt.EngineValidity.INVALID:
                raise DogeExportError(f"{record['file']} is not valid for this GPU/driver/runtime "
                                      f"({diagnostics}): it must be rebuilt: {hint}")
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise DogeExportError(f"TensorRT could not load {record['file']} (see its log above): it must be "
                                  f"rebuilt: {hint}")
        check_io(engine, spec, record["file"], hint)
        return engine

    def _allocate(self) -> None:
        """State arenas, step rows, step inputs and logits; bound once (addresses never change)."""
        info, B, dev = self.info, self.batch, self.device
        G, C, D, L = info.num_kv_heads, info.capacity, info.head_dim, info.num_layers
        half = TORCH_DTYPES[self.engines["step"].get_tensor_dtype("key.0").name]
        row_dims = {"key": (D,), "value": (D,), "bias": (), "position": ()}
        dtypes = {"key": half, "value": half, "bias": half, "position": torch.int64}
        rows = {f: row_dims[f] or (1,) for f in STATE_FIELDS}
        common = math.lcm(*(aligned_rows(rows[f], dtypes[f]) for f in STATE_FIELDS))  # one stride, one spare
        self.state_arenas = {f: Arena(L, (B, G, C, *row_dims[f]), rows[f], dtypes[f], dev, common)
                             for f in STATE_FIELDS}
        row_fields = dict(zip(ROW_FIELDS, STATE_FIELDS))  # new_key -> key, ..., slot -> position
        self.row_arenas = {r: Arena(L, (B, G, *row_dims[f]), row_dims[f] or (1,), dtypes[f], dev)
                           for r, f in row_fields.items()}
        logits_dtype = TORCH_DTYPES[self.engines["step"].get_tensor_dtype("logits").name]
        self.step_logits = aligned_zeros((B, info.vocab_size), logits_dtype, dev)
        self.step_ids = aligned_zeros((B, 1), torch.int64, dev)
        self.step_pos = aligned_zeros((B, 1), torch.int64, dev)
        bg = torch.arange(B * G, device=dev, dtype=torch.int64) * C
        self.row_base = torch.stack([bg + i * self.state_arenas["key"].stride for i in range(L)])  # [L, B*G]
        self._bind_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # zero fills ran on the default stream; the engines use self.stream

    def _named(self, arenas: dict, names) -> dict[str, torch.Tensor]:
        return {f"{field}.{i}": arenas[field].tensors[i] for field in names for i in range(self.info.num_layers)}

    def _bind_step(self) -> None:
        ctx = self.contexts["step"]
        inputs = {"input_ids": self.step_ids, "position_ids": self.step_pos, **self._named(self.state_arenas, STATE_FIELDS)}
        outputs = {"logits": self.step_logits, **self._named(self.row_arenas, ROW_FIELDS)}
        for name, tensor in inputs.items():
            set_shape(ctx, name, tensor)
        for name, tensor in {**inputs, **outputs}.items():
            set_address(ctx, name, tensor)

    def _stream_handle(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.stream is not None else 0

    def _prefill(self, input_ids, attention_mask, position_ids):
        if input_ids.shape[0] != self.batch:
            raise DogeExportError(f"the TensorRT engines were built for batch {self.batch}, got {input_ids.shape[0]} "
                                  f"prompts: pass {self.batch}, or rebuild with `doge-export trt DIR --batch "
                                  f"{input_ids.shape[0]}`")
        ctx = self.contexts["prefill"]
        with self._on_stream():  # allocations, copies and the engine all on the runner's stream
            feed = {n: torch.from_numpy(np.ascontiguousarray(a, np.int64)) for n, a in
                    (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids))}
            feed = {n: aligned_zeros(a.shape, torch.int64, self.device).copy_(a) for n, a in feed.items()}
            for name, tensor in feed.items():
                set_shape(ctx, name, tensor)
            logits_dtype = TORCH_DTYPES[self.engines["prefill"].get_tensor_dtype("logits").name]
            logits = aligned_zeros(tuple(ctx.get_tensor_shape("logits")), logits_dtype, self.device)
            for name, tensor in {**feed, "logits": logits, **self._named(self.state_arenas, STATE_FIELDS)}.items():
                set_address(ctx, name, tensor)
            execute(ctx, self._stream_handle(), "prefill")
        self._sync()
        self.prefilled = True
        out = logits[:, -1] if logits.dim() == 3 else logits
        return out.float().cpu().numpy()

    def _step(self, input_ids, position_ids):
        if not self.prefilled:
            raise DogeExportError("step() called before prefill()")
        with self._on_stream():
            self.step_ids.copy_(torch.from_numpy(np.ascontiguousarray(input_ids, np.int64)), non_blocking=True)
            self.step_pos.copy_(torch.from_numpy(np.ascontiguousarray(position_ids, np.int64)), non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step_kernels()
                if self.use_graph:  # the first step ran eagerly (warm-up); record the next ones
                    self.graph = self._capture()
            logits = self.step_logits.float().cpu()
        return logits.numpy()

    def _step_kernels(self) -> None:
        """The step engine, then every layer's row write: what one CUDA graph replay does."""
        execute(self.contexts["step"], self._stream_handle(), "step")
        self.write_rows()

    def write_rows(self) -> None:
        """New rows into their slots, all layers at once; slot -1 goes to the spare row."""
        L, BG = self.info.num_layers, self.batch * self.info.num_kv_heads
        slots = self.row_arenas["slot"].all_rows().view(L, BG)
        spare = self.state_arenas["key"].spare
        index = torch.where(slots >= 0, self.row_base + slots, spare).view(-1)
        for row_field, field in zip(ROW_FIELDS[:3], STATE_FIELDS[:3]):
            self.state_arenas[field].rows.index_copy_(0, index, self.row_arenas[row_field].all_rows())
        pos = self.step_pos.view(1, self.batch, 1).expand(L, self.batch, self.info.num_kv_heads).reshape(-1, 1)
        self.state_arenas["position"].rows.index_copy_(0, index, pos)

    def _capture(self):
        """The step as one CUDA graph; None (plain enqueues from then on) when it cannot be captured."""
        self.use_graph = False  # one attempt per runner
        if hasattr(self.contexts["step"], "is_stream_capturable") and \
                not self.contexts["step"].is_stream_capturable(self.stream.cuda_stream):
            self.graph_error = "TensorRT says the step context is not stream capturable"
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._step_kernels()
        except RuntimeError as exc:  # as trtexec does: fall back to plain enqueues
            self.graph_error = f"capture failed: {exc}"
            return None
        return graph

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else _nothing()

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    @property
    def state(self):
        """Host copies of the state (float32 for half dtypes), for validation; None before prefill."""
        if not self.prefilled:
            return None
        self._sync()
        arrays = {n: (t.float() if t.is_floating_point() else t).cpu().numpy()
                  for n, t in self._named(self.state_arenas, STATE_FIELDS).items()}
        return type("HostState", (), {"arrays": arrays, "batch": self.batch})()

    def close(self) -> None:
        self._sync()
        self.graph = None
        self.contexts, self.engines = {}, {}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def set_shape(ctx, name: str, tensor: torch.Tensor) -> None:
    if not ctx.set_input_shape(name, tuple(tensor.shape)):
        raise DogeExportError(f"TensorRT rejected shape {tuple(tensor.shape)} for '{name}': outside the engine's "
                              "profile (see the manifest's engines.*.profiles)")


def set_address(ctx, name: str, tensor: torch.Tensor) -> None:
    assert tensor.is_contiguous() and tensor.data_ptr() % ALIGN == 0, (name, tensor.data_ptr())
    ctx.set_tensor_address(name, tensor.data_ptr())


def execute(ctx, stream: int, graph: str) -> None:
    if not ctx.execute_async_v3(stream):
        raise DogeExportError(f"TensorRT failed to run the {graph} engine (see its log above)")


def check_io(engine, spec: dict, file: str, hint: str) -> None:
    """The engine's I/O names and dtypes must be the spec's; otherwise it belongs to other graphs."""
    got = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        got[name] = TORCH_DTYPES.get(engine.get_tensor_dtype(name).name)
    want = {s.name: getattr(torch, s.dtype) for s in spec["inputs"] + spec["outputs"]}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()), key=str)[:4]
        raise DogeExportError(f"{file} does not match the artifact's graphs (I/O differs: {bad}): it must be "
                              f"rebuilt: {hint}")
