"""One command for a GPU machine: TensorRT engines for this GPU, proved and measured.

    python benchmarks/gpu_check.py [--model random:doge-20m] [--out benchmarks] [--work /tmp/doge_gpu_check]

1. exports the model twice (fp16 for TensorRT, fp32 for ONNX Runtime);
2. builds prefill + step engines for the local GPU (enterprise TensorRT when importable, else
   TensorRT-RTX), at batch 1 and at batch 3 (a step engine's batch is fixed);
3. validates them against transformers run in fp16 (CPU): prefill, teacher-forced steps and greedy
   tokens, batch 1 inside and past the keep window and a left-padded batch of 3;
4. benchmarks batch-1 decoding: TensorRT (CUDA-graph replay, and the runner end to end), transformers
   `generate()` on the same GPU in fp16, ONNX Runtime (fp32; CUDA provider when installed, else CPU);
   and TensorRT step latency from position ~100 to past the keep window (flat = no cache copies);
5. writes gpu_check.json and gpu_check.png into --out.
Exits 1 (after writing the JSON) on any validation mismatch; budget: under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BUDGET_S = 480


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:doge-20m")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--work", type=Path, default=Path("/tmp/doge_gpu_check"))
    p.add_argument("--flavor", choices=("tensorrt", "tensorrt-rtx"), default=None, help="[tensorrt if importable]")
    p.add_argument("--optimization-level", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--greedy-steps", type=int, default=32)
    p.add_argument("--flat-to", type=int, default=4096, help="decode position the flatness probe reaches")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def phase(report: dict, name: str):
    start = time.perf_counter()
    log(f"== {name}")
    try:
        yield
    finally:
        report["phase_seconds"][name] = round(time.perf_counter() - start, 1)


def fail(message: str) -> None:
    log(f"GPU CHECK FAILED: {message}")
    sys.exit(1)


def environment(flavor: str | None) -> dict:
    """GPU, compute capability and the TensorRT flavour to use; fails loudly when one is missing."""
    import importlib.util

    import torch

    from doge_export import trt_build
    from doge_export.errors import DogeExportError

    if not torch.cuda.is_available():
        fail("torch sees no CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    flavor = flavor or next((f for f, m in (("tensorrt", "tensorrt"), ("tensorrt-rtx", "tensorrt_rtx"))
                             if importlib.util.find_spec(m)), None)
    if flavor is None:
        fail("neither tensorrt nor tensorrt_rtx is importable: pip install tensorrt-rtx (RTX GPUs) or tensorrt")
    try:
        trt = trt_build.trt_module(flavor)
        if flavor == "tensorrt-rtx":
            trt_build.compute_capability_enum(trt, cc)
    except DogeExportError as exc:
        fail(f"{exc} (GPU: {torch.cuda.get_device_name()}, compute capability {cc})")
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": cc, "flavor": flavor,
            "trt_version": trt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node()}


def export(model: str, dtype: str, folder: Path):
    from doge_export.artifact import export_artifact
    from doge_export.export_onnx import ExportConfig
    from doge_export.model import load_model

    return export_artifact(load_model(model), folder, ExportConfig(dtype=dtype), force=True, log=log)


def build(fp16_folder: Path, work: Path, env: dict, batch: int, level: int) -> dict:
    """A copy of the fp16 artifact with engines for `batch`; returns the manifest's engine records."""
    from doge_export.manifest import load_manifest
    from doge_export.trt_engines import EngineConfig, build_engines

    folder = work / f"fp16-b{batch}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(fp16_folder, folder)
    cfg = EngineConfig(flavor=env["flavor"], compute_capability=env["compute_capability"], batch=batch,
                       optimization_level=level, timing_cache=work / "timing.cache")
    return build_engines(load_manifest(folder), cfg, log)


def validate(work: Path, model: str, greedy_steps: int) -> dict:
    """TensorRT (fp16) vs transformers in fp16 on CPU, batch 1 and a left-padded batch of 3.

    As at export (commands.validate_manifest): a case's logit tolerance is never below what fp16
    itself moves transformers on that case (validate.case_spreads, against the same weights
    upcast to fp32); at a long prompt that spread exceeds the fixed half tolerance."""
    import copy
    from dataclasses import replace

    from doge_export.backends.torch import TorchRunner
    from doge_export.backends.trt import TrtRunner
    from doge_export.manifest import load_manifest
    from doge_export.model import load_model
    from doge_export.precision import cast_model
    from doge_export.validate import ValidateConfig, case_spreads, default_cases, failures, validate_runner

    reference_model = cast_model(load_model(model).model, "fp16")
    fp32_model = copy.deepcopy(reference_model).float()
    reports, problems = {}, []
    for batch in (1, 3):
        manifest = load_manifest(work / f"fp16-b{batch}")
        cfg = ValidateConfig(prompt_lengths=default_cases(manifest.info, batch), greedy_steps=greedy_steps)
        reference = TorchRunner(reference_model, manifest.info, stable_topk=True)
        cfg = replace(cfg, spreads=case_spreads(reference, TorchRunner(fp32_model, manifest.info, stable_topk=True), cfg))
        log(f"  batch {batch}: transformers fp16 vs fp32 per case: " + ", ".join(f"{s:.2e}" for s in cfg.spreads))
        with TrtRunner(manifest) as runner:
            report = validate_runner(runner, reference, cfg, log=log)
        reports[f"batch{batch}"] = report
        problems += failures(report)
    return {"reports": reports, "failures": problems}


def decode_latency(runner, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Batch 1, greedy: prefill time and per-step latency of runner.step (host to host)."""
    from doge_export.generate import left_pad, prompt_positions

    ids, mask = left_pad([np.random.default_rng(0).integers(3, vocab, prompt_len).tolist()], 0)
    start = time.perf_counter()
    logits = runner.prefill(ids, mask, prompt_positions(mask))
    ttft = time.perf_counter() - start
    position, steps = np.array([[prompt_len]]), []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits = runner.step(logits.argmax(-1)[:, None], position)
        steps.append(time.perf_counter() - start)
        position = position + 1
    steps_ms = np.array(steps[2:]) * 1e3  # the first steps warm up (and capture the CUDA graph)
    return {"prefill_ms": round(ttft * 1e3, 3), "step_ms_median": round(float(np.median(steps_ms)), 4),
            "step_ms_p90": round(float(np.percentile(steps_ms, 90)), 4),
            "tokens_per_s": round(1e3 / float(np.median(steps_ms)), 1), "steps": len(steps)}


def replay_latency(runner, repeats: int = 500) -> float | None:
    """Median GPU time of one CUDA-graph replay (step engine + row write), by CUDA events, in ms."""
    import torch

    if runner.graph is None:
        return None
    times = []
    with torch.cuda.stream(runner.stream):
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return round(float(np.median(times[10:])), 4)


def flatness(runner, info, flat_to: int) -> dict:
    """Step latency by position, from a short prompt to `flat_to` (past the keep window)."""
    from doge_export.generate import left_pad, prompt_positions

    ids, mask = left_pad([list(range(3, 3 + 100))], 0)
    logits = runner.prefill(ids, mask, prompt_positions(mask))
    position, curve = np.array([[100]]), []
    while position[0, 0] < min(flat_to, info.max_context):
        start = time.perf_counter()
        logits = runner.step(logits.argmax(-1)[:, None], position)
        curve.append((int(position[0, 0]), (time.perf_counter() - start) * 1e3))
        position = position + 1
    early = float(np.median([ms for _, ms in curve[10:110]]))
    late = float(np.median([ms for _, ms in curve[-100:]]))
    return {"positions": [p for p, _ in curve[::16]], "step_ms": [round(ms, 4) for _, ms in curve[::16]],
            "early_ms": round(early, 4), "late_ms": round(late, 4), "late_over_early": round(late / early, 3),
            "keep_window": info.keep_window_size}


def torch_generate(model: str, prompt_len: int, new_tokens: int) -> dict:
    """transformers generate() on this GPU in fp16 (eager attention), batch 1, greedy, fixed length."""
    import torch

    from doge_export.model import load_model
    from doge_export.precision import cast_model

    net = cast_model(load_model(model).model, "fp16").cuda().eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, net.config.vocab_size, (1, prompt_len))).cuda()

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(8)  # warm-up
    first, total = timed(1), timed(new_tokens)
    step_ms = (total - first) / (new_tokens - 1) * 1e3
    return {"prefill_ms": round(first * 1e3, 3), "step_ms_median": round(step_ms, 4),
            "tokens_per_s": round(1e3 / step_ms, 1), "note": "mean over the generate() call, not a median"}


def onnxruntime_decode(folder: Path, prompt_len: int, new_tokens: int) -> dict:
    import onnxruntime as ort

    from doge_export.backends.ort import OrtRunner
    from doge_export.manifest import load_manifest

    manifest = load_manifest(folder)
    provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    with OrtRunner(manifest, provider=provider) as runner:
        result = decode_latency(runner, prompt_len, new_tokens, manifest.info.vocab_size)
    return {**result, "provider": provider, "dtype": "float32"}


def benchmark(work: Path, args) -> dict:
    from doge_export.backends.trt import TrtRunner
    from doge_export.manifest import load_manifest

    manifest = load_manifest(work / "fp16-b1")
    out = {}
    with TrtRunner(manifest) as runner:
        out["tensorrt"] = decode_latency(runner, args.prompt_len, args.new_tokens, manifest.info.vocab_size)
        out["tensorrt"]["graph_replay_ms"] = replay_latency(runner)
        out["tensorrt"]["cuda_graph"] = runner.graph is not None or runner.graph_error
        out["tensorrt_flat"] = flatness(runner, manifest.info, args.flat_to)
    with TrtRunner(manifest, cuda_graph=False) as runner:
        out["tensorrt_no_cuda_graph"] = decode_latency(runner, args.prompt_len, args.new_tokens, manifest.info.vocab_size)
    out["torch_generate"] = torch_generate(args.model, args.prompt_len, args.new_tokens)
    out["onnxruntime"] = onnxruntime_decode(work / "fp32", args.prompt_len, args.new_tokens)
    trt_ms = out["tensorrt"]["step_ms_median"]
    out["speedup_vs_torch_generate"] = round(out["torch_generate"]["step_ms_median"] / trt_ms, 2)
    out["speedup_vs_onnxruntime"] = round(out["onnxruntime"]["step_ms_median"] / trt_ms, 2)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = report["bench"]
    names = ["tensorrt", "tensorrt_no_cuda_graph", "torch_generate", "onnxruntime"]
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5))
    values = [bench[n]["step_ms_median"] for n in names]
    bars.bar([n.replace("_", "\n") for n in names], values, color=["#2a7", "#7c9", "#c55", "#57c"])
    bars.set_yscale("log")
    bars.set_ylabel("ms per token (batch 1, median)")
    bars.set_title(f"{report['model']} decode on {report['environment']['gpu']}")
    flat = bench["tensorrt_flat"]
    curve.plot(flat["positions"], flat["step_ms"], lw=1)
    curve.axvline(flat["keep_window"], color="gray", ls="--", label="keep window")
    curve.set_xlabel("position")
    curve.set_ylabel("TensorRT step ms (runner, host to host)")
    curve.set_title(f"step latency vs position (late/early = {flat['late_over_early']})")
    curve.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    report = {"model": args.model, "phase_seconds": {}, "environment": environment(args.flavor)}
    log(json.dumps(report["environment"]))
    args.work.mkdir(parents=True, exist_ok=True)
    with phase(report, "export"):
        for dtype in ("fp16", "fp32"):
            export(args.model, dtype, args.work / dtype)
    with phase(report, "build"):
        report["engines"] = {f"batch{b}": build(args.work / "fp16", args.work, report["environment"], b,
                                                args.optimization_level) for b in (1, 3)}
    with phase(report, "validate"):
        report["validation"] = validate(args.work, args.model, args.greedy_steps)
    if not report["validation"]["failures"]:
        with phase(report, "bench"):
            report["bench"] = benchmark(args.work, args)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["within_budget"] = report["total_seconds"] < BUDGET_S
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["validation"]["failures"]:
        fail("TensorRT disagrees with transformers:\n  " + "\n  ".join(report["validation"]["failures"]))
    plot(report, args.out / "gpu_check.png")
    log(f"wrote {args.out / 'gpu_check.json'} and gpu_check.png in {report['total_seconds']} s "
        f"({'within' if report['within_budget'] else 'OVER'} the {BUDGET_S} s budget); TensorRT step "
        f"{report['bench']['tensorrt']['step_ms_median']} ms, {report['bench']['speedup_vs_torch_generate']}x "
        "transformers generate()")


if __name__ == "__main__":
    main()
