"""The per-backend side of `doge-export bench`: each backend runs in its own spawned process
(`Worker`), which opens the runner, times generations and the flatness probe, and reports its
own RSS (bench.py drives the workers round-robin).

Each backend's peak RSS is its own process's, over a baseline read after its libraries are set
up: the runtime RSS is what the model adds. The C++ runtime (backends/cpp.py) runs in a further
process of its own and reports its own timings and RSS.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from .backends.cpp import CPP_BACKEND
from .errors import DogeExportError
from .manifest import load_manifest

# the backends that run the bounded state (onnxruntime-cpp: cpp/build/doge_run, backends/cpp.py)
STATE_BACKENDS = ("onnxruntime", "onnxruntime-packed", CPP_BACKEND, "tensorrt")
PROBE_WINDOW = 64  # steps per window compared in the flatness probe
PROBE_ROUNDS = 5  # interleaved replays of each window


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _open(backend: str, manifest, threads: int | None, batch: int, spin: bool = False):
    """-> (runner, or the transformers model for torch-generate; weight byte counts)."""
    if backend in STATE_BACKENDS:
        if backend == CPP_BACKEND:
            from .backends.cpp import CppServer

            runner = CppServer(manifest.folder, batch, threads, spin)
        elif backend.startswith("onnxruntime"):
            from .backends.ort import OrtRunner

            packed = backend == "onnxruntime-packed"
            if packed and (same := packed_is_default(manifest, batch)):
                raise DogeExportError(f"{same}: the onnxruntime row already runs them packed")
            runner = OrtRunner(manifest, threads=threads, batch=batch, spin=spin, pack_weights=packed)  # sessions for this batch
        else:
            from .runtime import open_runner

            runner = open_runner(manifest, backend)
        return runner, {"weight_bytes": manifest.data["weights"]["bytes"],
                        "weight_bytes_per_token": step_weight_bytes(manifest),
                        "attends_filled": bool(getattr(runner, "attend_filled", False)),
                        "lm_rows": bool(getattr(runner, "lm_rows", False))}  # the rows-layout graphs ran
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .runtime import source_model, torch_reference

    runner = torch_reference(manifest) if backend == "torch" else source_model(manifest).model.eval()
    return runner, torch_weight_bytes(runner.model if backend == "torch" else runner)


def torch_weight_bytes(model) -> dict:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    per_token = total
    embed = model.get_input_embeddings().weight
    if embed.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        per_token -= embed.numel() * embed.element_size()  # an untied embedding: one row per token
    return {"weight_bytes": total, "weight_bytes_per_token": per_token}


def step_weight_bytes(manifest) -> int:
    """Bytes of weights.bin that one step reads: all but the tables it only gathers rows from."""
    total = 0
    for t in manifest.data["weights"]["tensors"]:
        gathered = "embed_tokens" in t["name"] or t["name"].endswith("_gather")
        total += t["length"] // t["shape"][0] if gathered else t["length"]
    return total


def packed_is_default(manifest, batch: int) -> str | None:
    """Why onnxruntime-packed would run the same sessions as onnxruntime, or None: it differs only
    for fp32 weights (MatMulNBits always runs packed) at batch 1 (every runner prepacks above)."""
    if manifest.info.dtype != "float32" or manifest.quantized:
        return "the weights are quantized or half"
    return f"at batch {batch} every runner prepacks the weights" if batch > 1 else None


# y = Relu(x), x float [1]: a one-node ONNX model, so ONNX Runtime's environment (logging, kernel
# registry: ~10 MB, whatever the model) is set up before the baseline RSS is read
_RELU_ONNX = bytes.fromhex("080812003a330a0c0a0178120179220452656c751201675a0f0a0178120a0a08080112040a020801620f0a"
                           "0179120a0a08080112040a02080142040a001011")


def _import_libraries(backend: str) -> None:
    """Import and initialize the backend's libraries before the baseline RSS is read: the runtime
    RSS is what the model adds (weights, state, activations), not the libraries."""
    if backend in ("torch", "torch-generate"):
        import torch
        import transformers  # noqa: F401

        from . import model  # noqa: F401

        torch.ones(64, 64) @ torch.ones(64, 64)  # thread pool and BLAS set up
    elif backend.startswith("onnxruntime"):
        import onnxruntime

        from .backends import ort  # noqa: F401

        onnxruntime.InferenceSession(_RELU_ONNX, providers=["CPUExecutionProvider"])
    elif backend == CPP_BACKEND:
        pass  # its own process sets ONNX Runtime up (backends/cpp.py, imported above)
    else:
        from .backends import trt  # noqa: F401  (ImportError: reported, the backend is skipped)


def _reason(exc: Exception) -> str:
    """A user error's own message; anything else with its type (it is a bug or a library's error)."""
    return str(exc) if isinstance(exc, DogeExportError) else f"{type(exc).__name__}: {exc}"


def _worker(conn, backend: str, folder: str, threads: int | None, batch: int, spin: bool) -> None:
    try:
        manifest = load_manifest(folder, verify=False)
        imported = _rss_mb()
        _import_libraries(backend)
        baseline = _rss_mb()
        start = time.perf_counter()
        runner, weights = _open(backend, manifest, threads, batch, spin)
        if backend == CPP_BACKEND:  # its own process: its own baseline, after ONNX Runtime's set-up
            rss = runner.ready["rss_mib"]
            imported, baseline = rss["start"], rss["baseline"]
        conn.send(("ready", {"load_seconds": time.perf_counter() - start, "baseline_rss_mb": baseline,
                             "library_rss_mb": baseline - imported, **weights}))
    except Exception as exc:  # reported to the parent, which skips this backend
        conn.send(("error", _reason(exc)))
        return
    while True:
        command, payload = conn.recv()
        if command == "stop":
            import sys

            peak = runner.peak_rss_mib if backend == CPP_BACKEND else _rss_mb("VmHWM")  # its own process's
            if backend == CPP_BACKEND:
                runner.close()
            conn.send(("done", {"peak_rss_mb": peak, "baseline_rss_mb": baseline,
                                "imports_torch": "torch" in sys.modules}))
            return
        try:
            run = _timed_probe if command == "probe" else _TIMED.get(backend, _timed_generate)
            conn.send(("ok", run(runner, *payload)))
        except Exception as exc:
            conn.send(("error", _reason(exc)))


def _timed_generate(runner, prompts: np.ndarray, new_tokens: int) -> dict:
    from .generate import GenerateConfig, generate

    stamps = []
    cfg = GenerateConfig(max_new_tokens=new_tokens, stop_ids=())
    start = time.perf_counter()
    generate(runner, prompts.tolist(), cfg, on_token=lambda *_: stamps.append(time.perf_counter()))
    return {"start": start, "stamps": stamps, "peak_rss_mb": _rss_mb("VmHWM")}


def _timed_cpp(server, prompts: np.ndarray, new_tokens: int) -> dict:
    """The C++ runtime's own timings (its prefill, each step) turned into token stamps; the pipe's
    round trip is not in them."""
    start = time.perf_counter()
    answer = server.generate(prompts.tolist(), new_tokens)
    stamps = list(start + np.cumsum([answer["prefill_ms"], *answer["step_ms"]]) / 1e3)
    server.peak_rss_mib = answer["peak_rss_mib"]
    return {"start": start, "stamps": stamps, "peak_rss_mb": answer["peak_rss_mib"]}


def _timed_hf(model, prompts: np.ndarray, new_tokens: int) -> dict:
    """transformers generate() (greedy, eager, its own growing cache), stamped by a streamer."""
    import torch

    class Stamps:
        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    streamer = Stamps()
    ids = torch.from_numpy(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                       pad_token_id=model.config.pad_token_id)
    return {"start": start, "stamps": streamer.times, "peak_rss_mb": _rss_mb("VmHWM")}


_TIMED = {"torch-generate": _timed_hf, CPP_BACKEND: _timed_cpp}  # default: _timed_generate


def probe_points(first: int, to_position: int, capacity: int) -> dict[str, int]:
    """Where the probe's windows of PROBE_WINDOW steps start: fill ~100, fill ~2000, the end."""
    points = {"start": first}
    if capacity >= 2000 + PROBE_WINDOW // 2 and to_position >= 2000 + PROBE_WINDOW:
        points["fill_2000"] = 2000 - PROBE_WINDOW // 2
    points["end"] = to_position - PROBE_WINDOW
    return points


def _timed_probe(runner, prompt: np.ndarray, to_position: int) -> dict:
    """Batch-1 decode from a short prompt to `to_position`, step latency at every position; then,
    where the runner's state is host memory, each window replayed from a snapshot of the state,
    PROBE_ROUNDS times in turn, so that a drift of the machine's load does not read as a trend."""
    filled = getattr(runner, "attend_filled", None)
    if filled:  # flat means no copy per step: time the step reading all C slots, whatever the fill
        runner.attend_filled = False
    try:
        return _probe_steps(runner, prompt, to_position)
    finally:
        if filled:
            runner.attend_filled = filled


def _probe_steps(runner, prompt: np.ndarray, to_position: int) -> dict:
    ids = prompt[None]
    first = ids.shape[1]
    logits = runner.prefill(ids, np.ones_like(ids), np.arange(first)[None])
    points = probe_points(first, to_position, runner.info.capacity)
    stacked = getattr(getattr(runner, "state", None), "stacked", None)
    snapshots, tokens, latencies = {}, [], []
    for position in range(first, to_position):
        tokens.append(logits.argmax(-1)[:, None])
        if stacked is not None and position in points.values():
            snapshots[position] = {f: a.copy() for f, a in stacked.items()}
        logits = runner.step(tokens[-1], np.array([[position]], np.int64))
        latencies.append(runner.last_latency)
    replay = {name: [] for name in points} if snapshots else {}
    for _ in range(PROBE_ROUNDS if snapshots else 0):
        for name, start in points.items():
            for f, a in snapshots[start].items():
                np.copyto(stacked[f], a)
            for position in range(start, start + PROBE_WINDOW):
                runner.step(tokens[position - first], np.array([[position]], np.int64))
                replay[name].append(runner.last_latency)
    return {"first_position": first, "latency_s": latencies, "points": points, "replay_s": replay}


class Worker:
    """One backend in its own process; `call` runs one command there and waits for the answer."""

    def __init__(self, backend: str, folder: Path, threads: int | None, batch: int, spin: bool = False):
        ctx = mp.get_context("spawn")
        self.backend = backend
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, backend, str(folder), threads, batch, spin),
                                   daemon=True)
        self.process.start()
        status, info = self.conn.recv()
        self.info, self.error = (info, None) if status == "ready" else ({}, info)

    def call(self, command: str, *payload):
        self.conn.send((command, payload))
        status, result = self.conn.recv()
        if status == "error":
            raise DogeExportError(f"{self.backend}: {result}")
        return result

    def stop(self) -> dict:
        if self.error is None:
            self.info.update(self.call("stop"))
        self.process.join(timeout=30)
        return self.info
