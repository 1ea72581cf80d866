"""TensorRT engines of an artifact folder: lint, build, record, and the checks made before loading.

Profiles come from the spec and the manifest. The prefill engine takes batch 1..B and prompt
1..max_prompt (opt: B and min(128, max_prompt)); the step engine is fully static at batch B
(min = opt = max for every input), so one captured CUDA graph replays every step. Each engine's
facts (flavour, TensorRT version, compute capability, dtype, profiles, sha256, build time) go into
the manifest under "engines", and the files into "files" with their checksums.
TensorRT itself is imported only when a build or a real lint runs (trt_build.trt_module).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx

from . import trt_build
from .errors import DogeExportError
from .lint import Finding, build_with_findings, errors, lint_static, lint_with_tensorrt
from .manifest import Manifest, file_entries, write_atomically
from .spec import BATCH, PROMPT, SLOTS, ModelInfo, graph_specs

GRAPHS = ("prefill", "step")
LINT_FLAVORS = ("auto", "tensorrt-rtx", "tensorrt", "none")
OPT_PROMPT = 128
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class EngineConfig:
    flavor: str = "tensorrt-rtx"
    compute_capability: str = "8.9"
    batch: int = 1  # the step engine's fixed batch; prefill accepts 1..batch
    opt_prompt: int | None = None  # prefill profile's opt prompt length [min(128, max_prompt)]
    workspace_mib: int | None = None  # None: TensorRT's default
    optimization_level: int = 3
    timing_cache: Path | None = None  # enterprise TensorRT; None: <artifact>/timing.cache
    hardware_compatibility: str | None = None  # enterprise: none, ampere_plus, same_compute_capability

    def __post_init__(self):
        if self.flavor not in trt_build.FLAVORS:
            raise DogeExportError(f"--flavor {self.flavor!r}: expected one of {sorted(trt_build.FLAVORS)}")
        if self.batch < 1:
            raise DogeExportError(f"--batch must be >= 1, got {self.batch}")
        if not 0 <= self.optimization_level <= 5:
            raise DogeExportError(f"--optimization-level must be 0..5, got {self.optimization_level}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise DogeExportError(f"--workspace-mib must be >= 1, got {self.workspace_mib}")


def profiles_for(info: ModelInfo, graph: str, batch: int, opt_prompt: int | None = None) -> dict[str, Shapes]:
    """{input: (min, opt, max)} for every input of `graph`, from the spec's symbolic dims."""
    opt_t = min(opt_prompt or OPT_PROMPT, info.max_prompt)
    if graph == "step":
        ranges = {dim: (value,) * 3 for dim, value in step_fixed_dims(batch, info.capacity).items()}
    else:
        ranges = {BATCH: (1, batch, batch), PROMPT: (1, opt_t, info.max_prompt)}
    return {s.name: tuple(tuple(ranges[d][k] if isinstance(d, str) else d for d in s.shape) for k in range(3))
            for s in graph_specs(info)[graph]["inputs"]}


def step_fixed_dims(batch: int, capacity: int) -> dict[str, int]:
    """The symbolic dims a step engine's profile pins (min = opt = max): its batch, and all C slots
    (a CUDA graph replays fixed shapes)."""
    return {BATCH: batch, SLOTS: capacity}


def static_findings(manifest: Manifest, graph: str, batch: int) -> list[Finding]:
    """The static rules; the step graph is checked with `batch` pinned, as its engine's profile pins it."""
    model = onnx.load(str(manifest.graph_file(graph)), load_external_data=False)
    fixed = step_fixed_dims(batch, manifest.info.capacity) if graph == "step" else None
    return lint_static(model, step_graph=graph == "step", fixed_dims=fixed)


def lint_flavor(flavor: str) -> str | None:
    """'auto' -> the TensorRT flavour that can build here (TensorRT-RTX first), None when none can."""
    if flavor not in LINT_FLAVORS:
        raise DogeExportError(f"--flavor {flavor!r}: expected one of {', '.join(LINT_FLAVORS)}")
    if flavor != "auto":
        return None if flavor == "none" else flavor
    if _importable("tensorrt_rtx"):
        return "tensorrt-rtx"
    if _importable("tensorrt") and trt_build._local_compute_capability():
        return "tensorrt"  # enterprise TensorRT builds only on a GPU
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # blocked, or a broken install
        return False


def lint_artifact(manifest: Manifest, *, flavor: str | None, compute_capability: str = "8.9",
                  batch: int = 1) -> dict[str, list[Finding]]:
    """Per graph: the static rules, then (flavor given, no static error) TensorRT's parser + build."""
    out = {}
    for graph in GRAPHS:
        findings = static_findings(manifest, graph, batch)
        if flavor is not None and not errors(findings):
            findings += lint_with_tensorrt(manifest.graph_file(graph), flavor=flavor,
                                           compute_capability=compute_capability,
                                           profiles=profiles_for(manifest.info, graph, batch))
        out[graph] = findings
    return out


def refuse_quantized(manifest: Manifest) -> None:
    """int8/int4 artifacts hold ONNX Runtime's CPU ops (MatMulNBits, its fusions): no TensorRT graph."""
    if manifest.quantized:
        raise DogeExportError(
            f"artifact '{manifest.folder}' has {manifest.quantized} weights for ONNX Runtime's CPU kernels (MatMulNBits), "
            "which TensorRT cannot build; build engines from an fp32 or fp16 export "
            "(`doge-export onnx` without --quantize, optionally --dtype fp16)")


def build_engines(manifest: Manifest, cfg: EngineConfig, log=print) -> dict:
    """Lint (static), build both engines, then write them and their records into the artifact.

    Nothing in the folder changes unless both builds succeed. Returns the manifest's "engines".
    """
    refuse_quantized(manifest)
    bad = [f"{g}: {f}" for g in GRAPHS for f in errors(static_findings(manifest, g, cfg.batch))]
    if bad:
        raise DogeExportError("lint found errors, no engine was built:\n  " + "\n  ".join(bad))
    target = trt_build._target_compute_capability(cfg.flavor, cfg.compute_capability)
    cache = cfg.timing_cache or (manifest.folder / "timing.cache" if cfg.flavor == "tensorrt" else None)
    plans, records = {}, {}
    for graph in GRAPHS:
        profiles = profiles_for(manifest.info, graph, cfg.batch, cfg.opt_prompt)
        log(f"building the {graph} engine ({cfg.flavor}, compute capability {target}) ...")
        result, findings = build_with_findings(
            manifest.graph_file(graph), flavor=cfg.flavor, compute_capability=cfg.compute_capability,
            profiles=profiles, optimization_level=cfg.optimization_level, timing_cache_path=cache,
            workspace_bytes=cfg.workspace_mib and cfg.workspace_mib << 20,
            hardware_compatibility=cfg.hardware_compatibility)
        if result is None:
            raise DogeExportError(f"the {graph} engine failed to build, nothing was written:\n  "
                                  + "\n  ".join(map(str, findings)))
        plans[graph] = result.plan
        records[graph] = engine_record(graph, result, target, manifest.info, profiles, cfg, cache)
        log(f"  {graph}: {len(result.plan) / 2**20:.1f} MiB plan in {result.build_seconds:.1f} s")
    save_engines(manifest, plans, records)
    return records


def engine_record(graph: str, result, target: str, info: ModelInfo, profiles: dict, cfg: EngineConfig,
                  cache: Path | None) -> dict:
    return {
        "file": f"{graph}.engine", "flavor": result.flavor, "trt_version": result.trt_version,
        "compute_capability": target, "dtype": info.dtype, "batch": cfg.batch, "static_shapes": graph == "step",
        "profiles": {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in profiles.items()},
        "bytes": len(result.plan), "sha256": hashlib.sha256(result.plan).hexdigest(),
        "build_seconds": round(result.build_seconds, 2), "optimization_level": cfg.optimization_level,
        "workspace_bytes": cfg.workspace_mib and cfg.workspace_mib << 20,
        "hardware_compatibility": cfg.hardware_compatibility,
        "timing_cache": None if cache is None or cfg.flavor == "tensorrt-rtx" else str(cache),
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_engines(manifest: Manifest, plans: dict[str, bytes], records: dict[str, dict]) -> None:
    """Write the plans (temp file + rename), drop superseded engine files, then the manifest."""
    for graph, plan in plans.items():
        write_atomically(manifest.folder / records[graph]["file"], lambda tmp, plan=plan: tmp.write_bytes(plan))
    files = manifest.data["files"]
    for old in (manifest.data.get("engines") or {}).values():
        if old["file"] not in {r["file"] for r in records.values()}:
            files.pop(old["file"], None)
            (manifest.folder / old["file"]).unlink(missing_ok=True)
    files.update(file_entries(manifest.folder, [r["file"] for r in records.values()]))
    manifest.data["engines"] = records
    manifest.save()


def engine_problems(record: dict, *, installed_version: str | None, local_cc: str | None, dtype: str) -> list[str]:
    """Why an engine recorded in the manifest cannot run here; [] when it can."""
    flavor, problems = record["flavor"], []
    if installed_version is None:
        problems.append(f"{flavor} is not installed ({trt_build.INSTALL_HINTS[flavor]})")
    elif installed_version != record["trt_version"]:
        problems.append(f"it was built with {flavor} {record['trt_version']} but {installed_version} is "
                        "installed, and an engine runs only with the release that built it")
    if local_cc is None:
        problems.append("no CUDA GPU is visible (TensorRT engines run on an NVIDIA GPU)")
    elif record["compute_capability"] not in ("local", local_cc):
        problems.append(f"it targets compute capability {record['compute_capability']} but this GPU is {local_cc}")
    if record["dtype"] != dtype:
        problems.append(f"it is {record['dtype']} but the artifact's graphs are {dtype} (re-exported since)")
    return problems


def rebuild_hint(folder: Path, record: dict, local_cc: str | None) -> str:
    cc = local_cc or record["compute_capability"]
    return f"doge-export trt {folder} --flavor {record['flavor']} --compute-capability {cc} --batch {record['batch']}"


def check_engines(manifest: Manifest, installed_version: str | None, local_cc: str | None) -> dict:
    """The manifest's engines, or a DogeExportError saying which must be rebuilt and how."""
    engines = manifest.data.get("engines") or {}
    missing = [g for g in GRAPHS if g not in engines]
    if missing:
        raise DogeExportError(f"artifact '{manifest.folder}' has no TensorRT {' / '.join(missing)} engine: build "
                              f"them with `doge-export trt {manifest.folder}`")
    for graph in GRAPHS:
        problems = engine_problems(engines[graph], installed_version=installed_version, local_cc=local_cc,
                                   dtype=manifest.info.dtype)
        if problems:
            raise DogeExportError(f"the {graph} engine of '{manifest.folder}' cannot run here: "
                                  f"{'; '.join(problems)}. It must be rebuilt here: "
                                  + rebuild_hint(manifest.folder, engines[graph], local_cc))
    return engines


def lint_file(path: Path, *, flavor: str | None, compute_capability: str, batch: int, step: bool) -> list[Finding]:
    """One ONNX file: static rules (as a step graph with `step`), then TensorRT's parser + build."""
    model = onnx.load(str(path), load_external_data=False)
    fixed = step_fixed_dims(batch, capacity=0) if step else None  # a bare file does not say its C
    findings = lint_static(model, step_graph=step, fixed_dims=fixed)
    if flavor is not None and not errors(findings):
        findings += lint_with_tensorrt(path, flavor=flavor, compute_capability=compute_capability)
    return findings


def run_lint(path: Path, *, flavor: str, compute_capability: str, batch: int, step: bool, as_json: bool,
             log=print) -> None:
    """`doge-export lint PATH`: print every finding; raise (exit 1) when any is an error."""
    from .manifest import load_manifest

    real = lint_flavor(flavor)
    options = {"flavor": real, "compute_capability": compute_capability, "batch": batch}
    if path.is_dir():
        results = lint_artifact(load_manifest(path), **options)
    elif path.suffix == ".onnx" and path.is_file():
        results = {path.name: lint_file(path, step=step, **options)}
    else:
        raise DogeExportError(f"'{path}' is neither an artifact folder nor an .onnx file")
    stage = (f"{real} parser + build for {compute_capability}" if real else
             "skipped (--flavor none)" if flavor == "none" else "skipped (no TensorRT importable)")
    if as_json:
        import json

        print(json.dumps({"real_stage": stage, "findings": {g: [vars(f) for f in fs] for g, fs in results.items()}},
                         indent=2))
    else:
        for graph, findings in results.items():
            print(f"{graph}: {len(errors(findings))} errors, {len(findings) - len(errors(findings))} warnings")
            for f in findings:
                print(f"  {f}")
    log(f"static rules + real stage: {stage}")
    total = sum(len(errors(fs)) for fs in results.values())
    if total:
        raise DogeExportError(f"lint found {total} error(s) in {path}; each names its node above")


def run_trt(folder: Path, cfg: EngineConfig, log=print) -> None:
    """`doge-export trt DIR`: static lint, then both engines (the build is the real lint stage)."""
    from .manifest import load_manifest

    records = build_engines(load_manifest(folder), cfg, log)
    for graph, r in records.items():
        print(f"{graph}: {r['file']} {r['bytes'] / 2**20:.1f} MiB, {r['flavor']} {r['trt_version']}, "
              f"sm {r['compute_capability']}, {r['dtype']}, batch {r['batch']}, built in {r['build_seconds']} s")
