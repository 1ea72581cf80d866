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
    validation = {k: v.get("passed") for k, v in (d.get("validation") or {}).items()}
    summary = {
        "folder": str(folder), "source": d["source"], "model_info": info.to_dict(),
        "graphs": {n: {"inputs": len(g["inputs"]), "outputs": len(g["outputs"])} for n, g in d["graphs"].items()},
        "files": {n: e["bytes"] for n, e in d["files"].items()},
        "tokenizer": bool(d.get("tokenizer")), "validation_passed": validation,
        "engines": sorted(d.get("engines") or {}),
    }
    lines = [
        f"artifact   {folder} (schema v{d['schema_version']}, doge-export {d['doge_export_version']})",
        f"source     {d['source']['model']} (generation {d['source']['generation']}, seed {d['source']['seed']})",
        f"model      vocab {info.vocab_size}, {info.num_layers} layers, {info.num_heads} heads / "
        f"{info.num_kv_heads} KV heads, head dim {info.head_dim}, {info.dtype}",
        f"state      {info.capacity} slots per layer (keep window {info.keep_window_size}); "
        f"max prompt {info.max_prompt}, max context {info.max_context}",
        f"tokenizer  {'yes' if d.get('tokenizer') else 'no (token ids only)'}",
        f"validation {validation or 'not run'}",
        f"engines    {', '.join(summary['engines']) or 'none'}",
        "files      " + ", ".join(f"{n} ({e['bytes'] / 1e6:.1f} MB)" for n, e in d["files"].items()),
    ]
    return summary, "\n".join(lines)


def describe_checkpoint(source: str) -> tuple[dict, str]:
    if source.startswith("random:"):
        from .model import preset_config

        preset_config(source[len("random:"):])  # raises on an unknown preset
        data = {"model": source, "generation": "native", "supported": True,
                "evidence": ["random-weight preset in the native transformers layout"]}
    else:
        path = Path(source).expanduser()
        if not path.is_dir():
            from .model import download_from_hub

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
