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

import os
import time
from dataclasses import dataclass

import numpy as np

from .backends.cpp import CPP_BACKEND
from .bench_worker import PROBE_WINDOW, Worker
from .errors import DogeExportError
from .manifest import load_manifest

BACKENDS = ("torch-generate", "torch", "onnxruntime", "onnxruntime-packed", CPP_BACKEND, "tensorrt")
PROBE_BACKENDS = ("onnxruntime", "tensorrt")  # the flatness probe (packing changes no state access)
PROBE_PROMPT = 100


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
            raise DogeExportError(f"unknown backend(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise DogeExportError(f"--backends names a backend twice ({','.join(self.backends)}); each runs once")
        for name in ("batch", "prompt_len", "repeats"):
            if getattr(self, name) < 1:
                raise DogeExportError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise DogeExportError(f"--new-tokens must be >= 2 (decode needs a second token), got {self.new_tokens}")
        if self.warmup < 0:
            raise DogeExportError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise DogeExportError(f"--threads must be >= 1, got {self.threads}")


def check_artifact(manifest, cfg: BenchConfig) -> None:
    info = manifest.info
    if cfg.prompt_len > info.max_prompt or cfg.prompt_len + cfg.new_tokens > info.max_context:
        raise DogeExportError(
            f"prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens does not fit this artifact (max prompt "
            f"{info.max_prompt}, max context {info.max_context}); lower --prompt-len/--new-tokens"
        )
    if cfg.probe_to and not PROBE_PROMPT + 2 * PROBE_WINDOW <= cfg.probe_to <= info.max_context:
        raise DogeExportError(f"--probe-to must be from {PROBE_PROMPT + 2 * PROBE_WINDOW} (its {PROBE_PROMPT}-token "
                              f"prompt and two {PROBE_WINDOW}-step windows) to this artifact's max context "
                              f"{info.max_context}, got {cfg.probe_to}")


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


# ---------------------------------------------------------------- the run


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
