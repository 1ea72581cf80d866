"""The C++ runtime (cpp/build/doge_run) against the Python runtime, side by side, same artifacts.

usage: python benchmarks/cpp_vs_python.py ART [ART@packed ...] [--rounds 3] [--prompt-len 128]
       [--new-tokens 256] [--repeat 2] [--threads 1] [--json FILE]

Both runtimes follow docs/runtime-contract.md over the same ONNX Runtime library (the C++ one
links the onnxruntime wheel's libonnxruntime.so). ART@packed: the step's fp32 weights prepacked
(Python: the onnxruntime-packed backend; C++: --packed). Every measurement is a fresh process
that sets ONNX Runtime up (a one-node session), reads its baseline RSS, loads the artifact, then
runs 1 warm-up and `--repeat` greedy generations (prompt of random ids, `--new-tokens` tokens,
no stop id), timing the prefill and every step (run + row write). Processes alternate between
the runtimes for `--rounds` rounds, so a drift of this shared machine's load reaches both alike;
the table gives the median over rounds and the C++ / Python ratios.

Reported per runtime: prefill ms, step p50 ms, decode tokens/s, runtime RSS (peak VmHWM minus the
baseline) and its ratio to (weights + state bytes), the issue-3 memory measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "cpp" / "build" / "doge_run"


def python_worker(spec: str, prompt: list[int], new_tokens: int, repeat: int, threads: int) -> dict:
    """What doge_run does, with the Python runtime; same JSON fields."""
    import onnxruntime

    from doge_export.backends.ort import OrtRunner
    from doge_export.bench_worker import _RELU_ONNX, _rss_mb
    from doge_export.generate import decode_step, prefill
    from doge_export.manifest import load_manifest

    onnxruntime.InferenceSession(_RELU_ONNX, providers=["CPUExecutionProvider"])
    baseline = _rss_mb()
    path, _, variant = spec.partition("@")
    manifest = load_manifest(path, verify=False)
    runner = OrtRunner(manifest, threads=threads, batch=1, pack_weights=variant == "packed")
    after_load = _rss_mb()
    prefill_ms, step_ms = [], []
    for r in range(1 + repeat):
        t0 = time.perf_counter()
        logits, positions = prefill(runner, [prompt])
        ms = (time.perf_counter() - t0) * 1e3
        times = []
        for _ in range(new_tokens - 1):
            tokens = logits.argmax(-1)[:, None]
            t0 = time.perf_counter()
            logits = decode_step(runner, tokens, positions)
            times.append((time.perf_counter() - t0) * 1e3)
            positions = positions + 1
        if r:
            prefill_ms.append(ms)
            step_ms += times
    state_mib = runner.state.nbytes() / 2**20
    return {"prefill_ms": float(np.median(prefill_ms)), "step_ms": {"p50": float(np.median(step_ms))},
            "decode_tok_s": len(step_ms) / (sum(step_ms) / 1e3), "state_mib": state_mib,
            "weights_mib": manifest.data["weights"]["bytes"] / 2**20,
            "rss_mib": {"baseline": baseline, "after_load": after_load, "peak": _rss_mb("VmHWM")}}


def run_cpp(spec: str, prompt: list[int], args) -> dict:
    path, _, variant = spec.partition("@")
    cmd = [str(CPP), path, "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(args.new_tokens),
           "--no-stop", "--no-verify", "--warmup", "1", "--repeat", str(args.repeat), "--threads", str(args.threads)]
    if variant == "packed":
        cmd.append("--packed")
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def run_python(spec: str, prompt: list[int], args) -> dict:
    cmd = [sys.executable, __file__, "--worker", spec, "--prompt", ",".join(map(str, prompt)),
           "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout)


def summary(runs: list[dict]) -> dict:
    """Medians over rounds; RSS as the runtime's share: peak (and after load) minus the baseline."""
    def med(f):
        return statistics.median(f(r) for r in runs)
    w_s = runs[0]["weights_mib"] + runs[0]["state_mib"]
    peak = med(lambda r: r["rss_mib"]["peak"] - r["rss_mib"]["baseline"])
    return {"prefill_ms": med(lambda r: r["prefill_ms"]), "step_p50_ms": med(lambda r: r["step_ms"]["p50"]),
            "decode_tok_s": med(lambda r: r["decode_tok_s"]), "runtime_rss_mib": peak,
            "after_load_mib": med(lambda r: r["rss_mib"]["after_load"] - r["rss_mib"]["baseline"]),
            "rss_over_w_s": peak / w_s, "weights_plus_state_mib": w_s}


def table(results: dict) -> str:
    head = ("| artifact | runtime | prefill ms | step p50 ms | decode tok/s | runtime RSS MiB | RSS / (w+s) |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for spec, by in results.items():
        for name in ("python", "cpp"):
            s = by[name]
            lines.append(f"| {Path(spec).name} | {name} | {s['prefill_ms']:.1f} | {s['step_p50_ms']:.2f} | "
                         f"{s['decode_tok_s']:.0f} | {s['runtime_rss_mib']:.1f} | {s['rss_over_w_s']:.2f} |")
        c, p = by["cpp"], by["python"]
        lines.append(f"| {Path(spec).name} | **C++ / Python** | x{c['prefill_ms'] / p['prefill_ms']:.2f} | "
                     f"x{c['step_p50_ms'] / p['step_p50_ms']:.2f} | x{c['decode_tok_s'] / p['decode_tok_s']:.2f} | "
                     f"{c['runtime_rss_mib'] - p['runtime_rss_mib']:+.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        prompt = [int(t) for t in args.prompt.split(",")]
        print(json.dumps(python_worker(args.artifacts[0], prompt, args.new_tokens, args.repeat, args.threads)))
        return
    if not CPP.exists():
        sys.exit(f"error: {CPP} is missing; build it with `PYTHON={sys.executable} bash cpp/build.sh`")
    from doge_export.bench import utc_now
    from doge_export.bench_report import machine_info

    started = utc_now()
    rng = np.random.default_rng(0)
    results = {}
    for spec in args.artifacts:
        vocab = json.loads((Path(spec.partition("@")[0]) / "doge_export.json").read_text())["model_info"]["vocab_size"]
        prompt = rng.integers(3, vocab, args.prompt_len).tolist()
        runs = {"python": [], "cpp": []}
        for _ in range(args.rounds):
            runs["python"].append(run_python(spec, prompt, args))
            runs["cpp"].append(run_cpp(spec, prompt, args))
        results[spec] = {name: summary(r) for name, r in runs.items()}
        print(f"{spec}: done", file=sys.stderr)
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}  ({started})")
    print(table(results))
    if args.json:
        machine = {**machine_info(), "started_utc": started, "ended_utc": utc_now()}
        command = f"python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}"
        args.json.write_text(json.dumps({"command": command, "machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
