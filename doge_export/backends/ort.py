"""ONNX Runtime runner: prefill and step sessions over state buffers that never move.

Imports neither torch nor transformers (a deployment box needs numpy + onnxruntime only).
- Weights: weights.bin is read once into memory and handed to both sessions as shared initializers.
  Quantized weights are mapped instead (MappedWeights): every session prepacks them, and the
  runner hands the mapped pages back once the sessions are built.
- State: numpy arrays per layer (state.py), bound once through IO binding; prefill writes its
  state outputs straight into them, the step reads them in place, and the runtime writes only the
  new row of each layer into its slot (one indexed numpy write per buffer for all layers).
- The step's token and position inputs are bound once too (numpy arrays the step writes into):
  everything Python does between two steps runs with caches the step has just flushed, where a
  bind call cost ~20 us instead of ~1 us (measured).
- No copy of the state per step: in the optimized step graph only the attention products read
  key/value, as one-row MatMuls per query head that MLAS streams in place (q.K^T a FusedMatMul
  with transB; tests/test_bench.py checks it), and the step latency stays flat from position 100
  to 8000 (benchmarks/README.md).
- Session settings, measured on the shared 2-core machine (benchmarks/README.md): no thread
  spinning, one thread for the step, the batch dim always specialized (the graph's shape
  arithmetic then folds away: a symbolic batch made an int4 Doge-20M step 13% slower, measured
  side by side; a prefill of another batch size rebuilds the sessions). MLAS prepacking of fp32
  weights (a packed copy per session: +52 MB RSS for Doge-20M) only in a step session built for
  batch > 1: a one-row step streams the weights unpacked (MLAS's M=1 kernels), but with M > 1 MLAS
  packs every weight matrix on every call (Doge-20M batch 8: 25.5 ms per step unpacked, 14.9 ms
  prepacked, measured side by side). From the artifact's lm_rows.min_batch (8) on, the sessions
  run the rows-layout graphs (ort_rows.py): the tied lm_head matrix, the largest, is then held
  once, transposed, and never prepacked.
- pack_weights=True (backend "onnxruntime-packed") trades that memory for speed: the step session
  prepacks the fp32 weights at batch 1 too (larger batches: as above). On the AVX-512
  machine a Doge-20M batch-1 step took x0.81-0.86 the time of the unpacked one (same process,
  2026-12-02; the lm_head alone 0.83 vs 1.00 ms, and cutting it into column blocks that keep the
  result row in L1 did not help: 1.08-1.49 ms, benchmarks/README.md), for a second copy of the
  weights (+50 MiB for Doge-20M).
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np
import onnxruntime as ort

from ..errors import DogeExportError
from ..manifest import Manifest
from ..spec import BATCH, SLOTS, row_names, state_names
from ..state import RowBuffers, StateBuffers, numpy_dtype
from .base import Runner
from .ort_rows import COLUMNS, ROWS, read_rows, rows_entry

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
STEP_THREADS = 1
PACKED_BACKEND = "onnxruntime-packed"  # OrtRunner(pack_weights=True)
# Quantized (mapped) weights: the rows of the gathered tables that the runs read go back to the
# page cache after a generation's first step, then every DROP_EVERY steps, and before a prefill
# that follows steps (MappedWeights.drop_gathered). Once read, a row otherwise stays mapped, and the next
# prompt's rows add to it: int4 Doge-20M, four 128 + 256-token generations, C++ runtime peak RSS
# 40.9 -> 40.1 MiB. One drop walks every page-sized region of the tables (~1 ms for int4
# Doge-20M), hence not every step.
DROP_EVERY = 64


def resolve_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if provider not in PROVIDERS:
        raise DogeExportError(f"unknown provider {provider!r}; choose one of {', '.join(sorted(PROVIDERS))} or auto")
    wanted = PROVIDERS[provider]
    if wanted not in available:
        raise DogeExportError(
            f"ONNX Runtime provider {wanted} is not available (available: {', '.join(available)}); "
            "install onnxruntime-gpu for cuda, or use --provider cpu"
        )
    return [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])


def read_span(path, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of weights.bin read into anonymous memory (read-only from here on).

    Not a memory map: numpy asks the kernel for transparent huge pages on large buffers, and the
    33 MB lm_head matrix-vector product of Doge-20M measured 5-15% faster from them than from the
    4 KB page-cache pages of a mapping on this VM (and up to 5x at times of heavy contention).
    """
    buffer = np.empty(stop - start, np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        if f.readinto(memoryview(buffer)) != buffer.nbytes:
            raise DogeExportError(f"{path} is shorter than its manifest says; re-export the artifact")
    buffer.flags.writeable = False
    return buffer


class MappedWeights:
    """weights.bin mapped read-only. For weights every session prepacks (MatMulNBits): once the
    sessions hold their packed copies, release() hands the resident pages back to the page cache,
    and what the kernels still read (an embedding row per token, norms) faults back in, the same
    bytes. Int4 Doge-60M runtime peak RSS, 2026-12-03: this runner 204 -> 177 MiB (2.10 -> 1.83 x
    (weights + state)), the C++ runtime 172 -> 145 MiB (1.78 -> 1.49).
    fp32 weights are read instead (read_span: huge pages for the unpacked kernels).

    The tensors the graphs gather rows of (the manifest's `gathered`: the embedding and its
    scales) are mapped one page per mapping region (split_pages), because on a page fault Linux
    also maps the up to 15 cached pages around it within the region ("fault-around"): a random
    128-token prompt then brought nearly all of int4 Doge-20M's 5 MiB table back; split, only
    the pages of the rows read come back (the C++ runtime's peak RSS 46.4 -> 42.5 MiB)."""

    def __init__(self, path, gathered: list[dict] = ()):
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise DogeExportError(f"{path} is empty; re-export the artifact")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self._map, np.uint8)
        self._gathered = list(gathered)
        for t in self._gathered:
            self.split_pages(t["offset"], t["length"])

    def split_pages(self, offset: int, length: int) -> None:
        """One mapping region per page over [offset, offset+length): every other page gets
        MADV_RANDOM, which only changes readahead, and regions with different flags never merge."""
        if not hasattr(mmap, "MADV_RANDOM"):  # not Linux: the pages simply come back in runs
            return
        page = mmap.PAGESIZE
        first, end = offset // page, -(-min(offset + length, len(self._map)) // page)  # the pages it touches
        # the odd pages from the one before to the one after: an even first or last page is cut off too
        for p in range(max(first - 1, 0) | 1, min(end + 1, -(-len(self._map) // page)), 2):
            self._map.madvise(mmap.MADV_RANDOM, p * page, page)

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):  # POSIX; elsewhere the pages simply stay resident
            self._map.madvise(mmap.MADV_DONTNEED)

    def drop_gathered(self) -> None:
        """The resident pages of the gathered tensors (rows the graphs read) back to the page cache."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for t in self._gathered:
            first = t["offset"] // mmap.PAGESIZE * mmap.PAGESIZE
            end = min(t["offset"] + t["length"], len(self._map))
            if end > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, end - first)


def shared_initializers(manifest: Manifest, without: str | None = None,
                        mapped: MappedWeights | None = None) -> dict[str, ort.OrtValue]:
    """OrtValues over one in-memory copy of weights.bin, one per listed tensor (views, no copies);
    `without`: a tensor left out and never read (ort_rows: the runner reads it transposed);
    `mapped`: views of that mapping instead of a copy read into memory."""
    weights = manifest.data["weights"]
    path = manifest.path(weights["file"])
    skipped = next((t for t in weights["tensors"] if t["name"] == without), None)
    size = path.stat().st_size
    cut = (skipped["offset"], skipped["offset"] + skipped["length"]) if skipped else (size, size)
    if mapped is not None and skipped is None:
        spans = [(0, mapped.array), (size, None)]
    else:
        spans = [(0, read_span(path, 0, cut[0])), (cut[1], read_span(path, cut[1], size))]
    values = {}
    for t in weights["tensors"]:
        if t is skipped:
            continue
        if t["offset"] + t["length"] > size:
            raise DogeExportError(f"{path} is shorter than its manifest says; re-export the artifact")
        start, buffer = spans[0] if t["offset"] < cut[0] else spans[1]
        array = np.ndarray(tuple(t["shape"]), numpy_dtype(t["dtype"]), buffer=buffer, offset=t["offset"] - start)
        values[t["name"]] = ort.OrtValue.ortvalue_from_numpy(array)
    return values


def session_from_onnx(path, initializers, providers, threads: int | None, *, prepack: bool = True,
                      batch: int | None = None, spin: bool = False, mem_pattern: bool = True,
                      priority_order: bool = False) -> ort.InferenceSession:
    """One session over the shared initializers.

    - Worker threads do not spin unless asked (spin): spinning threads starve everything else on
      a busy small CPU (step latency doubled on the shared 2-core machine, benchmarks/README.md);
      on an otherwise idle machine, 2 spinning threads made a Doge-20M step 9% (fp32) to 20%
      (int4) faster than 1 thread, and 2 threads without spinning 20% slower (side by side).
      Spinning workers stop when their run ends (session.force_spinning_stop): the prefill
      session's kept spinning into the first ~10 steps (5-7 ms instead of ~3, Doge-20M, 2 cores)
      and the step's into the next prefill (2026-12-03, bench --threads 2 --spin).
    - prepack=False keeps MLAS from making its own packed copy of each fp32 weight per session
      (the lm_head alone is 33 MB for Doge-20M); a one-row step streams the weights unpacked.
    - batch: specialize the symbolic batch dim, so the shape arithmetic of the graph folds away.
    - mem_pattern=False: no memory pattern. After its first run a session plans one block for all
      of a run's intermediates, allocated on top of the arena chunks the first run grew; for the
      prefill (large intermediates) that raised peak RSS by 28 MiB (Doge-20M batch 8) at the same
      prefill time (measured interleaved, benchmarks/README.md).
    - priority_order: run the nodes in the graph's own order (Kahn's algorithm) instead of ORT's
      default depth-first order from the outputs, which computes every layer's hidden states
      before any layer's state outputs and so keeps each layer's keys, values and bias alive to
      the end. Prefill, Doge-20M batch 8: intermediates 28.7 -> 20.9 MiB at the same time.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_mem_pattern = mem_pattern
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:  # stop spinning when a run ends: an idle session's spinning workers slow the other's runs
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if priority_order:
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if batch:
        opts.add_free_dimension_override_by_name(BATCH, batch)
    if threads:
        opts.intra_op_num_threads = threads
    for name, value in initializers.items():
        opts.add_initializer(name, value)
    return ort.InferenceSession(str(path), opts, providers=providers)


@contextlib.contextmanager
def saved_by_another_onnxruntime(manifest: Manifest):
    """A session that fails over graphs another ONNX Runtime saved optimized (quantized artifacts:
    its contrib ops and fusions) is a clear error naming both versions, not ORT's message alone."""
    saved = (manifest.quantization.get("offline_optimization") or {}).get("onnxruntime")
    try:
        yield
    except Exception as error:
        if not saved or saved == ort.__version__:
            raise
        raise DogeExportError(
            f"onnxruntime {ort.__version__} cannot load the graphs of '{manifest.folder}', which onnxruntime "
            f"{saved} saved optimized ({str(error).splitlines()[0][:200]}); install onnxruntime>={saved} "
            "or re-export the artifact with this one") from None


def step_takes_slots(manifest: Manifest) -> bool:
    """Whether the step graph reads a symbolic number of slots (spec.SLOTS), i.e. any first S."""
    inputs = {i["name"]: i["shape"] for i in manifest.data["graphs"]["step"]["inputs"]}
    return inputs.get("key.0", [None] * 3)[2] == SLOTS


class OrtRunner(Runner):
    """threads: intra-op threads of both sessions; default: all cores for prefill (compute-bound)
    and STEP_THREADS for the step (bound by memory bandwidth, which one core nearly saturates here,
    and thread hand-offs per node cost more than they save). batch: build the sessions for this
    batch size (default 1; a prefill of another size rebuilds them). spin: worker threads busy-wait
    between kernels (session_from_onnx); only worth it with threads > 1 on an idle machine.
    pack_weights: the step session prepacks fp32 weights at batch 1 too (faster, one more copy of
    the weights; module docstring). From batch 2 on every runner prepacks them."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, *, provider: str = "cpu", threads: int | None = None,
                 batch: int | None = None, spin: bool = False, lm_layout: str = "auto",
                 pack_weights: bool = False):
        super().__init__(manifest.info)
        self._providers = resolve_providers(provider)
        self._threads = threads
        self._spin = spin
        self._manifest = manifest
        self._files = {g: manifest.graph_file(g) for g in ("prefill", "step")}
        # MatMulNBits (quantized artifacts) runs from its packed layout; fp32 weights stay as mapped
        # except in a step session for batch > 1 (_open_sessions)
        self._prepack = bool(manifest.quantized)
        self._pack_weights = pack_weights
        if pack_weights:
            self.name = PACKED_BACKEND
        self._weights: dict | None = None  # must outlive the sessions
        self._mapped: MappedWeights | None = None
        self._steps_since_drop = 0
        if lm_layout not in ("auto", "rows", "columns"):
            raise DogeExportError(f"lm_layout {lm_layout!r}: choose auto, rows or columns")
        self._rows = rows_entry(manifest) if self._providers == ["CPUExecutionProvider"] else None
        if lm_layout == "rows" and self._rows is None:
            raise DogeExportError(f"{manifest.folder} has no rows-layout graphs (fp32 artifacts exported on "
                                  "2026-12-02 or later, run on the CPU)")
        self._lm_layout = lm_layout
        self.lm_rows = False  # the tied matrix held in rows layout (ort_rows), the rows graphs running
        self._open_sessions(batch or 1)
        self.providers = self.step_session.get_providers()
        self.state: StateBuffers | None = None
        # read only the filled slots of the state (False: all C, as artifacts before the symbolic
        # slot dim require; bench's flatness probe sets it False to time the step at full width).
        # Read at each prefill.
        self.attend_filled = step_takes_slots(manifest)
        self._narrowing = False

    def _open_sessions(self, batch: int) -> None:
        step_threads = self._threads or STEP_THREADS
        rows = self._wants_rows(batch)
        if self._weights is None or rows != self.lm_rows:
            self._load_weights(rows)
        graphs = {g: self._manifest.path(self._rows["graphs"][g]) for g in self._files} if rows else self._files
        with saved_by_another_onnxruntime(self._manifest):
            self.prefill_session = session_from_onnx(graphs["prefill"], self._weights, self._providers,
                                                     self._threads, prepack=self._prepack, batch=batch,
                                                     spin=self._spin, mem_pattern=False, priority_order=True)
            self._release_mapped()
            self.step_session = session_from_onnx(graphs["step"], self._weights, self._providers, step_threads,
                                                  prepack=self._prepack or self._pack_weights or batch > 1,
                                                  batch=batch, spin=self._spin)
            self._release_mapped()
        self.session_batch = batch

    def _drop_gathered(self) -> None:
        """The gathered tables' rows read since the last drop go back (mapped weights only)."""
        if self._mapped is not None:
            self._mapped.drop_gathered()
        self._steps_since_drop = 0

    def _release_mapped(self) -> None:
        if self._mapped is not None:
            self._mapped.release()

    def _wants_rows(self, batch: int) -> bool:
        """The rows-layout graphs (ort_rows) for this batch size: asked for, or (auto) from min_batch on."""
        if self._rows is None or self._lm_layout == "columns":
            return False
        return self._lm_layout == "rows" or batch >= self._rows["min_batch"]

    def _load_weights(self, rows: bool) -> None:
        """The shared initializers, the tied matrix in one layout only: with rows, not lm_weight_t
        but the input ROWS, read transposed. The old sessions, and the bindings that keep them
        alive, are released first, so the two layouts are never held together."""
        self.prefill_session = self.step_session = self._prefill_binding = self._step_binding = None
        self._weights = self._rows_value = self._mapped = None
        if self._prepack and not rows:  # every session prepacks: map, release after building them
            weights = self._manifest.data["weights"]
            gathered = [t for t in weights["tensors"] if t.get("gathered")]
            self._mapped = MappedWeights(self._manifest.path(weights["file"]), gathered)
        self._weights = shared_initializers(self._manifest, without=COLUMNS if rows else None, mapped=self._mapped)
        if rows:
            weights = self._manifest.data["weights"]
            tied = next(t for t in weights["tensors"] if t["name"] == COLUMNS)
            self._rows_value = ort.OrtValue.ortvalue_from_numpy(read_rows(self._manifest.path(weights["file"]), tied))
        self.lm_rows = rows

    def _allocate(self, batch: int) -> None:
        """State, step outputs and both IO bindings for this batch size; bound once."""
        info = self.info
        if self.session_batch != batch:
            self._open_sessions(batch)
        self.state = StateBuffers(info, batch)
        dtype = numpy_dtype(info.dtype)
        logits_dtype = np.float32 if info.dtype == "float32" else dtype
        self.step_logits = np.zeros((batch, info.vocab_size), logits_dtype)
        self.rows = RowBuffers(info, batch)
        # the step's token and position inputs: bound once too, each step writes into them
        self.step_inputs = {name: np.zeros((batch, 1), np.int64) for name in ("input_ids", "position_ids")}
        arrays = {**self.state.capacity_arrays, **self.rows.arrays, **self.step_inputs}
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        self._values["logits"] = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
        self._step_binding = self.step_session.io_binding()
        self._prefill_binding = self.prefill_session.io_binding()
        self._prefill_binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
        for i in range(info.num_layers):
            for name in state_names(i):
                self._prefill_binding.bind_ortvalue_output(name, self._values[name])  # all C slots
            for name in row_names(i):
                self._step_binding.bind_ortvalue_output(name, self._values[name])
        self._bind_state_views()
        self._step_binding.bind_ortvalue_output("logits", self._values["logits"])
        for name in self.step_inputs:
            self._step_binding.bind_ortvalue_input(name, self._values[name])
        if self.lm_rows:  # the rows graphs read the tied matrix as an input, bound once
            self._step_binding.bind_ortvalue_input(ROWS, self._rows_value)
            self._prefill_binding.bind_ortvalue_input(ROWS, self._rows_value)

    def _bind_state_views(self) -> None:
        """The step reads the state's current views (their width: StateBuffers.fit_width)."""
        self._step_values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.state.arrays.items()}
        for name, value in self._step_values.items():
            self._step_binding.bind_ortvalue_input(name, value)
        self._bound_width = self.state.width

    def _prefill(self, input_ids, attention_mask, position_ids):
        batch = input_ids.shape[0]
        if self.state is None or self.state.batch != batch:
            self._allocate(batch)
        b = self._prefill_binding
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            b.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        if self._steps_since_drop:  # the rows the last generation's steps left
            self._drop_gathered()
        self.prefill_session.run_with_iobinding(b)
        self._steps_since_drop = DROP_EVERY  # the first step hands back the rows this prefill read
        self.state.after_prefill()
        self._narrowing = self.attend_filled  # for this generation: a change applies at the next prefill
        if self._narrowing:
            self.state.fit_width()
        if self.state.width != self._bound_width:
            self._bind_state_views()
        return b.get_outputs()[0].numpy().astype(np.float32, copy=False)

    def _step(self, input_ids, position_ids):
        if self.state is None:
            raise DogeExportError("step() called before prefill()")
        for name, array in (("input_ids", input_ids), ("position_ids", position_ids)):
            bound = self.step_inputs[name]
            if np.shape(array) != bound.shape:
                raise DogeExportError(f"step {name} has shape {np.shape(array)}; this generation runs "
                                      f"batch {bound.shape[0]}, so it takes [{bound.shape[0]}, 1]")
            bound[...] = array
        self.step_session.run_with_iobinding(self._step_binding)
        self._steps_since_drop += 1
        if self._steps_since_drop > DROP_EVERY:  # ~1 ms a drop, so not every step
            self._drop_gathered()
        self.state.write_rows(self.rows, self.step_inputs["position_ids"])
        if self._narrowing and self.state.advance():
            self._bind_state_views()
        return self.step_logits.astype(np.float32, copy=True)
