"""The artifact folder's manifest, `doge_export.json` (DESIGN §4): the contract a runtime follows.

Pure stdlib: a deployment box reads it without torch, transformers or onnx. Loading verifies the
schema version and every file's sha256, and refuses with a clear message what it cannot run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DogeExportError
from .spec import ModelInfo

MANIFEST_NAME = "doge_export.json"
SCHEMA = "doge-export/artifact"
SCHEMA_VERSION = 1

EVICTION_RULE = (
    "Per layer, batch row and KV head: among the C slots and the new token, the one with the "
    "smallest bias is left out of this step's attention; among equal biases the latest position "
    "is left out (the new token is always the latest). If a slot is left out, the new row is "
    "written there; if the new token is left out, nothing is written (slot = -1). Empty slots "
    "hold bias = dtype minimum and position = -1. Prefill keeps, in position order, the rows that "
    "a stable top-keep_window_size over the last query's visible keys keeps (earlier position wins)."
)
CONVENTIONS = {
    "padding": "left; attention_mask 1 = token, 0 = padding",
    "position_ids": "prefill: cumsum(attention_mask) - 1, and 0 at padding; step: previous + 1 per row",
    "max_context": "padded prompt length + generated tokens <= max_context",
    "finished_rows": "rows that stopped keep being fed pad_token_id (as transformers generate does)",
    "dynamic_rope": "base rescaled in the graph from max(position_ids)+1 over the whole batch",
    "logits": "float; prefill returns the last position only unless model_info.full_logits",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict:
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


@dataclass
class Manifest:
    folder: Path
    data: dict

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_dict(self.data["model_info"])

    def path(self, name: str) -> Path:
        return self.folder / name

    def graph_file(self, graph: str) -> Path:
        return self.folder / self.data["graphs"][graph]["file"]

    @property
    def quantization(self) -> dict:
        """The manifest's "quantization" entry ({} for fp32/fp16 weights)."""
        return self.data.get("quantization") or {}

    @property
    def quantized(self) -> str | None:
        """"int8" / "int4" for weight-only quantized artifacts (MatMulNBits), else None."""
        return self.quantization.get("mode")

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = self.data.get("tokenizer")
        return self.folder if tok and tok.get("files") else None

    def save(self) -> None:
        write_json_atomic(self.folder / MANIFEST_NAME, self.data)


def temp_sibling(path: Path) -> Path:
    """A hidden file beside `path`, with its suffix (matplotlib picks the format from it)."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def write_atomically(path: Path, write) -> None:
    """write(temp_path), then rename onto `path`: a failed or interrupted write never leaves a
    half-written file, and the temporary one is removed either way."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict, indent: int = 2) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent, sort_keys=False) + "\n"))


def load_manifest(folder: str | Path, *, verify: bool = True) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if folder.exists() and not folder.is_dir():
        raise DogeExportError(f"'{folder}' is a file; give the artifact folder that `doge-export onnx` wrote")
    if not folder.is_dir():
        raise DogeExportError(f"artifact folder '{folder}' does not exist; create one with `doge-export onnx`")
    if not path.is_file():
        raise DogeExportError(f"'{folder}' has no {MANIFEST_NAME}: not a doge-export artifact folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DogeExportError(f"{path} is not valid JSON ({exc}); re-export the artifact") from None
    check_schema(data, path)
    manifest = Manifest(folder, data)
    if verify:
        verify_files(manifest)
    return manifest


def check_schema(data: dict, path: Path) -> None:
    if not isinstance(data, dict):
        raise DogeExportError(f"{path} is not a doge-export manifest (a JSON {type(data).__name__}, not an object)")
    if data.get("schema") != SCHEMA:
        raise DogeExportError(f"{path} is not a doge-export manifest (schema {data.get('schema')!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DogeExportError(
            f"{path} has manifest schema version {version!r}; this doge-export reads version "
            f"{SCHEMA_VERSION}. Re-export the artifact with this version, or use the doge-export "
            "release that wrote it"
        )
    problems = structure_problems(data)
    if problems:
        raise DogeExportError(f"{path} is malformed ({'; '.join(problems)}); re-export the artifact")


POSITIVE_INFO = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "capacity",
                 "keep_window_size", "max_prompt", "max_context")


def structure_problems(data: dict) -> list[str]:
    """What a runtime reads before anything else, checked for presence and type: an edited or
    truncated manifest gets a clear error instead of a KeyError somewhere downstream."""
    problems = []
    for key, kind in (("files", dict), ("model_info", dict), ("graphs", dict), ("weights", dict)):
        if not isinstance(data.get(key), kind):
            problems.append(f"{key!r} missing or not an object")
    if problems:
        return problems
    for name, entry in data["files"].items():
        if not _inside_folder(name):
            problems.append(f"file {name!r} is not a plain name inside the artifact folder")
        elif not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _is_int(entry.get("bytes"))):
            problems.append(f"files[{name!r}] needs a sha256 string and a bytes count")
    info = data["model_info"]
    problems += [f"model_info.{k} must be a positive integer" for k in POSITIVE_INFO if not (_is_int(info.get(k)) and info[k] > 0)]
    if not isinstance(info.get("dtype", "float32"), str):
        problems.append("model_info.dtype must be a string")
    for graph in ("prefill", "step"):
        entry = data["graphs"].get(graph)
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and _inside_folder(entry["file"])):
            problems.append(f"graphs.{graph}.file missing or outside the artifact folder")
    weights = data["weights"]
    if not (isinstance(weights.get("file"), str) and _inside_folder(weights["file"]) and isinstance(weights.get("tensors"), list)):
        problems.append("weights needs a file inside the artifact folder and a tensors list")
    return problems


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inside_folder(name) -> bool:
    """A relative path that stays inside the folder (no absolute path, no `..`)."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def verify_files(manifest: Manifest) -> None:
    """Every listed file exists and has its recorded sha256; raises naming each bad file."""
    bad = []
    for name, entry in manifest.data["files"].items():
        file = manifest.folder / name
        if not file.is_file():
            bad.append(f"{name} is missing")
        elif file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            bad.append(f"{name} does not match its checksum (modified or corrupted)")
    if bad:
        raise DogeExportError(
            f"artifact '{manifest.folder}' failed verification: {'; '.join(bad)}. "
            "Re-export it with `doge-export onnx --force`"
        )
