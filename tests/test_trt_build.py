"""trt_build and lint_with_tensorrt against the real TensorRT-RTX parser and SM89 AOT builder.

TensorRT-RTX builds ahead of time on a CPU-only machine, so these run in CI; they skip when
tensorrt_rtx is not installed. Running the plans needs a GPU and is not tested here.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from doge_export import trt_build
from doge_export.errors import DogeExportError
from doge_export.lint import errors, lint_static, lint_with_tensorrt

RTX = "tensorrt-rtx"


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not installed")


def _save(tmp_path, name, nodes, inputs, outputs, initializers=()):
    graph = h.make_graph(nodes, name, inputs, outputs, list(initializers))
    path = tmp_path / f"{name}.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def _matmul_softmax(tmp_path):
    """fp16 [batch, 16] @ [16, 8] -> Softmax, batch dynamic."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float16), "w")
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
             h.make_node("Softmax", ["y"], ["probs"], name="softmax", axis=-1)]
    return _save(tmp_path, "mm_softmax", nodes, [h.make_tensor_value_info("x", T.FLOAT16, ["batch", 16])],
                 [h.make_tensor_value_info("probs", T.FLOAT16, ["batch", 8])], [w])


def _int_matmul(tmp_path):
    node = h.make_node("MatMul", ["a", "b"], ["y"], name="int_mm")
    inputs = [h.make_tensor_value_info("a", T.INT64, [2, 3]), h.make_tensor_value_info("b", T.INT64, [3, 2])]
    return _save(tmp_path, "int_mm", [node], inputs, [h.make_tensor_value_info("y", T.INT64, [2, 2])])


def _topk_4000(tmp_path):
    k = nh.from_array(np.array([4000], np.int64), "k")
    node = h.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_big", axis=-1)
    outputs = [h.make_tensor_value_info("values", T.FLOAT, [1, 4000]),
               h.make_tensor_value_info("indices", T.INT64, [1, 4000])]
    return _save(tmp_path, "topk_big", [node], [h.make_tensor_value_info("x", T.FLOAT, [1, 5000])], outputs, [k])


def _step_block(tmp_path, *, causal: bool, q_heads: int = 4, decomposable: bool = False):
    """A decode step: TensorScatter the new K/V row into static caches, then GQA Attention."""
    b, g, s, d = 1, 2, 16, 8
    vi = h.make_tensor_value_info
    attention_inputs = ["q", "present_key", "present_value"] + ([] if causal else ["mask"])
    extra = {"TRT_decomposable": 1} if decomposable else {}
    nodes = [
        h.make_node("TensorScatter", ["past_key", "k_new", "write_pos"], ["present_key"], name="write_k", axis=-2),
        h.make_node("TensorScatter", ["past_value", "v_new", "write_pos"], ["present_value"], name="write_v",
                    axis=-2),
        h.make_node("Attention", attention_inputs, ["y"], name="attn", is_causal=int(causal), **extra),
    ]
    inputs = [vi("q", T.FLOAT16, [b, q_heads, 1, d]), vi("k_new", T.FLOAT16, [b, g, 1, d]),
              vi("v_new", T.FLOAT16, [b, g, 1, d]), vi("past_key", T.FLOAT16, [b, g, s, d]),
              vi("past_value", T.FLOAT16, [b, g, s, d]), vi("write_pos", T.INT64, [b])]
    inputs += [] if causal else [vi("mask", T.BOOL, [b, 1, 1, s])]
    outputs = [vi("y", T.FLOAT16, [b, q_heads, 1, d]), vi("present_key", T.FLOAT16, [b, g, s, d]),
               vi("present_value", T.FLOAT16, [b, g, s, d])]
    graph = h.make_graph(nodes, "step", inputs, outputs)
    path = tmp_path / "step.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 24)]), path)
    return path


@pytest.mark.trt
def test_fp16_graph_with_dynamic_batch_builds_for_sm89(trt, tmp_path):
    cache = tmp_path / "timing.cache"
    result = trt_build.engine_from_onnx(
        _matmul_softmax(tmp_path), flavor=RTX, compute_capability="8.9",
        profiles={"x": ((1, 16), (4, 16), (8, 16))}, timing_cache_path=cache,
    )
    assert isinstance(result.plan, bytes) and len(result.plan) > 1000
    assert (result.flavor, result.trt_version, result.compute_capability) == (RTX, trt.__version__, "8.9")
    assert 0 < result.build_seconds < 60
    assert not cache.exists()  # TensorRT-RTX has no timing cache: the path is ignored, not written


@pytest.mark.trt
def test_parser_error_names_the_node(trt, tmp_path):
    path = _int_matmul(tmp_path)
    with pytest.raises(DogeExportError, match=r"node #0 'int_mm' \(MatMul\): .*INT64"):
        trt_build.engine_from_onnx(path, flavor=RTX)
    [finding] = lint_with_tensorrt(path, flavor=RTX)
    assert (finding.rule, finding.node, finding.op_type) == ("R0-trt-parse", "int_mm", "MatMul")


@pytest.mark.trt
def test_build_error_names_the_node(trt, tmp_path):
    path = _topk_4000(tmp_path)  # parses fine; the builder rejects K > 3840
    with pytest.raises(DogeExportError, match=r"(?s)failed to build .*topk_big.*3840"):
        trt_build.engine_from_onnx(path, flavor=RTX)
    [finding] = lint_with_tensorrt(path, flavor=RTX)
    assert (finding.rule, finding.node, finding.op_type) == ("R0-trt-build", "topk_big", "TopK")
    assert "3840" in finding.message


@pytest.mark.trt
def test_if_branch_rank_mismatch_is_left_to_the_real_builder(trt, tmp_path):
    """Rule 20 of facts/tensorrt.md §9 is not static: the builder names the If node itself."""
    vi = h.make_tensor_value_info
    then = h.make_graph([h.make_node("Identity", ["x"], ["a"])], "then", [], [vi("a", T.FLOAT, [4])])
    other = h.make_graph([h.make_node("Reshape", ["x", "s"], ["b"])], "else", [], [vi("b", T.FLOAT, [2, 2])])
    node = h.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)
    path = _save(tmp_path, "if_ranks", [node], [vi("x", T.FLOAT, [4]), vi("c", T.BOOL, [])],
                 [vi("y", T.FLOAT, None)], [nh.from_array(np.array([2, 2], np.int64), "s")])
    [finding] = lint_with_tensorrt(path, flavor=RTX)
    assert (finding.rule, finding.node, finding.op_type) == ("R0-trt-build", "branch", "If")
    assert "equal ranks" in finding.message


@pytest.mark.trt
@pytest.mark.parametrize("make, node", [(_int_matmul, "int_mm"), (_topk_4000, "topk_big")])
def test_static_lint_agrees_with_the_real_parser(trt, tmp_path, make, node):
    path = make(tmp_path)
    assert node in {f.node for f in errors(lint_static(onnx.load(path)))}
    assert node in {f.node for f in lint_with_tensorrt(path, flavor=RTX)}


@pytest.mark.trt
def test_clean_graph_passes_the_real_parser_with_default_profiles(trt, tmp_path):
    assert lint_with_tensorrt(_matmul_softmax(tmp_path), flavor=RTX) == []


@pytest.mark.trt
def test_bad_options_are_user_errors(trt, tmp_path):
    path = _matmul_softmax(tmp_path)
    with pytest.raises(DogeExportError, match=r"dynamic input 'x' \(-1, 16\) has no profile"):
        trt_build.engine_from_onnx(path, flavor=RTX)
    with pytest.raises(DogeExportError, match=r"axis 1 is fixed at 16"):
        trt_build.engine_from_onnx(path, flavor=RTX, profiles={"x": ((1, 8), (1, 8), (1, 8))})
    with pytest.raises(DogeExportError, match=r"not a TensorRT-RTX .* target: choose one of .*SM89"):
        trt_build.engine_from_onnx(path, flavor=RTX, compute_capability="7.0",
                                   profiles={"x": ((1, 16), (1, 16), (1, 16))})


@pytest.mark.trt
def test_masked_step_graph_passes_both_stages(trt, tmp_path):
    path = _step_block(tmp_path, causal=False)
    assert lint_static(onnx.load(path), step_graph=True) == []
    assert lint_with_tensorrt(path, flavor=RTX) == []


@pytest.mark.trt
def test_causal_step_builds_silently_so_only_the_static_rule_catches_it(trt, tmp_path):
    path = _step_block(tmp_path, causal=True)
    assert lint_with_tensorrt(path, flavor=RTX) == []  # TensorRT accepts it and would mask wrongly
    assert [(f.rule, f.node) for f in errors(lint_static(onnx.load(path), step_graph=True))] == [
        ("R17-attention-causal", "attn")]


@pytest.mark.trt
def test_attention_below_4_query_rows_needs_decomposable(trt, tmp_path):
    """Measured on TensorRT-RTX 1.7.1: no fused kernel for B*H*S_q < 4 (Doge-20M's batch-1 step).

    If a later release builds it, relax lint rule R17-attention-kernel.
    """
    path = _step_block(tmp_path, causal=False, q_heads=2)
    assert [f.rule for f in lint_static(onnx.load(path), step_graph=True)] == ["R17-attention-kernel"]
    [finding] = lint_with_tensorrt(path, flavor=RTX)
    assert "not supported by a dedicated kernel" in finding.message
    assert lint_with_tensorrt(_step_block(tmp_path, causal=False, q_heads=2, decomposable=True), flavor=RTX) == []


def test_missing_tensorrt_names_the_install(monkeypatch):
    def no_module(name):
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(trt_build.importlib, "import_module", no_module)
    with pytest.raises(DogeExportError, match=r"pip install tensorrt-rtx"):
        trt_build.trt_module("tensorrt-rtx")
    with pytest.raises(DogeExportError, match=r"NVIDIA's package index"):
        trt_build.trt_module("tensorrt")
    with pytest.raises(DogeExportError, match=r"unknown TensorRT flavor"):
        trt_build.trt_module("onnxruntime")


def test_enterprise_builds_only_for_the_local_gpu(monkeypatch):
    monkeypatch.setattr(trt_build, "_local_compute_capability", lambda: "8.6")
    with pytest.raises(DogeExportError, match=r"local GPU \(compute capability 8.6\).*tensorrt-rtx"):
        trt_build._target_compute_capability("tensorrt", "8.9")
    assert trt_build._target_compute_capability("tensorrt", "sm86") == "8.6"
    assert trt_build._target_compute_capability("tensorrt-rtx", "8.9") == "8.9"


def test_enterprise_timing_cache_is_loaded_and_saved(tmp_path):
    """Enterprise TensorRT is not installable here; a stand-in config checks the load/save protocol."""

    class Config:
        def create_timing_cache(self, data):
            self.loaded = data
            return b"cache:" + data

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return not ignore_mismatch

        def get_timing_cache(self):
            return type("Cache", (), {"serialize": lambda _: self.cache + b"+new"})()

    path, config = tmp_path / "timing.cache", Config()
    path.write_bytes(b"old")
    assert trt_build._attach_timing_cache(config, path, "tensorrt") == b"cache:old"
    trt_build._save_timing_cache(config, path)
    assert config.loaded == b"old" and path.read_bytes() == b"cache:old+new"
    assert trt_build._attach_timing_cache(config, path, "tensorrt-rtx") is None  # a no-op there
