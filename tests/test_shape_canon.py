"""Shape arithmetic read from the graph inputs (shape_infer.py, shape_canon.py): what is known,
what is rewritten, and that the rewritten graph computes the same at other sizes."""

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from doge_export.ort_offline import optimize_offline
from doge_export.quantize import quantize_model
from doge_export.shape_canon import outputs_agree, shapes_from_inputs
from doge_export.shape_const import constant_operands, remove_dead_nodes
from doge_export.shape_infer import Mono, infer

HIDDEN, HEADS = 16, 4


def _attention_like(layers: int = 3) -> onnx.ModelProto:
    """x [batch, T, 16] -> per layer: MatMul, view(B, T, 4, -1) from Shape(activation), transpose,
    back to [B, T, 16]: the torch exporter's pattern, one Shape chain per layer."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [nh.from_array(np.array([HEADS, -1], np.int64), "heads"),
                              nh.from_array(np.array([0, 1], np.int64), "first_two"),
                              nh.from_array(np.array([-1], np.int64), "flat")], "x"
    for i in range(layers):
        inits.append(nh.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), f"w{i}"))
        nodes += [
            h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            h.make_node("Shape", [f"m{i}"], [f"s{i}"]),
            h.make_node("Gather", [f"s{i}", "first_two"], [f"bt{i}"], axis=0),
            h.make_node("Concat", [f"bt{i}", "heads"], [f"target{i}"], axis=0),
            h.make_node("Reshape", [f"m{i}", f"target{i}"], [f"heads{i}"]),
            h.make_node("Transpose", [f"heads{i}"], [f"t{i}"], perm=[0, 2, 1, 3]),
            h.make_node("Transpose", [f"t{i}"], [f"back{i}"], perm=[0, 2, 1, 3]),
            h.make_node("Concat", [f"bt{i}", "flat"], [f"merge{i}"], axis=0),
            h.make_node("Reshape", [f"back{i}", f"merge{i}"], [f"out{i}"]),
        ]
        prev = f"out{i}"
    x = h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", HIDDEN])
    y = h.make_tensor_value_info(prev, T.FLOAT, ["batch", "seq", HIDDEN])
    graph = h.make_graph(nodes, "attention_like", [x], [y], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_monomials_multiply_and_divide_exactly():
    bt = Mono(1, ("batch",)) * Mono(1, ("seq",))
    assert (bt * Mono(16)).divide(bt * Mono(4)) == Mono(4)
    assert Mono(16, ("seq",)).divide(Mono(1, ("batch",))) is None
    assert Mono(6).divide(Mono(4)) is None
    assert Mono(1, ("seq",)).symbol == "seq" and Mono(2, ("seq",)).symbol is None


def test_shapes_follow_reshape_targets_built_from_shape_values():
    facts = infer(_attention_like())
    batch, seq = Mono(1, ("batch",)), Mono(1, ("seq",))
    assert facts.shape("heads0") == [batch, seq, Mono(HEADS), Mono(HIDDEN // HEADS)]  # -1 inferred
    assert facts.shape("out2") == [batch, seq, Mono(HIDDEN)]
    assert facts.value("target1") == [batch, seq, Mono(HEADS), Mono(-1)]


def test_unknowable_shapes_stay_unknown_and_are_not_rewritten():
    """NonZero's output length depends on the data: its Shape must stay a Shape."""
    nodes = [h.make_node("NonZero", ["x"], ["nz"]), h.make_node("Shape", ["nz"], ["s"]),
             h.make_node("Relu", ["x"], ["rx"]), h.make_node("Shape", ["rx"], ["sx"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n"])],
                         [h.make_tensor_value_info("s", T.INT64, [2]), h.make_tensor_value_info("sx", T.INT64, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    assert infer(model).shape("nz") is None
    # what is copied from or reduced over an unknown is unknown too, never a guess
    more = [h.make_node("Reshape", ["nz", "copy_first"], ["copied"]),
            h.make_node("ReduceSum", ["x", "runtime_axes"], ["reduced"])]
    probe = h.make_model(h.make_graph(
        nodes + more, "g", [h.make_tensor_value_info("x", T.FLOAT, ["n"]), h.make_tensor_value_info("runtime_axes", T.INT64, [1])],
        [h.make_tensor_value_info("copied", T.INT64, None), h.make_tensor_value_info("reduced", T.FLOAT, None)],
        [nh.from_array(np.array([0, -1], np.int64), "copy_first")]), opset_imports=[h.make_opsetid("", 17)])
    assert infer(probe).shape("copied") == [None, None] and infer(probe).shape("reduced") is None
    rewritten, count = shapes_from_inputs(model)
    assert count == 1
    assert [n.op_type for n in rewritten.graph.node if n.output[0] in ("s", "sx")] == ["Shape", "Identity"]


def _feeds(sizes):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((b, t, HIDDEN)).astype(np.float32)} for b, t in sizes]


def test_rewritten_shapes_merge_across_layers_and_compute_the_same():
    model = _attention_like(layers=4)
    rewritten, count = shapes_from_inputs(model)
    assert count == 4
    before, after = optimize_offline(model), optimize_offline(rewritten)
    assert sum(n.op_type == "Shape" for n in after.graph.node) == 1  # one Shape(x), shared
    assert len(after.graph.node) < len(before.graph.node)
    assert outputs_agree(before, after, _feeds([(1, 1), (1, 7), (3, 5), (2, 64)]))
    assert shapes_from_inputs(after)[1] == 0  # done once: the shared Shape reads the input already


def test_outputs_agree_notices_a_different_graph():
    model = _attention_like(layers=2)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = next(t for t in other.graph.initializer if t.name == "w1")
    w.CopyFrom(nh.from_array(nh.to_array(w) * 1.01, "w1"))  # other numbers, same interface
    assert outputs_agree(model, model, _feeds([(1, 3)]))
    assert not outputs_agree(model, other, _feeds([(1, 3)]))


def test_quantized_doge_graphs_have_their_shapes_read_from_the_inputs(artifacts):
    """The export's record: every Shape of the tiny model's graphs is read from the inputs, some
    shape operands are constants, and the saved graphs hold fewer nodes than ONNX Runtime's
    optimizer alone leaves."""
    fp32 = artifacts("tiny", seed=2)[0]
    manifest = artifacts("tiny", seed=2, quantize="int4")[0]
    offline = manifest.data["quantization"]["offline_optimization"]
    record = offline["shapes_from_inputs"]
    for graph in ("prefill", "step"):
        assert offline["constant_operands"][graph] > 0
        saved = onnx.load(str(manifest.graph_file(graph)), load_external_data=False)
        plain = optimize_offline(quantize_model(onnx.load(str(fp32.graph_file(graph))), 4))
        inputs = {v.name for v in plain.graph.input}  # a Shape of an input already reads it
        assert record[graph] == sum(n.op_type == "Shape" and n.input[0] not in inputs for n in plain.graph.node) > 0
        assert len(saved.graph.node) < len(plain.graph.node)


# -- constant shape operands (shape_const.py) --------------------------------------------------

def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_reshape_targets_become_constants_and_their_arithmetic_goes():
    """Each layer's view(B, T, 4, -1) and back: [0, 0, 4, 4] and [0, 0, 16], no shape nodes left."""
    model = optimize_offline(_attention_like(layers=3))
    constant, count = constant_operands(model)
    assert count == 6
    assert not {"Shape", "Gather", "Concat"} & set(_ops(constant))
    targets = {tuple(nh.to_array(t).tolist()) for t in constant.graph.initializer if t.name.startswith("constant_operand")}
    assert targets == {(0, 0, HEADS, HIDDEN // HEADS), (0, 0, HIDDEN)}
    assert outputs_agree(model, constant, _feeds([(1, 1), (1, 7), (3, 5), (2, 64)]))
    assert constant_operands(constant)[1] == 0


def _shape_graph(nodes, inits, outputs) -> onnx.ModelProto:
    x = h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", HIDDEN])
    outs = [h.make_tensor_value_info(name, T.FLOAT, None) for name in outputs]
    return h.make_model(h.make_graph(nodes, "g", [x], outs, [nh.from_array(np.array(v, np.int64), k) for k, v in inits.items()]),
                        opset_imports=[h.make_opsetid("", 17)])


def test_expand_keeps_the_input_dims_as_ones_and_computed_slice_bounds_become_constants():
    """Expand of x[:, None] to [B, 4, T, 16] from Shape(x) -> [1, 4, 1, 16]; a Slice end computed as
    Shape(x)[2] / 2 (16 is static) -> 8."""
    nodes = [h.make_node("Unsqueeze", ["x", "one"], ["xu"]), h.make_node("Shape", ["x"], ["s"]),
             h.make_node("Gather", ["s", "zero"], ["b"], axis=0), h.make_node("Gather", ["s", "one"], ["t"], axis=0),
             h.make_node("Gather", ["s", "two"], ["d"], axis=0),
             h.make_node("Concat", ["b", "four", "t", "d"], ["target"], axis=0),
             h.make_node("Expand", ["xu", "target"], ["expanded"]),
             h.make_node("Div", ["d", "two"], ["half"]),
             h.make_node("Slice", ["x", "zero", "half", "two"], ["sliced"])]
    model = _shape_graph(nodes, {"zero": [0], "one": [1], "two": [2], "four": [4]}, ["expanded", "sliced"])
    constant, count = constant_operands(model)
    assert count == 2
    values = {n.op_type: nh.to_array(next(t for t in constant.graph.initializer if t.name == n.input[i])).tolist()
              for n, i in ((n, 1 if n.op_type == "Expand" else 2) for n in constant.graph.node) if n.op_type in ("Expand", "Slice")}
    assert values == {"Expand": [1, 4, 1, HIDDEN], "Slice": [HIDDEN // 2]}
    assert _ops(constant) == ["Unsqueeze", "Expand", "Slice"]
    assert outputs_agree(model, constant, _feeds([(1, 1), (2, 9)]))


def test_an_unknown_dimension_is_the_one_minus_one_and_two_stay_computed():
    """c = cat(x, x[:, :1]) has T + 1 rows, which a monomial cannot say: flattening it from its
    computed shape is [-1, 16]; a reshape of its transpose back to Shape(c) moves two unknowns
    (T + 1 and B) and stays computed."""
    nodes = [h.make_node("Slice", ["x", "zero", "one", "one"], ["first"]),
             h.make_node("Concat", ["x", "first"], ["c"], axis=1),
             h.make_node("Shape", ["c"], ["s"]), h.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             h.make_node("Gather", ["s", "one"], ["t"], axis=0), h.make_node("Mul", ["b", "t"], ["bt"]),
             h.make_node("Concat", ["bt", "width"], ["flat_target"], axis=0),
             h.make_node("Reshape", ["c", "flat_target"], ["flat"]),
             h.make_node("Transpose", ["c"], ["ct"], perm=[1, 0, 2]),
             h.make_node("Reshape", ["ct", "s"], ["back"])]
    model = _shape_graph(nodes, {"one": [1], "zero": [0], "width": [HIDDEN]}, ["flat", "back"])
    constant, count = constant_operands(model)
    targets = {n.output[0]: n.input[1] for n in constant.graph.node if n.op_type == "Reshape"}
    initial = {t.name: nh.to_array(t).tolist() for t in constant.graph.initializer}
    assert count == 1 and initial[targets["flat"]] == [-1, HIDDEN]
    assert targets["back"] == "s"
    assert outputs_agree(model, constant, _feeds([(1, 1), (3, 5)]))


def test_dead_nodes_go_but_graph_outputs_and_what_they_read_stay():
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Neg", ["r"], ["unused"]),
             h.make_node("Abs", ["unused"], ["unused2"]), h.make_node("Sigmoid", ["r"], ["y"])]
    model = _shape_graph(nodes, {}, ["y"])
    assert remove_dead_nodes(model) == 2 and _ops(model) == ["Relu", "Sigmoid"]
