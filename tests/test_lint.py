"""lint_static: planted TensorRT-incompatible graphs fail with the node named; a clean graph passes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from doge_export.lint import Finding, errors, lint_static


def _model(nodes, inputs, outputs, initializers=(), opset=23):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def _errors_at(findings: list[Finding], node: str) -> list[Finding]:
    return [f for f in errors(findings) if f.node == node]


def _attention_step_model(is_causal: int, q_heads: int = 4) -> onnx.ModelProto:
    # one query [B=1, H, 1, D=8] against a static cache of 16 keys on 2 KV heads
    q = h.make_tensor_value_info("q", T.FLOAT16, [1, q_heads, 1, 8])
    k = h.make_tensor_value_info("k", T.FLOAT16, [1, 2, 16, 8])
    v = h.make_tensor_value_info("v", T.FLOAT16, [1, 2, 16, 8])
    y = h.make_tensor_value_info("y", T.FLOAT16, [1, q_heads, 1, 8])
    node = h.make_node("Attention", ["q", "k", "v"], ["y"], name="attn_step", is_causal=is_causal)
    return _model([node], [q, k, v], [y])


def test_causal_attention_in_step_graph_is_an_error():
    findings = lint_static(_attention_step_model(is_causal=1), step_graph=True)
    [hit] = _errors_at(findings, "attn_step")
    assert hit.rule == "R17-attention-causal" and hit.op_type == "Attention"
    assert "upper-left" in hit.message.lower() and "attn_mask" in hit.message


def test_causal_attention_outside_step_graph_warns_when_lengths_differ():
    findings = lint_static(_attention_step_model(is_causal=1))
    assert not errors(findings)
    assert [f.rule for f in findings if f.node == "attn_step"] == ["R17-attention-causal"]
    assert not lint_static(_attention_step_model(is_causal=0), step_graph=True)


def test_attention_with_fewer_than_4_query_rows_warns():
    """Doge-20M's batch-1 step (2 query heads, 1 token) has no fused TensorRT-RTX kernel."""
    [hit] = lint_static(_attention_step_model(is_causal=0, q_heads=2), step_graph=True)
    assert (hit.severity, hit.rule, hit.node) == ("warning", "R17-attention-kernel", "attn_step")
    assert "TRT_decomposable=1" in hit.message


def test_topk_k_above_3840_is_an_error():
    k = nh.from_array(np.array([4000], np.int64), "k")
    node = h.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_big", axis=-1)
    model = _model(
        [node],
        [h.make_tensor_value_info("x", T.FLOAT, [1, 5000])],
        [h.make_tensor_value_info("values", T.FLOAT, [1, 4000]),
         h.make_tensor_value_info("indices", T.INT64, [1, 4000])],
        [k],
    )
    [hit] = _errors_at(lint_static(model), "topk_big")
    assert hit.rule == "R15-topk" and "4000" in hit.message and "3840" in hit.message


def test_int64_matmul_is_an_error():
    node = h.make_node("MatMul", ["a", "b"], ["y"], name="int_mm")
    model = _model(
        [node],
        [h.make_tensor_value_info("a", T.INT64, [2, 3]), h.make_tensor_value_info("b", T.INT64, [3, 2])],
        [h.make_tensor_value_info("y", T.INT64, [2, 2])],
    )
    hits = _errors_at(lint_static(model), "int_mm")
    assert {f.rule for f in hits} == {"R9-matmul-dtype"} and len(hits) == 2  # both operands
    assert "INT64" in hits[0].message and "Cast" in hits[0].message


def test_input_without_shape_is_an_error():
    shapeless = h.make_tensor_value_info("x", T.FLOAT, None)
    node = h.make_node("Relu", ["x"], ["y"], name="relu")
    model = _model([node], [shapeless], [h.make_tensor_value_info("y", T.FLOAT, None)])
    [hit] = _errors_at(lint_static(model), "x")
    assert hit.rule == "R5-input-shape" and hit.op_type == "graph input" and "scalar" in hit.message


def test_step_graph_needs_static_inputs_and_fixed_shape_ops():
    x = h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])
    node = h.make_node("NonZero", ["x"], ["nz"], name="nonzero")
    model = _model([node], [x], [h.make_tensor_value_info("nz", T.INT64, [2, None])])
    assert {(f.node, f.rule) for f in errors(lint_static(model, step_graph=True))} == {
        ("x", "R21-step-static"), ("nonzero", "R21-data-dependent")}
    assert not errors(lint_static(model))  # the same graph is fine as a prefill


@pytest.mark.parametrize(
    "node, rule",
    [
        (h.make_node("Unique", ["x"], ["y"], name="n"), "R3-unsupported-op"),
        (h.make_node("FusedMatMul", ["x", "x"], ["y"], name="n", domain="com.microsoft"), "R2-domain"),
        (h.make_node("Cast", ["x"], ["y"], name="n", to=T.FLOAT8E4M3FN), "R11-cast-target"),
        (h.make_node("LayerNormalization", ["x", "x"], ["y", "mean", "inv"], name="n"), "R16-layernorm-outputs"),
        (h.make_node("ReduceMean", ["x", "x_axes"], ["y"], name="n"), "R14-constant-operand"),
        (h.make_node("Not", ["x"], ["y"], name="n"), "R12-bool-logic"),
    ],
)
def test_other_planted_errors_name_the_node(node, rule):
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [4, 4]), h.make_tensor_value_info("x_axes", T.INT64, [1])]
    model = _model([node], inputs, [h.make_tensor_value_info("y", T.FLOAT, None)])
    assert rule in {f.rule for f in _errors_at(lint_static(model), "n")}


def test_clean_fp16_decoder_block_passes():
    """RMSNorm chain (constant axes) -> MatMul -> Softmax -> TopK(50), all fp16 with fp32 islands."""
    w = nh.from_array(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float16), "w")
    axes = nh.from_array(np.array([-1], np.int64), "axes")
    k = nh.from_array(np.array([5], np.int64), "k")
    nodes = [
        h.make_node("Cast", ["x"], ["x32"], name="to_fp32", to=T.FLOAT),
        h.make_node("Mul", ["x32", "x32"], ["sq"], name="square"),
        h.make_node("ReduceMean", ["sq", "axes"], ["var"], name="variance"),
        h.make_node("Sqrt", ["var"], ["rms"], name="rms"),
        h.make_node("Div", ["x32", "rms"], ["normed32"], name="normalize"),
        h.make_node("Cast", ["normed32"], ["normed"], name="to_fp16", to=T.FLOAT16),
        h.make_node("MatMul", ["normed", "w"], ["logits"], name="lm_head"),
        h.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
        h.make_node("TopK", ["probs", "k"], ["top_p", "top_i"], name="topk", axis=-1),
    ]
    model = _model(
        nodes,
        [h.make_tensor_value_info("x", T.FLOAT16, ["batch", 16])],
        [h.make_tensor_value_info("top_p", T.FLOAT16, ["batch", 5]),
         h.make_tensor_value_info("top_i", T.INT64, ["batch", 5])],
        [w, axes, k],
    )
    onnx.checker.check_model(model, full_check=True)
    assert lint_static(model) == []
