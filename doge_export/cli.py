"""`doge-export`: the command line (typer). Commands stay thin; the work lives in the modules.

User errors (DogeExportError) print one line and exit 1, never a traceback. Progress goes to
stderr, results to stdout (so `--json` output stays clean). Heavy modules import inside commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import DogeExportError

SPIN_HELP = ("ONNX Runtime threads busy-wait between kernels: faster with --threads 2+ on an idle machine, "
             "slower on a busy one")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export Doge small language models to ONNX / TensorRT and run them.")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.command()
def onnx(
    model: str = typer.Option(..., "--model", "-m", help="Local HF folder, hub id, or random:<preset>"),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to create"),
    seed: int = typer.Option(0, help="Seed for random:<preset> weights"),
    override: List[str] = typer.Option([], help="Replace a config.json key, e.g. keep_window_size=16 (experiments)"),
    max_context: Optional[int] = typer.Option(None, help="Longest padded prompt + generation [4 x max_position_embeddings]"),
    max_prompt: Optional[int] = typer.Option(None, help="Longest padded prompt \\[min(max_context, max_position_embeddings)]"),
    full_logits: bool = typer.Option(False, help="Prefill returns logits for every position (perplexity)"),
    exporter: str = typer.Option("torchscript", help="torch exporter: torchscript or dynamo"),
    dtype: str = typer.Option("fp32", help="Graph dtype: fp32 (CPU), fp16 or bf16 (GPU / TensorRT)"),
    quantize: Optional[str] = typer.Option(None, help="Weight-only int8 or int4 for CPU, after fp32 validation; quality vs fp32 recorded"),
    quant_block: int = typer.Option(32, help="Input features per --quantize scale: 64 or 128 run faster, with a larger error (recorded)"),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer folder to ship (default: the checkpoint's)"),
    allow_pickle: bool = typer.Option(False, help="Allow pickle *.bin checkpoints (can run code)"),
    force: bool = typer.Option(False, help="Replace --out if it is an existing artifact folder"),
    validate: bool = typer.Option(True, help="Validate against PyTorch before publishing"),
):
    """Export MODEL to prefill + step ONNX graphs with a manifest, validated against transformers."""
    from .commands import run_export

    run_export(model, out, seed=seed, overrides=override, max_context=max_context, max_prompt=max_prompt, full_logits=full_logits,
               exporter=exporter, tokenizer=tokenizer, allow_pickle=allow_pickle, force=force,
               validate=validate, log=progress, dtype=dtype, quantize=quantize,
               quant_block=quant_block)


@app.command()
def generate(
    artifact: Path = typer.Argument(..., help="Artifact folder from `doge-export onnx`"),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat for a batch"),
    input_ids: List[str] = typer.Option([], help="Token ids like 0,3,17; repeat for a batch"),
    chat: bool = typer.Option(False, help="Wrap each prompt as a user turn in the chat template"),
    system: Optional[str] = typer.Option(None, help="System message for --chat"),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate per prompt"),
    greedy: bool = typer.Option(False, help="Force greedy decoding"),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (enables sampling)"),
    top_k: Optional[int] = typer.Option(None, help="Top-k sampling (enables sampling)"),
    top_p: Optional[float] = typer.Option(None, help="Top-p sampling (enables sampling)"),
    repetition_penalty: Optional[float] = typer.Option(None, help="Repetition penalty (1.0 = off)"),
    stop_id: List[int] = typer.Option([], help="Stop token id; repeat for several \\[eos]"),
    seed: Optional[int] = typer.Option(None, help="Sampling seed"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, onnxruntime-packed (fp32: faster, one more copy "
                                "of the weights in memory), torch, tensorrt, or onnx-reference (onnx's own evaluator: "
                                "slow, tiny models only)"),
    provider: str = typer.Option("cpu", help="ONNX Runtime provider: cpu, cuda or auto"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads"),
    spin: bool = typer.Option(False, help=SPIN_HELP),
    as_json: bool = typer.Option(False, "--json", help='Print {"tokens": [[...]], "text": [...]}'),
):
    """Generate text or token ids from an artifact folder."""
    from .commands import run_generate

    run_generate(artifact, prompt, input_ids, chat=chat, system=system, max_new_tokens=max_new_tokens,
                 greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, stop_ids=stop_id, seed=seed, backend=backend,
                 provider=provider, threads=threads, spin=spin, as_json=as_json)


@app.command()
def validate(
    artifact: Path = typer.Argument(..., help="Artifact folder"),
    backend: str = typer.Option("onnxruntime", help="Backend to check against the PyTorch reference"),
    model: Optional[str] = typer.Option(None, help="Reference model (default: the artifact's source)"),
    decode_steps: int = typer.Option(16, help="Teacher-forced decode steps compared per case"),
    greedy_steps: int = typer.Option(32, help="Free-running greedy tokens compared per case"),
    atol: Optional[float] = typer.Option(None, help="Max |diff| allowed on logits and state, with no relative term "
                                         "(default by dtype: fp32 1e-4 + 3e-5 x max|reference|, fp16 0.5, bf16 1.0)"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout"),
):
    """Check an artifact against transformers; exit 1 on any failure. Results go into the manifest."""
    from .commands import run_validate

    run_validate(artifact, backend=backend, model=model, decode_steps=decode_steps,
                 greedy_steps=greedy_steps, atol=atol, as_json=as_json, log=progress)


@app.command()
def inspect(
    artifact: Optional[Path] = typer.Argument(None, help="Artifact folder to describe"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint to identify instead"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
):
    """Describe an artifact folder, or detect which Doge generation a checkpoint is."""
    from .commands import run_inspect

    run_inspect(artifact, model, as_json=as_json)


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="Artifact folder from `doge-export onnx`"),
    backends: str = typer.Option(",".join(("torch-generate", "torch", "onnxruntime", "onnxruntime-packed", "onnxruntime-cpp",
                                           "tensorrt")),
                                 help="Comma-separated: torch-generate, torch, onnxruntime, onnxruntime-packed (fp32 weights "
                                      "prepacked at batch 1 too: faster, one more copy), onnxruntime-cpp (the C++ runtime, "
                                      "cpp/README.md; skipped if not built), tensorrt (skipped if absent)"),
    batch: int = typer.Option(1, help="Prompts per batch (all of --prompt-len tokens)"),
    prompt_len: int = typer.Option(128, help="Prompt tokens (random ids, seeded)"),
    new_tokens: int = typer.Option(256, help="Tokens generated per prompt"),
    warmup: int = typer.Option(1, help="Warm-up generations per backend, not measured"),
    repeats: int = typer.Option(3, help="Measured generations per backend"),
    threads: Optional[int] = typer.Option(None, help="Threads per backend \\[all cores]"),
    spin: bool = typer.Option(False, help=SPIN_HELP),
    probe_to: int = typer.Option(0, help="Also decode one prompt to this position and check step latency stays flat"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here"),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: latency vs position, tokens/s (needs matplotlib)"),
):
    """Measure backends side by side: TTFT, decode latency percentiles, tokens/s, RSS, bandwidth floor."""
    from .commands import run_bench_command

    run_bench_command(artifact, backends=backends, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                      warmup=warmup, repeats=repeats, threads=threads, spin=spin, probe_to=probe_to, json_out=json_out,
                      plot=plot, log=progress)


@app.command()
def trt(
    artifact: Path = typer.Argument(..., help="Artifact folder from `doge-export onnx` (fp16/bf16 for a half engine)"),
    flavor: str = typer.Option("tensorrt-rtx", help="tensorrt-rtx (AOT, any machine) or tensorrt (on the target GPU)"),
    compute_capability: str = typer.Option("8.9", help="Target GPU compute capability (RTX 4090 = 8.9)"),
    batch: int = typer.Option(1, help="The step engine's fixed batch (prefill takes 1..batch)"),
    opt_prompt: Optional[int] = typer.Option(None, help="Prompt length the prefill engine is tuned for \\[min(128, max prompt)]"),
    workspace_mib: Optional[int] = typer.Option(None, help="Builder workspace limit in MiB [TensorRT's default]"),
    optimization_level: int = typer.Option(3, help="Builder optimisation level 0..5"),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache to load and save (tensorrt) [ARTIFACT/timing.cache]"),
    hardware_compatibility: Optional[str] = typer.Option(None, help="tensorrt only: none, ampere_plus or same_compute_capability"),
):
    """Lint, then build the prefill and step TensorRT engines into the artifact (recorded in its manifest)."""
    from .trt_engines import EngineConfig, run_trt

    cfg = EngineConfig(flavor=flavor, compute_capability=compute_capability, batch=batch, opt_prompt=opt_prompt,
                       workspace_mib=workspace_mib, optimization_level=optimization_level,
                       timing_cache=timing_cache, hardware_compatibility=hardware_compatibility)
    run_trt(artifact, cfg, log=progress)


@app.command()
def lint(
    path: Path = typer.Argument(..., help="Artifact folder, or one .onnx file"),
    flavor: str = typer.Option("auto", help="Real parser + build: auto, tensorrt-rtx, tensorrt or none"),
    compute_capability: str = typer.Option("8.9", help="Target compute capability of the real build"),
    batch: int = typer.Option(1, help="Batch the step engine is built for (its dims count as static)"),
    step: bool = typer.Option(False, help="Lint an .onnx file as a decode-step graph (static, CUDA graphs)"),
    as_json: bool = typer.Option(False, "--json", help="Print findings as JSON"),
):
    """TensorRT compatibility: static rules, then TensorRT's real parser + build; exit 1 on any error."""
    from .trt_engines import run_lint

    run_lint(path, flavor=flavor, compute_capability=compute_capability, batch=batch, step=step,
             as_json=as_json, log=progress)


def _click_errors():
    """The exceptions module of the click that typer runs on (typer >= 0.2x vendors its own)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    """Every user error, a bad flag or value included, is one `error:` line and exit status 1."""
    errors = _click_errors()
    try:
        code = app(standalone_mode=False)  # click raises its usage errors instead of printing them
    except getattr(errors, "NoArgsIsHelpError", ()) as exc:  # bare `doge-export`: the help (click >= 8.2)
        exc.show()
        sys.exit(0)
    except errors.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "doge-export"
        print(f"error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(1)
    except errors.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(1)
    except DogeExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
