"""`doge-export bench`: backends side by side in one run, against the memory-bandwidth floor.

Each backend runs in its own spawned process: the onnxruntime one never imports torch, and each
peak RSS is that backend's own. The parent drives them round-robin, one generation at a time, so a
noisy neighbour slows every backend alike; warm-up generations are run and dropped. Per generation
it stamps the clock when each token is available (after any device sync: runners return host
arrays): time to first token = prefill + first token, decode latency = gap between tokens.

The floor: bytes read per token (every weight matrix the step multiplies + the state slots or
KV cache it attends over) / the memory bandwidth measured in the same run by a multi-threaded
read of a buffer far larger than the L3 cache. Tokens/s count every batch row.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DogeExportError
from .manifest import load_manifest

BACKENDS = ("torch-generate", "torch", "onnxruntime", "onnxruntime-packed", "onnxruntime-cpp", "tensorrt")
# the ones that run the bounded state (onnxruntime-cpp: cpp/build/doge_run, backends/cpp.py)
STATE_BACKENDS = ("onnxruntime", "onnxruntime-packed", "onnxruntime-cpp", "tensorrt")
CPP_BACKEND = "onnxruntime-cpp"
PROBE_BACKENDS = ("onnxruntime", "tensorrt")  # the flatness probe (packing changes no state access)
PROBE_PROMPT = 100
PROBE_WINDOW = 64  # steps per window compared in the flatness probe
PROBE_ROUNDS = 5  # interleaved replays of each window


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = BACKENDS
    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 256
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None  # None: each backend's default (onnxruntime: backends/ort.py)
    spin: bool = False  # onnxruntime's worker threads busy-wait between kernels (OrtRunner)
    probe_to: int = 0  # run the flatness probe up to this position (0: off)
    seed: int = 0

    def __post_init__(self):
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise DogeExportError(f"unknown backend(s) {unknown or '(none)'}; choose from {', '.join(BACKENDS)}")
        for name in ("batch", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise DogeExportError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise DogeExportError(f"--new-tokens must be >= 2 (decode needs a second token), got {self.new_tokens}")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise DogeExportError("--warmup must be >= 0 and --threads >= 1")


def check_artifact(manifest, cfg: BenchConfig) -> None:
    info = manifest.info
    if cfg.prompt_len > info.max_prompt or cfg.prompt_len + cfg.new_tokens > info.max_context:
        raise DogeExportError(
            f"prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens does not fit this artifact (max prompt "
            f"{info.max_prompt}, max context {info.max_context}); lower --prompt-len/--new-tokens"
        )
    if cfg.probe_to and not PROBE_PROMPT + 2 * PROBE_WINDOW <= cfg.probe_to <= info.max_context:
        raise DogeExportError(f"--probe-to must be in [{PROBE_PROMPT + 2 * PROBE_WINDOW}, {info.max_context}] "
                              f"for this artifact, got {cfg.probe_to}")


# ---------------------------------------------------------------- memory bandwidth


def measure_bandwidth(threads: int | None, mib: int = 256, repeats: int = 15) -> float:
    """Read bandwidth in GB/s: median of `repeats` multi-threaded sums over `mib` MiB (>> L3)."""
    from concurrent.futures import ThreadPoolExecutor

    n = threads or os.cpu_count() or 1
    buf = np.ones(mib * 2**20 // 8, np.uint64)  # touched, so no page faults are timed
    parts = np.array_split(buf, n)
    rates = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            rates.append(buf.nbytes / (time.perf_counter() - start) / 1e9)
    return float(np.median(rates))


# ---------------------------------------------------------------- worker processes


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
    if manifest.info.dtype != "float32" or (manifest.data.get("quantization") or {}).get("mode"):
        return "the weights are quantized or half"
    return f"at batch {batch} every runner prepacks the weights" if batch > 1 else None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        from .backends import cpp  # noqa: F401  (its process sets ONNX Runtime up itself)
    else:
        from .backends import trt  # noqa: F401  (ImportError: reported, the backend is skipped)


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
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        command, payload = conn.recv()
        if command == "stop":
            import sys

            peak = _rss_mb("VmHWM")
            if backend == CPP_BACKEND:
                peak = runner.peak_rss_mib
                runner.close()
            conn.send(("done", {"peak_rss_mb": peak, "baseline_rss_mb": baseline,
                                "imports_torch": "torch" in sys.modules}))
            return
        try:
            run = _timed_probe if command == "probe" else _TIMED.get(backend, _timed_generate)
            conn.send(("ok", run(runner, *payload)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


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


# ---------------------------------------------------------------- the run


def make_prompts(vocab_size: int, cfg: BenchConfig) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(3, vocab_size, (cfg.batch, cfg.prompt_len), dtype=np.int64)


def _start_workers(manifest, cfg: BenchConfig, log) -> list[Worker]:
    workers = []
    for backend in cfg.backends:
        log(f"starting {backend} ...")
        worker = Worker(backend, manifest.folder, cfg.threads, cfg.batch, cfg.spin)
        if worker.error:
            log(f"  {backend} skipped: {worker.error}")
        workers.append(worker)
    return workers


def _round_robin(workers: list[Worker], command: str, payload: tuple, rounds: int, keep_from: int, log) -> dict:
    """Run `command` on every live worker, `rounds` times in turn; keep the results from `keep_from`."""
    results = {w.backend: [] for w in workers if w.error is None}
    for n in range(rounds):
        for w in workers:
            if w.error is not None:
                continue
            try:
                result = w.call(command, *payload)
            except DogeExportError as exc:
                w.error = str(exc)
                log(f"  {w.backend} failed: {exc}")
                continue
            if n >= keep_from:
                results[w.backend].append(result)
        log(f"  {'warm-up' if n < keep_from else 'repeat'} {n + 1 - (0 if n < keep_from else keep_from)} done")
    return {b: r for b, r in results.items() if r}


def run_bench(folder, cfg: BenchConfig, log=print) -> dict:
    """Run every backend of `cfg` on the artifact in `folder`; returns the report (bench_report)."""
    from .bench_report import build_report, machine_info

    manifest = load_manifest(folder)
    check_artifact(manifest, cfg)
    machine = machine_info()
    log("measuring memory bandwidth ...")
    bandwidth = [measure_bandwidth(cfg.threads)]
    workers = _start_workers(manifest, cfg, log)
    prompts = make_prompts(manifest.info.vocab_size, cfg)
    try:
        log(f"decoding: batch {cfg.batch}, prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens")
        runs = _round_robin(workers, "run", (prompts, cfg.new_tokens), cfg.warmup + cfg.repeats, cfg.warmup, log)
        probes = {}
        if cfg.probe_to:
            log(f"flatness probe: batch 1, positions {PROBE_PROMPT}..{cfg.probe_to}")
            probers = [w for w in workers if w.backend in PROBE_BACKENDS]
            probe_prompt = make_prompts(manifest.info.vocab_size, BenchConfig(batch=1, prompt_len=PROBE_PROMPT))[0]
            probes = {b: r[0] for b, r in _round_robin(probers, "probe", (probe_prompt, cfg.probe_to), 1, 0, log).items()}
    finally:
        infos = {w.backend: {**w.stop(), "error": w.error} for w in workers}
    bandwidth.append(measure_bandwidth(cfg.threads))
    machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["ended_utc"] = utc_now()
    return build_report(manifest, cfg, machine, bandwidth, infos, runs, probes)
