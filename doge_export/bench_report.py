"""The report of `doge-export bench`: metrics, the bandwidth floor, the table, the JSON and the plot.

Definitions (every number in the JSON follows them):
- ttft_ms: start of the call -> first token available (prefill + first token), median over repeats.
- latency_ms p50/p90/p99: gaps between consecutive tokens, pooled over the repeats (warm-ups dropped).
- decode_tok_s: batch x decode steps / decode time (first token -> last token).
- e2e_tok_s: batch x new tokens / (start -> last token).
- bytes_per_token: weights the step multiplies + the state (or growing KV cache, at its mean length)
  it reads; floor_ms = bytes_per_token / bandwidth; floor_ratio = latency p50 / floor_ms.
- runtime_rss_mb: peak RSS (VmHWM) minus the RSS after importing and initializing the backend's
  libraries (library_init_rss_mb: what importing and initializing them took, e.g. torch, or ONNX
  Runtime and its environment);
  rss_budget_ratio = runtime_rss / (weights + state bytes); the target is <= 1.5.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import numpy as np

from .bench import utc_now
from .bench_worker import PROBE_WINDOW, STATE_BACKENDS
from .errors import DogeExportError

LIBRARIES = ("doge-export", "numpy", "onnxruntime", "torch", "transformers", "tensorrt_rtx", "tensorrt")
MB = 2**20


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


# CPU features that decide which MLAS kernels run (fp32 GEMM width, int8 dot products)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimd", "sve")


def cpu_isa(cpuinfo: str) -> list[str]:
    """The ISA_FLAGS that /proc/cpuinfo's flags (x86) or Features (arm) line lists, in ISA_FLAGS order."""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(("flags", "Features"))), "")
    present = set(line.split(":", 1)[-1].split())
    return [f for f in ISA_FLAGS if f in present]


def _vector_isa(isa: list[str]) -> tuple[str | None, bool]:
    """(widest vector ISA: 'avx512' / 'avx2' / 'neon' / None, whether x86 VNNI int8 dot products are there)."""
    width = "avx512" if "avx512f" in isa else "avx2" if "avx2" in isa else "neon" if "asimd" in isa else None
    return width, width in ("avx512", "avx2") and ("avx512_vnni" in isa or "avx_vnni" in isa)


def isa_summary(isa: list[str]) -> str:
    """'AVX-512 + VNNI', 'AVX2 without VNNI', 'NEON', 'unknown ISA': what the int8/fp32 kernels use."""
    width, vnni = _vector_isa(isa)
    name = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON", None: "unknown ISA"}[width]
    if width in ("avx512", "avx2"):
        return f"{name} + VNNI" if vnni else f"{name} without VNNI"
    return name


def isa_tag(isa: list[str]) -> str:
    """A folder name for the ISA: 'avx512-vnni', 'avx2', 'neon', ... (benchmarks/run.sh files results by it)."""
    width, vnni = _vector_isa(isa)
    return f"{width or 'unknown-isa'}{'-vnni' if vnni else ''}"


def machine_info() -> dict:
    cpuinfo = _read("/proc/cpuinfo") or ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    l3 = _read("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {
        "cpu_model": model,
        "cpu_isa": cpu_isa(cpuinfo),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "l3_cache": l3.strip() if l3 else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started_utc": utc_now(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


def summarize(runs: list[dict], batch: int) -> dict:
    """Timing dicts {start, stamps} of the kept repeats -> the per-backend metrics."""
    gaps = [np.diff(r["stamps"]) for r in runs]
    pooled = np.concatenate(gaps)
    decode_s = sum(r["stamps"][-1] - r["stamps"][0] for r in runs)
    e2e_s = sum(r["stamps"][-1] - r["start"] for r in runs)
    ttft = [r["stamps"][0] - r["start"] for r in runs]
    return {
        "ttft_ms": 1e3 * float(np.median(ttft)),
        "ttft_ms_repeats": [round(1e3 * t, 3) for t in ttft],
        "latency_ms": {q: 1e3 * float(np.percentile(pooled, int(q[1:]))) for q in ("p50", "p90", "p99")}
        | {"mean": 1e3 * float(pooled.mean())},
        "decode_tok_s": batch * len(pooled) / decode_s,
        "e2e_tok_s": batch * sum(len(r["stamps"]) for r in runs) / e2e_s,
        "latency_by_step_ms": [round(1e3 * float(v), 4) for v in np.median(np.stack(gaps), axis=0)],
    }


def state_bytes(info, batch: int, slots: float | None = None) -> float:
    """The bounded state the step reads, at `slots` slots per set (default: all C): key, value,
    bias per slot and an int64 position."""
    item = 2 if info.dtype in ("float16", "bfloat16") else 4
    per_slot = 2 * info.head_dim * item + item + 8
    return info.num_layers * batch * info.num_kv_heads * (info.capacity if slots is None else slots) * per_slot


def kv_cache_bytes(info, batch: int, length: float) -> float:
    """transformers' growing fp32 cache: key + value for `length` positions."""
    return info.num_layers * batch * info.num_kv_heads * length * 2 * info.head_dim * 4


def add_floor(entry: dict, backend: str, info, cfg, weights: dict, bandwidth_gb_s: float) -> None:
    """Bytes per token, the bandwidth floor and the resident-size target of one backend."""
    mean_len = cfg.prompt_len + cfg.new_tokens / 2
    if backend in STATE_BACKENDS and not weights.get("attends_filled"):
        state, kind = state_bytes(info, cfg.batch), "bounded state, every slot"
        final_state = state
    elif backend in STATE_BACKENDS:  # the filled slots only (the floor does not count
        slots = min(mean_len, info.capacity)  # the up to 63 empty ones the runner reads too)
        state, kind = state_bytes(info, cfg.batch, slots), f"filled state slots, {slots:g} on average"
        final_state = state_bytes(info, cfg.batch)
    else:
        state, kind = kv_cache_bytes(info, cfg.batch, mean_len), f"growing KV cache at mean length {mean_len:g}"
        final_state = kv_cache_bytes(info, cfg.batch, cfg.prompt_len + cfg.new_tokens)
    total = weights["weight_bytes_per_token"] + state
    floor_ms = 1e3 * total / (bandwidth_gb_s * 1e9)
    entry.update({
        "weight_bytes_per_token": int(weights["weight_bytes_per_token"]), "state_bytes_per_token": int(state), "state_kind": kind,
        "bytes_per_token": int(total), "floor_ms": floor_ms,
        "floor_ratio": entry["latency_ms"]["p50"] / floor_ms,
        "resident_target_bytes": int(weights["weight_bytes"] + final_state),
    })


def analyse_probe(probe: dict, capacity: int, window: int) -> dict:
    """Step latency along a long decode: medians of windows at fill ~100, fill ~2000 and the end,
    from the interleaved replays when there are some, else from the one continuous decode."""
    lat = 1e3 * np.asarray(probe["latency_s"])
    first = probe["first_position"]
    points = {}
    for name, start in probe["points"].items():
        chunk = 1e3 * np.asarray(probe["replay_s"][name]) if probe["replay_s"] else lat[start - first: start + window - first]
        continuous = lat[start - first: start + window - first]
        points[name] = {"position": start + window // 2, "fill": min(start + window // 2, capacity),
                        "median_ms": float(np.median(chunk)), "p90_ms": float(np.percentile(chunk, 90)),
                        "continuous_median_ms": float(np.median(continuous))}
    base = points["start"]["median_ms"]
    bins = np.array_split(np.arange(len(lat)), min(len(lat), 200))
    return {
        "batch": 1, "first_position": first, "last_position": first + len(lat) - 1, "capacity": capacity,
        "method": f"{len(next(iter(probe['replay_s'].values()), [])) // window} interleaved replays of {window} "
                  "steps from state snapshots" if probe["replay_s"] else f"{window} steps of one continuous decode",
        "windows": points,
        "ratios": {f"{k}_vs_start": v["median_ms"] / base for k, v in points.items() if k != "start"},
        "binned_ms": [[int(first + b[0]), round(float(np.median(lat[b])), 4)] for b in bins],
    }


def build_report(manifest, cfg, machine: dict, bandwidth: list[float], infos: dict, runs: dict,
                 probes: dict) -> dict:
    info = manifest.info
    used_bw = max(bandwidth)  # the higher bandwidth gives the lower (stricter) floor
    backends = {}
    for backend, worker in infos.items():
        if backend not in runs:
            backends[backend] = {"status": "skipped", "reason": worker.get("error") or "no result"}
            continue
        peak = max(r["peak_rss_mb"] for r in runs[backend])  # during the measured runs (not the probe)
        entry = {"status": "ok", **summarize(runs[backend], cfg.batch),
                 "load_seconds": worker["load_seconds"], "peak_rss_mb": peak,
                 "runtime_rss_mb": peak - worker["baseline_rss_mb"],
                 "baseline_rss_mb": worker["baseline_rss_mb"], "library_init_rss_mb": worker["library_rss_mb"],
                 "imports_torch": worker["imports_torch"],
                 **({"lm_rows": worker["lm_rows"]} if "lm_rows" in worker else {})}  # onnxruntime: rows graphs ran
        add_floor(entry, backend, info, cfg, worker, used_bw)
        entry["rss_budget_ratio"] = entry["runtime_rss_mb"] * MB / entry["resident_target_bytes"]
        backends[backend] = entry
    add_speedups(backends)
    return {
        "command": None,  # set by the CLI: the exact command line
        "config": {**{k: v for k, v in vars(cfg).items()}, "backends": list(cfg.backends)},
        "artifact": artifact_summary(manifest, cfg.batch),
        "machine": {**machine, "bandwidth_gb_s": {"start": bandwidth[0], "end": bandwidth[-1], "used": used_bw}},
        "backends": backends,
        "probe": {b: analyse_probe(p, info.capacity, PROBE_WINDOW) for b, p in probes.items()},
    }


def add_speedups(backends: dict) -> None:
    base = backends.get("torch-generate", {})
    if base.get("status") != "ok":
        return
    for entry in backends.values():
        if entry.get("status") == "ok":
            entry["vs_torch_generate"] = {"decode_tok_s": entry["decode_tok_s"] / base["decode_tok_s"],
                                          "e2e_tok_s": entry["e2e_tok_s"] / base["e2e_tok_s"],
                                          "ttft": entry["ttft_ms"] / base["ttft_ms"]}


def artifact_summary(manifest, batch: int) -> dict:
    info = manifest.info
    quant = manifest.quantization
    return {"folder": str(manifest.folder), "model": manifest.data["source"]["model"],
            "dtype": info.dtype, "quantization": quant.get("mode"),
            "quality_vs_fp32": quant.get("quality"), "layers": info.num_layers, "capacity": info.capacity,
            "weights_bytes": manifest.data["weights"]["bytes"], "state_bytes": state_bytes(info, batch)}


NAME_WIDTH = 18  # the longest backend name, onnxruntime-packed
COLUMNS = (("backend", f"{{:<{NAME_WIDTH}}}", None), ("TTFT ms", "{:>8.1f}", "ttft_ms"),
           ("p50 ms", "{:>7.2f}", "p50"), ("p90 ms", "{:>7.2f}", "p90"), ("p99 ms", "{:>7.2f}", "p99"),
           ("dec tok/s", "{:>9.1f}", "decode_tok_s"), ("e2e tok/s", "{:>9.1f}", "e2e_tok_s"),
           ("x gen", "{:>6.2f}", "x_gen"), ("MB/tok", "{:>7.1f}", "mb_token"), ("floor ms", "{:>8.2f}", "floor_ms"),
           ("p50/floor", "{:>9.2f}", "floor_ratio"), ("RSS MB", "{:>7.0f}", "peak_rss_mb"),
           ("run RSS", "{:>7.0f}", "runtime_rss_mb"), ("/(w+s)", "{:>6.2f}", "rss_budget_ratio"))


def _row_values(name: str, e: dict) -> dict:
    return {**e, **e["latency_ms"], "x_gen": e.get("vs_torch_generate", {}).get("decode_tok_s", float("nan")),
            "mb_token": e["bytes_per_token"] / 1e6}


def _cell(fmt: str, value) -> str:
    """A table cell; '-' for a number not measured (NaN: e.g. "x gen" without torch-generate)."""
    if isinstance(value, float) and value != value:
        return f"{'-':>{len(fmt.format(0.0))}}"
    return fmt.format(value)


def format_table(report: dict) -> str:
    cfg, machine = report["config"], report["machine"]
    lines = [f"{report['artifact']['model']} ({report['artifact']['quantization'] or report['artifact']['dtype']}), "
             f"batch {cfg['batch']}, prompt {cfg['prompt_len']}, {cfg['new_tokens']} new tokens, "
             f"{cfg['repeats']} repeats after {cfg['warmup']} warm-up, threads {cfg['threads'] or 'default'}"
             f"{' (onnxruntime spinning)' if cfg.get('spin') else ''}; "
             f"{machine['cpu_model']} ({isa_summary(machine.get('cpu_isa', []))}), "
             f"{machine['usable_cores']} cores, bandwidth {machine['bandwidth_gb_s']['used']:.1f} GB/s",
             "  ".join(f"{h:<{NAME_WIDTH}}" if k is None else f"{h:>{len(f.format(0.0))}}" for h, f, k in COLUMNS)]
    for name, e in report["backends"].items():
        if e["status"] != "ok":
            lines.append(f"{name:<{NAME_WIDTH}}  skipped: {e['reason']}")
            continue
        values = _row_values(name, e)
        lines.append("  ".join(_cell(f, name if k is None else values[k]) for h, f, k in COLUMNS))
    for name, probe in report["probe"].items():
        w = probe["windows"]
        parts = [f"{k} (pos {v['position']}, fill {v['fill']}) {v['median_ms']:.2f} ms" for k, v in w.items()]
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in probe["ratios"].items())
        lines.append(f"step flatness [{name}, all C slots read]: " + "; ".join(parts) + f" -> {ratios}")
    return "\n".join(lines)


def require_matplotlib():
    """-> matplotlib.pyplot (headless), or a DogeExportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DogeExportError("--plot needs matplotlib; install it with `pip install doge-export[plot]`") from None
    return plt


def plot_report(report: dict, path) -> None:
    """Latency vs position per backend (+ the flatness probe) and a tokens/s bar chart (PNG)."""
    plt = require_matplotlib()
    ok = {n: e for n, e in report["backends"].items() if e["status"] == "ok"}
    panels = 3 if report["probe"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    first = report["config"]["prompt_len"] + 1
    for name, e in ok.items():
        steps = e["latency_by_step_ms"]
        axes[0].plot(range(first, first + len(steps)), steps, label=name, lw=1)
    axes[0].set(yscale="log", xlabel="position", ylabel="decode latency per step (ms)",
                title="decode latency vs position (median over repeats)")
    axes[0].legend()
    _plot_bars(axes[1], ok)
    if report["probe"]:
        _plot_probe(axes[2], report["probe"])
    cfg = report["config"]
    fig.suptitle(f"{report['artifact']['model']} ({report['artifact']['quantization'] or report['artifact']['dtype']}),"
                 f" batch {cfg['batch']}, prompt {cfg['prompt_len']}, {cfg['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bars(ax, ok: dict) -> None:
    names = list(ok)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [ok[n]["decode_tok_s"] for n in names], 0.4, label="decode tok/s")
    ax.bar(x + 0.2, [ok[n]["e2e_tok_s"] for n in names], 0.4, label="end-to-end tok/s")
    ax.set_xticks(x, names, rotation=15)
    ax.set(ylabel="tokens/s (all batch rows)", title="throughput")
    ax.legend()


def _plot_probe(ax, probes: dict) -> None:
    for name, probe in probes.items():
        pos, ms = zip(*probe["binned_ms"])
        ax.plot(pos, ms, lw=1, alpha=0.6, label=f"{name}: one continuous decode (binned median)")
        w = list(probe["windows"].values())
        med = [v["median_ms"] for v in w]
        ax.errorbar([v["position"] for v in w], med, yerr=[[0] * len(w), [v["p90_ms"] - m for v, m in zip(w, med)]],
                    fmt="o", ms=7, capsize=4, label=f"{name}: windows, {probe['method']} (median, p90)")
        ax.axhline(1.2 * med[0], ls="--", color="grey", lw=1, label="1.2x the first window")
        ax.axvline(probe["capacity"], ls=":", color="grey", lw=1, label=f"state full ({probe['capacity']} slots)")
    ax.set(xlabel="position", ylabel="step latency (ms)", title="bounded state (all C slots read): step latency along a long decode",
           ylim=(0, None))
    ax.legend(fontsize=7, loc="lower right")
