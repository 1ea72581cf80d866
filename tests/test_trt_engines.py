"""`doge-export trt` / `lint` on real artifacts, with TensorRT-RTX's parser and SM89 AOT builder.

TensorRT-RTX builds ahead of time on a CPU-only machine, so CI builds both engines of fp16 Doge-20M
and Doge-20M-MoE graphs here (the builder returning a plan is the proof); running them needs a GPU
(benchmarks/gpu_check.py). The CLI is run as the user runs it, in a subprocess; one test blocks
tensorrt and tensorrt_rtx there to prove the rest of the CLI never needs them.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from doge_export import trt_engines
from doge_export.artifact import export_artifact
from doge_export.export_onnx import ExportConfig
from doge_export.lint import errors
from doge_export.manifest import load_manifest
from doge_export.model import load_model
from doge_export.spec import graph_specs

REPO = Path(__file__).resolve().parents[1]
BLOCK_TRT = "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None; "


def cli(*args: str, block_trt: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """`doge-export ARGS` in a fresh interpreter; with block_trt, importing TensorRT fails there."""
    code = (BLOCK_TRT if block_trt else "") + "from doge_export.cli import main; sys.argv[0] = 'doge-export'; main()"
    return subprocess.run([sys.executable, "-c", "import sys; " + code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    loaded = load_model("random:tiny")
    return export_artifact(loaded, tmp_path_factory.mktemp("tiny") / "a", ExportConfig(), log=lambda *a: None)


def test_profiles_come_from_the_spec_and_the_step_is_static(tiny):
    info = tiny.info
    step = trt_engines.profiles_for(info, "step", batch=4)
    assert set(step) == {s.name for s in graph_specs(info)["step"]["inputs"]}
    assert all(lo == opt == hi and lo[0] == 4 for lo, opt, hi in step.values())
    assert step["key.0"][0] == (4, info.num_kv_heads, info.capacity, info.head_dim)
    prefill = trt_engines.profiles_for(info, "prefill", batch=4, opt_prompt=10)
    assert prefill["input_ids"] == ((1, 1), (4, 10), (4, info.max_prompt))


def test_step_graph_lints_clean_once_the_engine_pins_its_batch(tiny):
    """R21 flags every step input while `batch` is symbolic; the engine's profile pins it."""
    model = onnx.load(str(tiny.graph_file("step")), load_external_data=False)
    from doge_export.lint import lint_static

    assert {f.rule for f in errors(lint_static(model, step_graph=True))} == {"R21-step-static"}
    assert errors(trt_engines.static_findings(tiny, "step", batch=1)) == []


def test_cli_without_tensorrt(tiny, tmp_path):
    """--help, onnx and generate never import tensorrt / tensorrt_rtx; trt says what to install."""
    assert cli("--help", block_trt=True).returncode == 0
    out = tmp_path / "a"
    export = cli("onnx", "--model", "random:tiny", "--out", str(out), "--no-validate", block_trt=True)
    assert export.returncode == 0, export.stderr
    gen = cli("generate", str(out), "--input-ids", "5,6,7", "--max-new-tokens", "4", "--json", block_trt=True)
    assert gen.returncode == 0 and len(json.loads(gen.stdout)["tokens"][0]) == 4, gen.stderr
    build = cli("trt", str(out), block_trt=True)
    assert build.returncode == 1 and "pip install tensorrt-rtx" in build.stderr and "Traceback" not in build.stderr
    static = cli("lint", str(out), block_trt=True)
    assert static.returncode == 0 and "skipped (no TensorRT importable)" in static.stderr


def _save(tmp_path, name, nodes, inputs, outputs, initializers=(), opset=17):
    graph = h.make_graph(nodes, name, inputs, outputs, list(initializers))
    path = tmp_path / f"{name}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]), path)
    return path


def _causal_step(tmp_path):
    vi = h.make_tensor_value_info
    node = h.make_node("Attention", ["q", "k", "v"], ["y"], name="attn_step", is_causal=1)
    inputs = [vi("q", T.FLOAT16, [1, 4, 1, 8]), vi("k", T.FLOAT16, [1, 2, 16, 8]), vi("v", T.FLOAT16, [1, 2, 16, 8])]
    return _save(tmp_path, "causal", [node], inputs, [vi("y", T.FLOAT16, [1, 4, 1, 8])], opset=23)


def _topk(tmp_path):
    k = nh.from_array(np.array([4000], np.int64), "k")
    node = h.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_big", axis=-1)
    outputs = [h.make_tensor_value_info("values", T.FLOAT, [1, 4000]),
               h.make_tensor_value_info("indices", T.INT64, [1, 4000])]
    return _save(tmp_path, "topk", [node], [h.make_tensor_value_info("x", T.FLOAT, [1, 5000])], outputs, [k])


def _int_matmul(tmp_path):
    node = h.make_node("MatMul", ["a", "b"], ["y"], name="int_mm")
    inputs = [h.make_tensor_value_info("a", T.INT64, [2, 3]), h.make_tensor_value_info("b", T.INT64, [3, 2])]
    return _save(tmp_path, "int_mm", [node], inputs, [h.make_tensor_value_info("y", T.INT64, [2, 2])])


def _shapeless(tmp_path):
    node = h.make_node("Relu", ["x"], ["y"], name="relu")
    return _save(tmp_path, "shapeless", [node], [h.make_tensor_value_info("x", T.FLOAT, None)],
                 [h.make_tensor_value_info("y", T.FLOAT, None)])


@pytest.mark.parametrize("make, args, node, rule", [
    (_causal_step, ["--step"], "attn_step", "R17-attention-causal"),
    (_topk, [], "topk_big", "R15-topk"),
    (_int_matmul, [], "int_mm", "R9-matmul-dtype"),
    (_shapeless, [], "x", "R5-input-shape"),
])
def test_lint_cli_fails_on_planted_graphs_naming_the_node(tmp_path, make, args, node, rule):
    result = cli("lint", str(make(tmp_path)), *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error {rule}" in result.stdout and f"'{node}'" in result.stdout
    assert "each names its node above" in result.stderr


@pytest.mark.trt
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["doge-20m", "doge-20m-moe"])
def test_fp16_engines_build_for_sm89_and_lint_passes(preset, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed")
    loaded = load_model(f"random:{preset}")
    manifest = export_artifact(loaded, tmp_path / preset, ExportConfig(dtype="fp16"), log=lambda *a: None)
    findings = trt_engines.lint_artifact(manifest, flavor="tensorrt-rtx", compute_capability="8.9", batch=1)
    assert {g: errors(f) for g, f in findings.items()} == {"prefill": [], "step": []}
    records = trt_engines.build_engines(manifest, trt_engines.EngineConfig(), log=lambda *a: None)
    manifest = load_manifest(manifest.folder)  # verifies every checksum, engines included
    for graph, r in records.items():
        assert r["bytes"] > 20 * 2**20 and (r["flavor"], r["compute_capability"], r["dtype"]) == \
            ("tensorrt-rtx", "8.9", "float16")
        assert manifest.data["files"][r["file"]]["sha256"] == r["sha256"]
        print(f"{preset} {graph}: {r['bytes'] / 2**20:.1f} MiB plan, built in {r['build_seconds']} s")
    assert all(lo == hi for p in records["step"]["profiles"].values() for lo, hi in [(p["min"], p["max"])])
