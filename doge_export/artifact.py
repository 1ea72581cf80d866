"""`doge-export onnx` end to end: graphs, tokenizer, manifest, validation, atomic publish.

Everything is written into a hidden sibling folder first and renamed into place only when the
export (and its validation) succeeded, so a failed or interrupted export leaves no folder behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import __version__, spec
from .errors import DogeExportError
from .export_onnx import ExportConfig, export_graphs, model_info
from .lm_rows import write_rows_graphs
from .legacy.state import eviction_rule, generation_manifest, state_info
from .manifest import CONVENTIONS, EVICTION_RULE, MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, Manifest, file_entries
from .model import LoadedModel
from .precision import cast_model, model_dtype, precision_record

GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite unless --force, and never delete a folder that is not an artifact; fail
    here, before the slow export, when the folder cannot be created at all."""
    if not out_dir.exists():
        _check_creatable(out_dir)
        return
    if out_dir.is_file():
        raise DogeExportError(f"'{out_dir}' is a file, not a folder; choose another --out")
    if not any(out_dir.iterdir()):  # an empty folder holds nothing to lose
        return
    if not force:
        raise DogeExportError(f"output folder '{out_dir}' already exists; pass --force to replace it")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise DogeExportError(
            f"refusing to replace '{out_dir}': it is not empty and not a doge-export artifact folder"
        )


def _check_creatable(out_dir: Path) -> None:
    """Create --out's parent folders and make sure a folder can be made beside where --out goes."""
    probe = out_dir.parent / f".{out_dir.name}.probe-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise DogeExportError(f"cannot create --out '{out_dir}': {e.strerror or e}; choose a writable folder") from None


def publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def copy_tokenizer(source: Path | None, tokenizer_dir: Path | None, dest: Path, vocab: int) -> dict | None:
    """Copy the tokenizer files (from --tokenizer, else the checkpoint folder) into the artifact."""
    from .text import TextTokenizer, files_to_copy, special_ids

    src = tokenizer_dir or source
    if src is None or not (Path(src) / "tokenizer.json").is_file():
        if tokenizer_dir is not None:
            raise DogeExportError(f"--tokenizer '{tokenizer_dir}' has no tokenizer.json")
        return None
    tok = TextTokenizer.from_dir(src)
    size = tok.tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise DogeExportError(f"tokenizer in '{src}' has {size} ids but the model's vocabulary is {vocab}")
    names = []
    for f in files_to_copy(src):
        shutil.copy2(f, dest / f.name)
        names.append(f.name)
    return {"files": names, **special_ids(src), "padding_side": tok.padding_side,
            "chat_template": chat_template_entry(Path(src), tok.chat_template)}


def chat_template_entry(src: Path, template) -> dict | None:
    """Where the artifact's chat template lives and its sha256 (named templates: their names)."""
    if template is None:
        return None
    where = "chat_template.jinja" if (src / "chat_template.jinja").is_file() else "tokenizer_config.json"
    if isinstance(template, dict):
        return {"file": where, "names": sorted(template)}
    return {"file": where, "sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()}


def build_manifest(loaded: LoadedModel, info: spec.ModelInfo, result: dict, tokenizer: dict | None, seed: int) -> dict:
    gen_cfg = {k: loaded.generation_config[k] for k in GENERATION_KEYS if k in loaded.generation_config}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "doge_export_version": __version__,
        "source": {"model": loaded.source, "seed": seed, "generation": loaded.generation,
                   "overrides": loaded.overrides},
        "config": loaded.config.to_dict(),
        "generation": generation_manifest(loaded.generation, loaded.model),
        "model_info": info.to_dict(),
        "graphs": {
            name: {"file": f"{name}.onnx", "inputs": spec.spec_to_json(io["inputs"]),
                   "outputs": spec.spec_to_json(io["outputs"])}
            for name, io in spec.graph_specs(info).items()
        },
        "lm_rows": result.get("lm_rows"),  # the same graphs reading the tied matrix as [vocab, hidden]
        "weights": result["weights"],
        "state": {"fields": list(spec.STATE_FIELDS), "step_rows": list(spec.ROW_FIELDS),
                  "capacity": info.capacity, "empty_position": spec.EMPTY_POSITION,
                  "empty_bias": "minimum of the state dtype", "eviction_rule": eviction_rule(loaded.model, EVICTION_RULE)},
        "conventions": CONVENTIONS,
        "tokenizer": tokenizer,
        "generation_defaults": gen_cfg,
        "export": result["export"],
        "precision": precision_record(info.dtype),
        "validation": None,
        "engines": {},
        "files": {},
    }


def export_artifact(loaded: LoadedModel, out_dir: Path, export: ExportConfig, *, seed: int = 0,
                    force: bool = False, tokenizer_dir: Path | None = None, validate=None,
                    log=print) -> Manifest:
    """Write the artifact folder; `validate(manifest) -> report` runs before publishing.

    loaded.model is cast in place to export.dtype (the graphs and their reference share it).
    """
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, force)
    if model_dtype(loaded.model) != export.dtype:
        cast_model(loaded.model, export.dtype)
    info = state_info(model_info(loaded.config, export), loaded.model)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = export_graphs(loaded.model, info, export, tmp, log)
        # quantized artifacts have no fp32 tied matrix to lay out in rows
        rows = result["lm_rows"] = None if export.quantize else write_rows_graphs(tmp, result["weights"])
        tokenizer = copy_tokenizer(loaded.checkpoint_dir, tokenizer_dir, tmp, info.vocab_size)
        manifest = Manifest(tmp, build_manifest(loaded, info, result, tokenizer, seed))
        files = ["prefill.onnx", "step.onnx", result["weights"]["file"]] + (tokenizer or {}).get("files", [])
        files += list(rows["graphs"].values()) if rows else []
        manifest.data["files"] = file_entries(tmp, files)
        manifest.save()
        if validate is not None:
            manifest.data["validation"] = validate(manifest)
            manifest.save()
        if export.quantize:  # after validation: the fp32 graphs are the ones proved against PyTorch
            from .quantize import quantize_artifact

            manifest.data["quantization"] = quantize_artifact(manifest, export.quantize, log,
                                                                  block_size=export.quant_block)
            manifest.data["files"] = file_entries(tmp, files)
            manifest.save()
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(out_dir, manifest.data)
