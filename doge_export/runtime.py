"""Open a runner for an artifact folder and turn user prompts into token ids.

Backends are imported lazily: the onnxruntime path never imports torch, transformers or
tensorrt; the torch backend loads the artifact's source model (transformers) as the reference.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DogeExportError
from .manifest import Manifest

BACKENDS = ("onnxruntime", "onnxruntime-packed", "torch", "tensorrt", "onnx-reference")


def open_runner(manifest: Manifest, backend: str = "onnxruntime", *, provider: str = "cpu",
                threads: int | None = None, tie_log: list | None = None, spin: bool = False,
                batch: int | None = None):
    if backend.startswith("onnxruntime") and manifest.info.dtype == "bfloat16":
        raise DogeExportError(
            "ONNX Runtime has no bfloat16 kernels on CPU, so it cannot run this bf16 artifact: use "
            "--backend tensorrt on a GPU, or --backend onnx-reference (slow; tiny models), or "
            "re-export with --dtype fp16 or fp32"
        )
    if backend == "onnx-reference":
        from .backends.onnx_ref import OnnxReferenceRunner

        return OnnxReferenceRunner(manifest)
    if backend in ("onnxruntime", "onnxruntime-packed"):
        from .backends.ort import OrtRunner

        return OrtRunner(manifest, provider=provider, threads=threads, spin=spin, batch=batch,  # sessions for it
                         pack_weights=backend == "onnxruntime-packed")
    if backend == "torch":
        return torch_reference(manifest, tie_log=tie_log)
    if backend == "tensorrt":
        try:
            from .backends.trt import TrtRunner
        except ImportError as exc:
            raise DogeExportError(f"the tensorrt backend is unavailable ({exc})") from None
        return TrtRunner(manifest)
    raise DogeExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise DogeExportError(
            f"the PyTorch reference needs torch and transformers ({exc}); "
            "install them with `pip install doge-export[export]`"
        ) from None


def source_model(manifest: Manifest, model: str | None = None):
    """The PyTorch model the artifact was exported from (or `model`, when given)."""
    require_torch()
    from .model import load_model

    source = manifest.data["source"]
    overrides = None if model else source.get("overrides")
    return load_model(model or source["model"], seed=source.get("seed", 0), overrides=overrides)


def torch_reference(manifest: Manifest, model: str | None = None, tie_log: list | None = None):
    """transformers' model in the artifact's dtype, with its tie rule (stable keep-window top-k)."""
    require_torch()
    from .backends.torch import TorchRunner
    from .precision import cast_model

    reference = cast_model(source_model(manifest, model).model, manifest.info.dtype)
    return TorchRunner(reference, manifest.info, stable_topk=True, tie_log=tie_log)


def parse_overrides(items: list[str]) -> dict:
    """["keep_window_size=16", ...] -> {"keep_window_size": 16}; values parsed as JSON when they can be."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DogeExportError(f"--override expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_ids(text: str) -> list[int]:
    items = text.replace(" ", "").strip(",").split(",")
    if items == [""]:
        raise DogeExportError("--input-ids is empty; give at least one token id")
    try:
        return [int(t) for t in items]  # an empty item (0,,3) is an error, not skipped
    except ValueError:
        raise DogeExportError(f"--input-ids expects comma-separated integers like 0,3,17; got {text!r}") from None


def load_tokenizer(manifest: Manifest):
    if manifest.tokenizer_dir is None:
        return None
    from .text import TextTokenizer

    return TextTokenizer.from_dir(manifest.tokenizer_dir)


def prompts_to_ids(manifest: Manifest, prompts: list[str], input_ids: list[str], *,
                   chat: bool, system: str | None) -> tuple[list[list[int]], object]:
    """-> token-id prompts and the tokenizer (None when the artifact has none)."""
    tokenizer = load_tokenizer(manifest)
    if prompts and input_ids:
        raise DogeExportError("give either --prompt or --input-ids, not both")
    if input_ids:
        if chat or system:
            raise DogeExportError("--chat and --system apply to --prompt text; --input-ids are used as given")
        return [parse_ids(t) for t in input_ids], tokenizer
    if not prompts:
        raise DogeExportError("nothing to generate from: pass --prompt TEXT or --input-ids 0,3,17")
    if tokenizer is None:
        raise DogeExportError(
            f"artifact '{manifest.folder}' has no tokenizer, so --prompt cannot be encoded; pass "
            "--input-ids, or re-export with --tokenizer DIR"
        )
    if chat:
        head = [{"role": "system", "content": system}] if system else []
        return [tokenizer.apply_chat_template(head + [{"role": "user", "content": p}]) for p in prompts], tokenizer
    return [tokenizer.encode(p) for p in prompts], tokenizer


def artifact_path(path: str) -> Path:
    return Path(path).expanduser()
