"""The bodies of the CLI commands: plain functions, callable from Python and tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import DogeExportError
from .generate import GenerateConfig, generate
from .manifest import load_manifest, temp_sibling, write_atomically, write_json_atomic
from .runtime import open_runner, parse_overrides, prompts_to_ids, torch_reference


def run_export(model: str, out: Path, *, seed: int, overrides: list[str], max_context, max_prompt, full_logits: bool,
               exporter: str, tokenizer, allow_pickle: bool, force: bool, validate: bool, log,
               dtype: str = "float32", quantize: str | None = None, quant_block: int = 32) -> None:
    from .artifact import export_artifact, prepare_out_dir
    from .export_onnx import ExportConfig
    from .model import load_model

    config = ExportConfig(max_context=max_context, max_prompt=max_prompt, full_logits=full_logits, exporter=exporter,
                          dtype=dtype, quantize=quantize, quant_block=quant_block)
    prepare_out_dir(Path(out), force)  # fail before the (slow) model load
    check_tokenizer_dir(tokenizer)
    log(f"loading {model} ...")
    loaded = load_model(model, seed=seed, allow_pickle=allow_pickle, overrides=parse_overrides(overrides))
    check = (lambda manifest: validate_manifest(manifest, loaded.model, log)) if validate else None
    manifest = export_artifact(loaded, Path(out), config, seed=seed, force=force,
                               tokenizer_dir=tokenizer, validate=check, log=log)
    info = manifest.info
    log(f"wrote {out}: prefill + step graphs, state {info.num_layers} layers x {info.capacity} slots, "
        f"max prompt {info.max_prompt}, max context {info.max_context}")


def check_tokenizer_dir(tokenizer) -> None:
    """--tokenizer: a folder with tokenizer.json, checked before the export rather than after it."""
    if tokenizer is None:
        return
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise DogeExportError(f"--tokenizer '{tokenizer}' is not a folder; give the folder that holds tokenizer.json")
    if not (path / "tokenizer.json").is_file():
        raise DogeExportError(f"--tokenizer '{tokenizer}' has no tokenizer.json")


ROWS_BACKEND = "onnxruntime-rows"  # the validation entry of the rows-layout graphs (manifest "lm_rows")


def validate_manifest(manifest, model, log) -> dict:
    """Validate the graphs of `manifest` against `model` (in the artifact's dtype); raises on any failure.

    Executor: ONNX Runtime for fp32; for fp16/bf16 onnx's reference evaluator, which rounds in the
    dtypes the graph declares, as TensorRT does (ONNX Runtime's CPU provider has no bf16 kernels
    and runs fp16 through inserted fp32 casts, skipping those roundings). It takes minutes on
    Doge-20M shapes.
    """
    import copy

    from .backends.torch import TorchRunner
    from .validate import ValidateConfig, case_spreads, dtype_spread

    dtype = manifest.info.dtype
    backend = "onnxruntime" if dtype == "float32" else "onnx-reference"
    ties = []
    reference = TorchRunner(model, manifest.info, stable_topk=True, tie_log=ties)
    cfg = ValidateConfig()
    if dtype != "float32":  # the half tolerance is never below what the dtype itself costs per case
        fp32 = TorchRunner(copy.deepcopy(model).float(), manifest.info, stable_topk=True)
        cfg = ValidateConfig(spreads=case_spreads(reference, fp32))
        log(f"  transformers {dtype} vs float32 on the same weights: max|diff| "
            + ", ".join(f"{s:.2e}" for s in cfg.spreads) + " (per case)")
    log(f"validating {dtype} graphs ({backend}) against transformers in {dtype} (stable keep-window top-k) ...")
    reports = validate_graphs(manifest, backend, reference, cfg, ties, log)
    if dtype != "float32":
        reports[backend]["reference_spread"] = dtype_spread(cfg.spreads, dtype)
    if bad := all_failures(reports):
        raise DogeExportError("validation failed, nothing was written:\n  " + "\n  ".join(bad))
    return reports


def validate_graphs(manifest, backend: str, reference, cfg, ties: list, log) -> dict:
    """{backend: report}; for onnxruntime, also the rows-layout graphs (manifest lm_rows), if any,
    under ROWS_BACKEND: they are graphs too, checked the same way."""
    from .backends.ort import OrtRunner
    from .replay import ReplayedReference
    from .validate import validate_runner

    rows = backend == "onnxruntime" and bool(manifest.data.get("lm_rows"))
    if rows:  # the same cases again: the reference's answers are replayed, not recomputed
        reference = ReplayedReference(reference, ties)
    with open_runner(manifest, backend) as runner:
        reports = {backend: validate_runner(runner, reference, cfg, log=log, tie_log=ties)}
    if rows:
        log("validating the rows-layout graphs (onnxruntime, lm_weight [vocab, hidden]) ...")
        ties.clear()  # the reference's tie log, per run
        reference.replay()
        with OrtRunner(manifest, lm_layout="rows") as runner:
            reports[ROWS_BACKEND] = validate_runner(runner, reference, cfg, log=log, tie_log=ties)
    return reports


def all_failures(reports: dict) -> list[str]:
    from .validate import failures

    return [("rows-layout graphs: " if name == ROWS_BACKEND else "") + line
            for name, report in reports.items() for line in failures(report)]


def refuse_quantized_parity(manifest) -> None:
    if manifest.quantized:
        from .inspect_cmd import quantization_text

        raise DogeExportError(
            f"artifact '{manifest.folder}' has {manifest.quantized} weights, which are never checked for parity "
            f"against PyTorch (recorded instead: {quantization_text(manifest)}); validate an fp32 export "
            "instead (`doge-export onnx` without --quantize)"
        )


def check_validate_options(backend: str, decode_steps: int, greedy_steps: int, atol: float | None) -> None:
    if backend == "torch":
        raise DogeExportError("--backend torch is the PyTorch reference itself; validate onnxruntime, "
                              "onnxruntime-packed or tensorrt against it")
    for option, value in (("--decode-steps", decode_steps), ("--greedy-steps", greedy_steps)):
        if value < 1:
            raise DogeExportError(f"{option} must be at least 1, got {value}")
    if atol is not None and not atol > 0:
        raise DogeExportError(f"--atol must be greater than 0, got {atol}")


def run_validate(artifact: Path, *, backend: str, model, decode_steps: int, greedy_steps: int,
                 atol: float, as_json: bool, log) -> None:
    from .validate import ValidateConfig

    check_validate_options(backend, decode_steps, greedy_steps, atol)
    manifest = load_manifest(artifact)
    refuse_quantized_parity(manifest)
    cfg = ValidateConfig(decode_steps=decode_steps, greedy_steps=greedy_steps, atol=atol)
    ties = []
    reports = validate_graphs(manifest, backend, torch_reference(manifest, model, tie_log=ties), cfg, ties, log)
    if model is None:  # the record is the artifact's own: against its source model, with these settings
        settings = {"decode_steps": decode_steps, "greedy_steps": greedy_steps, "atol": atol}
        manifest.data["validation"] = {**(manifest.data.get("validation") or {}),
                                       **{name: {**report, "settings": settings} for name, report in reports.items()}}
        manifest.save()
    else:
        log(f"not recorded in the manifest: the reference was --model {model}, not the artifact's source")
    if as_json:
        shown = {**reports[backend], "passed": not all_failures(reports)}  # "passed": every graph checked
        print(json.dumps(shown | ({"rows_layout": reports[ROWS_BACKEND]} if ROWS_BACKEND in reports else {}), indent=2))
    if bad := all_failures(reports):
        raise DogeExportError("validation failed:\n  " + "\n  ".join(bad))
    log(f"validation passed ({' and '.join(reports)} vs transformers)")


def generation_config(manifest, *, greedy, temperature, top_k, top_p, repetition_penalty,
                      stop_ids, seed, max_new_tokens) -> GenerateConfig:
    """CLI options over the checkpoint's generation_config; greedy when neither says otherwise."""
    if max_new_tokens < 1:
        raise DogeExportError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    vocab = manifest.info.vocab_size
    if bad := [i for i in stop_ids or () if not 0 <= i < vocab]:
        raise DogeExportError(f"--stop-id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    defaults = manifest.data.get("generation_defaults") or {}
    sampling = [v for v in (temperature, top_k, top_p) if v is not None]
    if greedy and sampling:
        raise DogeExportError("--greedy cannot be combined with --temperature, --top-k or --top-p")
    do_sample = False if greedy else bool(sampling) or bool(defaults.get("do_sample", False))
    pick = lambda value, key, default: value if value is not None else defaults.get(key, default)  # noqa: E731
    return GenerateConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=float(pick(temperature, "temperature", 1.0)), top_k=int(pick(top_k, "top_k", 0) or 0),
        top_p=float(pick(top_p, "top_p", 1.0)),
        repetition_penalty=float(pick(repetition_penalty, "repetition_penalty", 1.0)),
        stop_ids=tuple(stop_ids) if stop_ids else None, seed=seed,
    )


def run_generate(artifact: Path, prompts, input_ids, *, chat, system, backend, provider, threads,
                 as_json, spin=False, **options) -> None:
    if threads is not None and threads < 1:
        raise DogeExportError(f"--threads must be at least 1, got {threads}")
    manifest = load_manifest(artifact)
    cfg = generation_config(manifest, **options)
    ids, tokenizer = prompts_to_ids(manifest, list(prompts), list(input_ids), chat=chat, system=system)
    stream = None if as_json or len(ids) > 1 else make_streamer(tokenizer)
    with open_runner(manifest, backend, provider=provider, threads=threads, spin=spin, batch=len(ids)) as runner:
        result = generate(runner, ids, cfg, on_token=stream)
    texts = [tokenizer.decode(t) if tokenizer else None for t in result.tokens]
    if as_json:
        print(json.dumps({"tokens": result.tokens, "text": texts, "stats": result.stats}))
    elif stream is None:
        for n, tokens in enumerate(result.tokens):
            print(f"[{n}] " + (texts[n] if tokenizer else " ".join(map(str, tokens))))
    else:
        stream.finish()


def make_streamer(tokenizer):
    """on_token callback that prints batch row 0 as it is generated (text, or ids)."""
    if tokenizer is None:
        return _IdStreamer()
    from .text import IncrementalDecoder

    return _TextStreamer(IncrementalDecoder(tokenizer))


class _IdStreamer:
    def __call__(self, step, tokens, finished):
        sys.stdout.write(("" if step == 0 else " ") + str(int(tokens[0])))
        sys.stdout.flush()

    def finish(self):
        print()


class _TextStreamer:
    def __init__(self, decoder):
        self.decoder, self.ids, self.done = decoder, [], False

    def __call__(self, step, tokens, finished):
        if self.done:
            return
        self.ids.append(int(tokens[0]))
        self.done = bool(finished[0])
        sys.stdout.write(self.decoder.step(self.ids))
        sys.stdout.flush()

    def finish(self):
        print(self.decoder.finish(self.ids))


def run_inspect(artifact, model, *, as_json: bool) -> None:
    from .inspect_cmd import describe_artifact, describe_checkpoint

    if (artifact is None) == (model is None):
        raise DogeExportError("give an artifact folder, or --model M to identify a checkpoint (not both)")
    data, text = describe_artifact(artifact) if artifact else describe_checkpoint(model)
    print(json.dumps(data, indent=2) if as_json else text)


def check_output_file(path: Path | None, option: str) -> None:
    """Fail before a long run if `path` (an --json/--plot file) cannot be written; creates its folder."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise DogeExportError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(path)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DogeExportError(f"cannot write {option} {path}: {e.strerror or e}; choose a writable path") from None


def check_plot_format(plt, path: Path) -> None:
    """matplotlib picks the format from the name's suffix: refuse one it cannot write."""
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise DogeExportError(f"--plot {path}: matplotlib cannot write {('.' + suffix) if suffix else 'a name without a suffix'};"
                              f" use .png (or {', '.join('.' + f for f in sorted(formats) if f != 'png')})")


def run_bench_command(artifact: Path, *, backends: str, json_out, plot, log, **options) -> None:
    import shlex

    from .bench import BenchConfig, run_bench
    from .bench_report import format_table, plot_report, require_matplotlib

    cfg = BenchConfig(backends=tuple(b.strip() for b in backends.split(",") if b.strip()), **options)
    check_output_file(json_out, "--json")
    check_output_file(plot, "--plot")
    if plot:
        check_plot_format(require_matplotlib(), plot)  # before the run, not after it
    report = run_bench(artifact, cfg, log=log)
    report["command"] = shlex.join(["doge-export", *sys.argv[1:]])
    print(format_table(report))
    if json_out:
        write_json_atomic(Path(json_out), report, indent=1)
        log(f"wrote {json_out}")
    if plot:
        write_atomically(plot, lambda tmp: plot_report(report, tmp))
        log(f"wrote {plot}")
