"""Shared fixtures: random-weight Doge models and their exported artifact folders.

Artifacts are exported once per session (cached by preset, seed and options). Tests that need
what a machine lacks skip with a reason naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_TOKENIZER = REPO.parent / "shared" / "reference" / "doge-tokenizer"
# small windows and positions so short tests cross the keep window and the dynamic NTK RoPE start
CROSSING = {"keep_window_size": 16, "max_position_embeddings": 64}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """artifacts(preset, seed=0, overrides=None, **export_options) -> (Manifest, LoadedModel)."""
    from doge_export.artifact import export_artifact
    from doge_export.export_onnx import ExportConfig
    from doge_export.model import load_model

    cache = {}

    def make(preset: str, seed: int = 0, overrides: dict | None = None, **options):
        key = (preset, seed, tuple(sorted((overrides or {}).items())), tuple(sorted(options.items())))
        if key not in cache:
            loaded = load_model(f"random:{preset}", seed=seed, overrides=overrides)
            out = tmp_path_factory.mktemp("artifact") / preset
            manifest = export_artifact(loaded, out, ExportConfig(**options), seed=seed, log=lambda *a: None)
            cache[key] = (manifest, loaded)
        return cache[key]

    return make


def mapped_regions(path: Path, pid: int | str = "self") -> list[tuple[int, int, int]]:
    """(file offset, bytes, resident KiB) of each region of process `pid`'s mappings of `path`
    (/proc/PID/smaps)."""
    regions, current = [], False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: range perms offset dev inode [path]
            current = len(fields) >= 6 and Path(fields[5]) == Path(path).resolve()
            if current:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append([int(fields[2], 16), end - start, 0])
        elif current and fields[0] == "Rss:":
            regions[-1][2] = int(fields[1])
    return [tuple(r) for r in regions]


def mapped_resident_kib(path: Path, pid: int | str = "self") -> int | None:
    """KiB of `path` resident in process `pid`'s mappings of it; None: not mapped."""
    regions = mapped_regions(path, pid)
    return sum(kib for *_, kib in regions) if regions else None


def assert_gathered_rows_handed_back(generate_tokens, manifest, pid="self"):
    """The gathered tables' rows the prefill read stay mapped until the first step hands them back;
    the steps after it read (and keep) their own rows until the next drop, DROP_EVERY steps later."""
    def resident():
        return gathered_resident_kib(manifest, pid)

    generate_tokens(1)  # prefill only
    after_prefill = resident()
    generate_tokens(2)  # prefill, one step: dropped
    assert after_prefill > 0 and resident() == 0
    generate_tokens(6)  # 5 steps: the first drops, 4 read rows again (a page per table at most)
    tables = sum(1 for t in manifest.data["weights"]["tensors"] if t.get("gathered"))
    assert 0 < resident() <= 4 * tables * os.sysconf("SC_PAGE_SIZE") // 1024


def gathered_resident_kib(manifest, pid: int | str = "self") -> int:
    """KiB resident in the pages of weights.bin that the gathered tensors span."""
    page = os.sysconf("SC_PAGE_SIZE")
    spans = _gathered_page_set(manifest)
    path = manifest.path(manifest.data["weights"]["file"])
    return sum(kib for offset, size, kib in mapped_regions(path, pid)
               if all(p in spans for p in range(offset // page, (offset + size) // page)))


def _gathered_page_set(manifest) -> set[int]:
    page = os.sysconf("SC_PAGE_SIZE")
    return {p for t in manifest.data["weights"]["tensors"] if t.get("gathered")
            for p in range(t["offset"] // page, -(-(t["offset"] + t["length"]) // page))}


def gathered_pages(manifest) -> int:
    """Pages of weights.bin the tensors listed as gathered span (each its own mapping region)."""
    return len(_gathered_page_set(manifest))


def saved_by_a_future_onnxruntime(source: Path, folder: Path) -> Path:
    """A copy of quantized artifact `source` whose step graph has an op this ONNX Runtime lacks,
    as a newer one's optimizer might write, recorded as saved by onnxruntime 99.0.0 (load it
    without verifying checksums)."""
    import json
    import shutil

    import onnx

    shutil.copytree(source, folder)
    step = onnx.load(str(folder / "step.onnx"), load_external_data=False)
    node = next(n for n in step.graph.node if n.domain == "com.microsoft" and n.op_type != "MatMulNBits")
    node.op_type += "V99"
    onnx.save(step, str(folder / "step.onnx"))
    manifest = json.loads((folder / "doge_export.json").read_text())
    manifest["quantization"]["offline_optimization"]["onnxruntime"] = "99.0.0"
    (folder / "doge_export.json").write_text(json.dumps(manifest))
    return folder


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `doge-export ARGS` in a fresh interpreter (exit code, stdout, stderr as the user sees them)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "doge_export.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 1, one clear `error:` line on stderr, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def save_checkpoint(loaded, folder: Path, *, safetensors: bool = True) -> Path:
    """Write a random model as a Hugging Face folder (config.json + weights)."""
    loaded.model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """random:tiny saved as a local Hugging Face folder (tied: the file holds no lm_head)."""
    from doge_export.model import load_model

    return save_checkpoint(load_model("random:tiny", seed=4), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def pickle_checkpoint(tmp_path_factory):
    """random:tiny as a folder with only a pickle pytorch_model.bin."""
    import json

    import torch

    from doge_export.model import load_model

    loaded = load_model("random:tiny", seed=4)
    folder = tmp_path_factory.mktemp("pickle") / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(loaded.config.to_dict()))
    state = {k: v for k, v in loaded.model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, folder / "pytorch_model.bin")
    return folder
