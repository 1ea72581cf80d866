"""`doge-export inspect`: describe an artifact folder, or identify a checkpoint's generation."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DogeExportError
from .generations import GENERATIONS, SUPPORTED, checkpoint_shapes, detect_generation
from .legacy.layouts import LAYOUTS, describe
from .manifest import load_manifest


def describe_artifact(folder: Path) -> tuple[dict, str]:
    manifest = load_manifest(folder)
    d, info = manifest.data, manifest.info
    source = d.get("source") or {}
    validation = {k: v.get("passed") for k, v in (d.get("validation") or {}).items() if isinstance(v, dict)}
    summary = {
        "folder": str(folder), "source": source, "model_info": info.to_dict(),
        "graphs": {n: {"inputs": len(g.get("inputs", [])), "outputs": len(g.get("outputs", []))}
                   for n, g in d["graphs"].items() if isinstance(g, dict)},
        "files": {n: e["bytes"] for n, e in d["files"].items()},
        "quantization": quantization_summary(manifest),
        "tokenizer": bool(d.get("tokenizer")), "validation_passed": validation,
        "engines": sorted(d.get("engines") or {}),
    }
    lines = [
        f"artifact   {folder} (schema v{d['schema_version']}, doge-export {d.get('doge_export_version', '?')})",
        f"source     {source.get('model', '?')} (generation {source.get('generation', '?')}, seed {source.get('seed', '-')})",
        f"model      vocab {info.vocab_size}, {info.num_layers} layers, {info.num_heads} heads / "
        f"{info.num_kv_heads} KV heads, head dim {info.head_dim}, {info.dtype}",
        f"weights    {quantization_text(manifest)}",
        f"state      {info.capacity} slots per layer (keep window {info.keep_window_size}); "
        f"max prompt {info.max_prompt}, max context {info.max_context}",
        f"tokenizer  {'yes' if d.get('tokenizer') else 'no (token ids only)'}",
        f"validation {validation or ('not run: quantized, see weights' if manifest.quantized else 'not run')}",
        f"engines    {', '.join(summary['engines']) or 'none'}",
        "files      " + ", ".join(f"{n} ({e['bytes'] / 1e6:.1f} MB)" for n, e in d["files"].items()),
    ]
    return summary, "\n".join(lines)


def quantization_summary(manifest) -> dict | None:
    """The quantization entry's essentials (None for unquantized weights)."""
    if not manifest.quantized:
        return None
    q = manifest.quantization
    quality = q.get("quality") or {}
    return {"mode": q.get("mode"), "block_size": q.get("block_size"),
            "top1_agreement": quality.get("top1_agreement"), "max_abs_dlogit": quality.get("max_abs_dlogit"),
            "steps": quality.get("steps")}


def quantization_text(manifest) -> str:
    """One line: the weights' precision and, quantized, their measured quality against fp32."""
    q = quantization_summary(manifest)
    if q is None:
        return f"{manifest.info.dtype} (not quantized)"
    top1, dlogit = q["top1_agreement"], q["max_abs_dlogit"]
    quality = (f"top-1 agreement {top1:.1%}, max |dlogit| {dlogit:.3g} over {q['steps']} decode steps vs fp32"
               if isinstance(top1, (int, float)) and isinstance(dlogit, (int, float)) else "quality not recorded")
    return f"{q['mode']} (block {q['block_size']}), {quality}"


def describe_checkpoint(source: str) -> tuple[dict, str]:
    if source.startswith("random:"):
        from .model import preset_config

        preset_config(source[len("random:"):])  # raises on an unknown preset
        data = {"model": source, "generation": "native", "supported": True,
                "evidence": ["random-weight preset in the native transformers layout"]}
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            from .model import HUB_ID, download_from_hub

            if not path.exists() and (not HUB_ID.match(source) or source.startswith((".", "/"))):
                raise DogeExportError(f"model directory '{source}' does not exist; pass a folder with config.json, "
                                      "a hub id (org/name), or a preset such as random:doge-20m")
            path = download_from_hub(source)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise DogeExportError(f"'{path}' has no config.json; expected a Hugging Face model folder")
        shapes, _ = checkpoint_shapes(path, allow_pickle=False)
        det = detect_generation(shapes, json.loads(config_file.read_text()))
        data = {"model": source, "generation": det.generation, "supported": det.generation in SUPPORTED,
                "evidence": list(det.evidence)}
    dates, what = GENERATIONS[data["generation"]]
    data["differences_from_native"] = describe(LAYOUTS[data["generation"]]) if data["supported"] else []
    text = "\n".join([f"model       {data['model']}", f"generation  {data['generation']} ({dates}: {what})",
                      f"exportable  {'yes' if data['supported'] else 'no'}"]
                     + [f"evidence    {e}" for e in data["evidence"]]
                     + [f"differs     {d}" for d in data["differences_from_native"]])
    return data, text
