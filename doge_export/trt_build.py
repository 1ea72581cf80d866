"""ONNX -> serialized TensorRT engine, for TensorRT-RTX or enterprise TensorRT.

TensorRT is imported lazily (`trt_module`), so this module imports without it. TensorRT-RTX
(`pip install tensorrt-rtx`) builds ahead of time for a named compute capability on any machine, a
CPU-only one included. Enterprise TensorRT builds for the GPU it runs on and needs one.
Every network is strongly typed: the engine runs in the dtypes the ONNX graph declares
(facts/tensorrt.md §0.1), so an fp16 engine needs an fp16 graph.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doge_export.errors import DogeExportError
from doge_export.manifest import write_atomically

log = logging.getLogger(__name__)

FLAVORS = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
INSTALL_HINTS = {
    "tensorrt-rtx": "install it with `pip install tensorrt-rtx` (or `pip install doge-export[trt]`)",
    "tensorrt": "enterprise TensorRT is not on PyPI alone: install `tensorrt` with NVIDIA's package "
    "index as an extra index URL, or use the NGC TensorRT container; or pick flavor 'tensorrt-rtx'",
}
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildResult:
    plan: bytes  # the serialized engine; tied to this TensorRT version (and, enterprise, GPU)
    build_seconds: float  # configuring + building, parsing excluded
    flavor: str  # "tensorrt-rtx" | "tensorrt"
    trt_version: str
    compute_capability: str  # "8.9"; enterprise: the local GPU's, or "local" when unknown


@dataclass(frozen=True)
class ParserError:
    desc: str
    node_index: int  # -1 when the error belongs to no node
    node_name: str
    op_type: str

    def __str__(self) -> str:
        return f"node #{self.node_index} '{self.node_name}' ({self.op_type}): {self.desc}"


@dataclass
class ParsedNetwork:
    """A parsed network and what must outlive it: the parser owns the weights."""

    builder: Any
    network: Any
    parser: Any
    logger: Any
    errors: list[ParserError]


def trt_module(flavor: str):
    """Import `tensorrt_rtx` (flavor "tensorrt-rtx") or `tensorrt` (flavor "tensorrt")."""
    if flavor not in FLAVORS:
        raise DogeExportError(f"unknown TensorRT flavor '{flavor}': expected one of {sorted(FLAVORS)}")
    try:
        return importlib.import_module(FLAVORS[flavor])
    except ImportError as e:
        raise DogeExportError(
            f"flavor '{flavor}' needs the Python module '{FLAVORS[flavor]}', which failed to import "
            f"({e}): {INSTALL_HINTS[flavor]}"
        ) from e


def _recording_logger(trt):
    """A TensorRT logger that forwards to `logging` and keeps every error message."""

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.debug("[%s] %s", severity.name, msg)

    return RecordingLogger()


def network_from_onnx(trt, onnx_path: str | Path, *, flavor: str) -> ParsedNetwork:
    """Parse an ONNX file with TensorRT's own parser; parser errors come back, not raised."""
    path = Path(onnx_path)
    if not path.is_file():
        raise DogeExportError(f"no ONNX file at {path}: export the graph first")
    logger = _recording_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError as e:  # enterprise TRT without a driver: "factory function returned nullptr"
        raise DogeExportError(
            f"{flavor} could not create a builder ({e}); enterprise TensorRT needs an NVIDIA GPU and "
            "driver to build: run on the target GPU, or use flavor 'tensorrt-rtx' to build ahead of time"
        ) from e
    network = builder.create_network(_network_flags(trt, flavor))
    parser = trt.OnnxParser(network, logger)
    errors = []
    if not parser.parse_from_file(str(path)):
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(ParserError(e.desc(), e.node(), e.node_name(), e.node_operator()))
    return ParsedNetwork(builder, network, parser, logger, errors)


def _network_flags(trt, flavor: str) -> int:
    # TRT-RTX and TRT 11 are always strongly typed (the 11.x flag is ignored and deprecated);
    # TRT 10.x is weakly typed unless asked.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    major = int(trt.__version__.split(".")[0])
    if flavor == "tensorrt" and major < 11 and flag is not None:
        return 1 << int(flag)
    return 0


def build_plan(
    trt,
    parsed: ParsedNetwork,
    *,
    flavor: str,
    compute_capability: str = "8.9",
    profiles: dict[str, tuple[Shape, Shape, Shape]] | None = None,
    workspace_bytes: int | None = None,
    optimization_level: int = 3,
    timing_cache_path: str | Path | None = None,
    hardware_compatibility: str | None = None,
):
    """Configure and run the builder. Returns (plan or None, error messages the build logged).

    Bad options (profiles, compute capability, timing cache) raise DogeExportError.
    """
    builder = parsed.builder
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = optimization_level
    if flavor == "tensorrt-rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(compute_capability_enum(trt, compute_capability), 0)
        if hardware_compatibility not in (None, "none"):
            log.warning("hardware_compatibility is ignored by TensorRT-RTX; it targets compute capability %s",
                        compute_capability)
    elif hardware_compatibility is not None:
        config.hardware_compatibility_level = _hardware_compatibility_enum(trt, hardware_compatibility)
    _add_profile(builder, config, parsed.network, profiles or {})
    cache = _attach_timing_cache(config, timing_cache_path, flavor)
    parsed.logger.errors.clear()
    plan = builder.build_serialized_network(parsed.network, config)
    if plan is not None and cache is not None:
        _save_timing_cache(config, Path(timing_cache_path))
    return plan, list(parsed.logger.errors)


def compute_capability_enum(trt, compute_capability: str):
    """"8.9" (or "89", "sm89", "SM89") -> trt.ComputeCapability.SM89 (TensorRT-RTX only)."""
    name = compute_capability.upper().replace(".", "").replace("_", "")
    name = name if name.startswith("SM") or name == "CURRENT" else "SM" + name
    members = [m for m in dir(trt.ComputeCapability) if m.startswith("SM") or m == "CURRENT"]
    if name not in members:
        raise DogeExportError(
            f"compute capability '{compute_capability}' is not a TensorRT-RTX {trt.__version__} target: "
            f"choose one of {', '.join(members)} (RTX 4090 = 8.9)"
        )
    return getattr(trt.ComputeCapability, name)


def _hardware_compatibility_enum(trt, level: str):
    if level.lower() not in HARDWARE_COMPATIBILITY:
        raise DogeExportError(f"hardware_compatibility '{level}': expected one of {HARDWARE_COMPATIBILITY}")
    return getattr(trt.HardwareCompatibilityLevel, level.upper())


def _add_profile(builder, config, network, profiles: dict[str, tuple[Shape, Shape, Shape]]) -> None:
    """One optimization profile from {input: (min, opt, max)}; every dynamic input needs an entry."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = {name for name, t in inputs.items() if -1 in tuple(t.shape) or t.is_shape_tensor}
    problems = [f"'{n}' is not a network input (inputs: {sorted(inputs)})" for n in profiles if n not in inputs]
    problems += [f"dynamic input '{n}' {tuple(inputs[n].shape)} has no profile" for n in sorted(dynamic - set(profiles))]
    for name, shapes in profiles.items():
        if name in inputs and not inputs[name].is_shape_tensor:
            problems += _profile_problems(name, tuple(inputs[name].shape), shapes)
    if problems:
        raise DogeExportError("bad optimization profile: " + "; ".join(problems)
                              + ". Pass (min, opt, max) shapes with min <= opt <= max for every dynamic input.")
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        setter = profile.set_shape_input if inputs[name].is_shape_tensor else profile.set_shape
        setter(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)


def _profile_problems(name: str, shape: Shape, shapes: tuple[Shape, Shape, Shape]) -> list[str]:
    if len(shapes) != 3 or any(len(s) != len(shape) for s in shapes):
        return [f"'{name}' {shape} needs three shapes of rank {len(shape)}, got {shapes}"]
    problems = []
    for axis, dims in enumerate(zip(*shapes)):
        fixed = shape[axis]
        if fixed != -1 and any(d != fixed for d in dims):
            problems.append(f"'{name}' axis {axis} is fixed at {fixed}, profile gives {dims}")
        elif not 0 <= dims[0] <= dims[1] <= dims[2]:
            problems.append(f"'{name}' axis {axis} needs 0 <= min <= opt <= max, got {dims}")
    return problems


def default_profiles(network, dim_max: int = 64) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Every dynamic dim spans 1..dim_max (opt 1); for linting when no spec profile is at hand."""
    profiles = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if -1 in shape and not t.is_shape_tensor:
            lo = tuple(1 if d == -1 else d for d in shape)
            profiles[t.name] = (lo, lo, tuple(dim_max if d == -1 else d for d in shape))
    return profiles


def _attach_timing_cache(config, path: str | Path | None, flavor: str):
    """Load (or start) the timing cache of enterprise TensorRT; a no-op for TensorRT-RTX."""
    if path is None:
        return None
    if flavor == "tensorrt-rtx":
        log.info("timing cache %s ignored: TensorRT-RTX does not autotune (its timing cache is a no-op)", path)
        return None
    path = Path(path)
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise DogeExportError(f"timing cache {path} was made for another GPU or TensorRT version: delete it and rebuild")
    return cache  # the caller keeps it alive until the build ends


def _save_timing_cache(config, path: Path) -> None:
    data = bytes(config.get_timing_cache().serialize())
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def _local_compute_capability() -> str | None:
    """The local GPU's compute capability via torch, when torch with CUDA is at hand."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _target_compute_capability(flavor: str, requested: str) -> str:
    if flavor == "tensorrt-rtx":
        return requested
    local = _local_compute_capability()
    if local is None:
        log.warning("enterprise TensorRT builds for the local GPU only; could not confirm it is %s", requested)
        return "local"
    if local.replace(".", "") != re.sub(r"\D", "", requested):
        raise DogeExportError(
            f"enterprise TensorRT builds for the local GPU (compute capability {local}), not the requested "
            f"{requested}: build on a {requested} GPU, or use flavor 'tensorrt-rtx' to target {requested} from here"
        )
    return local


def engine_from_onnx(onnx_path: str | Path, *, flavor: str, compute_capability: str = "8.9",
                     **build_options) -> BuildResult:
    """Build a serialized engine from an ONNX file.

    Args (build_options are build_plan's keywords):
        flavor: "tensorrt-rtx" (AOT for `compute_capability`, no GPU needed; JIT-compiles on the
            GPU at load) or "tensorrt" (for the local GPU only; `compute_capability` must match it).
        profiles: input name -> (min, opt, max) shapes; required for every dynamic input.
        workspace_bytes: builder workspace limit; None means TensorRT's default.
        optimization_level: builder optimization level 0..5.
        timing_cache_path: enterprise TensorRT loads it if present and saves it after the build;
            TensorRT-RTX ignores it.
        hardware_compatibility: enterprise only: "none", "ampere_plus" or "same_compute_capability".

    Returns the plan; it runs only with the same TensorRT (or TensorRT-RTX) release.
    Raises DogeExportError naming every node the parser rejects, or the errors the build logged.
    """
    trt = trt_module(flavor)
    target = _target_compute_capability(flavor, compute_capability)
    parsed = network_from_onnx(trt, onnx_path, flavor=flavor)
    if parsed.errors:
        raise DogeExportError(
            f"{flavor} {trt.__version__} could not parse {onnx_path}:\n"
            + "\n".join(f"  {e}" for e in parsed.errors)
            + "\nFix these nodes (doge_export.lint.lint_static explains the common causes) and re-export."
        )
    start = time.perf_counter()
    plan, errors = build_plan(trt, parsed, flavor=flavor, compute_capability=compute_capability, **build_options)
    seconds = time.perf_counter() - start
    if plan is None:
        raise DogeExportError(
            f"{flavor} {trt.__version__} failed to build {onnx_path} for {target}:\n"
            + "\n".join(f"  {m}" for m in errors or ["(no error was logged)"])
        )
    return BuildResult(bytes(plan), seconds, flavor, trt.__version__, target)
