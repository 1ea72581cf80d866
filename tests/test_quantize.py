"""`doge-export onnx --quantize int8|int4`: what is quantized, the shared tied matrix, the quality
record, and that a quantized artifact is never used for parity checks."""

import json
import mmap
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from conftest import (assert_gathered_rows_handed_back, assert_user_error, gathered_pages, mapped_regions, mapped_resident_kib, run_cli,
                      saved_by_a_future_onnxruntime)
from doge_export.backends.ort import MappedWeights, OrtRunner
from doge_export.errors import DogeExportError
from doge_export.export_onnx import ExportConfig
from doge_export.generate import GenerateConfig, generate
from doge_export.manifest import load_manifest
from doge_export.ort_offline import optimize_offline
from doge_export.quantize import quantize_model

K, N = 64, 512


def _tied_graph() -> onnx.ModelProto:
    """The wrappers' tied layout: W [hidden, vocab] feeds a Gather on axis 1 and the lm_head MatMul."""
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    nodes = [h.make_node("Gather", ["W", "ids"], ["cols"], name="embed", axis=1),
             h.make_node("Transpose", ["cols"], ["rows"], name="rows", perm=[1, 0]),
             h.make_node("MatMul", ["x", "W"], ["logits"], name="lm_head")]
    inputs = [h.make_tensor_value_info("ids", T.INT64, ["n"]), h.make_tensor_value_info("x", T.FLOAT, ["m", K])]
    outputs = [h.make_tensor_value_info("rows", T.FLOAT, ["n", K]), h.make_tensor_value_info("logits", T.FLOAT, ["m", N])]
    graph = h.make_graph(nodes, "tied", inputs, outputs, [nh.from_array(w, "W")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_matrix_is_stored_once_and_gathered_from_the_packed_bytes(bits):
    model = _tied_graph()
    w = nh.to_array(model.graph.initializer[0])
    quantized = quantize_model(model, bits, accuracy_level=0)  # fp32 activations: exact read-back
    ops = [n.op_type for n in quantized.graph.node]
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "Gather" not in ops
    assert "W" not in {t.name for t in quantized.graph.initializer}  # no fp32 copy left
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, N - 1, 100])
    # the identity as input reads back the dequantized matrix that MatMulNBits multiplies
    rows, dequantized = session.run(None, {"ids": ids, "x": np.eye(K, dtype=np.float32)})
    np.testing.assert_array_equal(rows, dequantized[:, ids].T)  # the same bytes, the same values
    step = np.abs(w).max() / (127 if bits == 8 else 7)
    assert np.abs(dequantized - w).max() <= step  # and they are a rounding of the fp32 matrix


def test_quantize_options_are_checked():
    with pytest.raises(DogeExportError, match="int3"):
        ExportConfig(quantize="int3")
    with pytest.raises(DogeExportError, match="fp32"):
        ExportConfig(quantize="int8", dtype="float16")
    with pytest.raises(DogeExportError, match="quant-block"):
        ExportConfig(quantize="int4", quant_block=48)
    with pytest.raises(DogeExportError, match="add --quantize"):
        ExportConfig(quant_block=64)


def test_quant_block_sets_every_block_and_is_recorded(artifacts):
    """--quant-block 64: MatMulNBits and the tied embedding's GatherBlockQuantized both read 64-wide
    blocks (the same packed bytes), the manifest says so, and the artifact generates."""
    manifest, _ = artifacts("tiny", seed=2, quantize="int4", quant_block=64)
    assert manifest.data["quantization"]["block_size"] == 64
    for graph in ("prefill", "step"):
        nodes = onnx.load(str(manifest.graph_file(graph)), load_external_data=False).graph.node
        blocks = {onnx.helper.get_attribute_value(a) for n in nodes if n.domain == "com.microsoft"
                  for a in n.attribute if a.name == "block_size"}
        assert blocks == {64}, (graph, blocks)
    with OrtRunner(manifest) as runner:
        tokens = generate(runner, [[5, 6, 7]], GenerateConfig(max_new_tokens=4, stop_ids=())).tokens
    assert len(tokens[0]) == 4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_artifact_records_quality_and_runs(artifacts, mode):
    manifest, _ = artifacts("tiny", seed=2, quantize=mode)
    quant = manifest.data["quantization"]
    assert quant["mode"] == mode and "lm_weight_t" in quant["quantized"]
    assert quant["weights_bytes"] < quant["weights_bytes_fp32"]
    quality = quant["quality"]
    assert quality["steps"] > 200 and 0 <= quality["top1_agreement"] <= 1
    assert quality["max_abs_dlogit"] > 0  # quantized: never bit-equal, and never called exact
    assert json.loads((manifest.folder / "doge_export.json").read_text())["quantization"] == quant
    with OrtRunner(manifest) as runner:
        tokens = generate(runner, [[5, 6, 7]], GenerateConfig(max_new_tokens=8, stop_ids=())).tokens
    assert len(tokens[0]) == 8


def test_quantized_weights_are_mapped_and_handed_back_once_the_sessions_are_built(artifacts):
    """Both sessions prepack quantized weights, so the runner maps weights.bin and releases the
    mapped pages once they are built: none stay resident until a kernel reads them again, and
    what is read again (the embedding rows) faults back in with the same bytes."""
    manifest, _ = artifacts("tiny", seed=2, quantize="int4")
    path = manifest.path(manifest.data["weights"]["file"])
    config = GenerateConfig(max_new_tokens=12, stop_ids=())
    with OrtRunner(manifest) as runner:
        assert mapped_resident_kib(path) == 0
        first = generate(runner, [[5, 6, 7], [9, 10, 11]], config).tokens
        assert 0 < mapped_resident_kib(path) <= path.stat().st_size // 1024 + 4
        runner._mapped.release()
        assert mapped_resident_kib(path) == 0
        again = generate(runner, [[5, 6, 7], [9, 10, 11]], config).tokens
    assert again == first
    with OrtRunner(manifest) as runner:
        assert_gathered_rows_handed_back(lambda n: generate(runner, [[5, 6, 7]], GenerateConfig(max_new_tokens=n, stop_ids=())), manifest)
    fp32 = artifacts("tiny", seed=2)[0]
    with OrtRunner(fp32) as runner:  # fp32 weights: read into memory (their unpacked kernels stream them)
        assert mapped_resident_kib(fp32.path(fp32.data["weights"]["file"])) is None


def test_the_quantized_graphs_are_saved_optimized_and_compute_the_same(artifacts):
    """ONNX Runtime's optimizer runs at export (level extended): far fewer nodes for a session to
    hold, the same inputs and outputs, and the same numbers as the graph it was given."""
    fp32 = artifacts("tiny", seed=2)[0]
    assert artifacts("tiny", seed=2, quantize="int4")[0].data["quantization"]["offline_optimization"]["level"] == "extended"
    quantized = quantize_model(onnx.load(str(fp32.graph_file("prefill"))), 4)
    optimized = optimize_offline(quantized)
    assert len(optimized.graph.node) < 0.7 * len(quantized.graph.node)
    assert {n.op_type for n in optimized.graph.node} >= {"MatMulNBits", "GatherBlockQuantized", "SimplifiedLayerNormalization"}
    ids = np.random.default_rng(0).integers(3, fp32.info.vocab_size, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(9), (2, 1))}
    given, saved = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
                    for m in (quantized, optimized))
    for a, b in zip(given, saved):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_gathered_tensors_are_mapped_a_page_per_region(artifacts, tmp_path):
    """The tensors read a row at a time (the manifest's `gathered`) are mapped one page per
    region, so a read brings back its own page, not the 16 of Linux's fault-around."""
    manifest = artifacts("tiny", seed=2, quantize="int4")[0]
    gathered = {t["name"] for t in manifest.data["weights"]["tensors"] if t.get("gathered")}
    assert {"lm_weight_t_Q4", "lm_weight_t_scales_gather"} <= gathered  # the embedding reads the packed bytes
    with OrtRunner(manifest) as runner:
        assert len(mapped_regions(manifest.path("weights.bin"))) >= gathered_pages(manifest) > 0
        assert generate(runner, [[5, 6, 7]], GenerateConfig(max_new_tokens=4, stop_ids=())).tokens
    page = mmap.PAGESIZE
    path = tmp_path / "rows.bin"
    path.write_bytes(bytes(64 * page))
    mapped = MappedWeights(path, [{"offset": 0, "length": 64 * page}])
    int(mapped.array[10 * page + 100])  # one row
    resident = [kib for *_, kib in mapped_regions(path) if kib]
    assert resident == [page // 1024]  # unsplit, fault-around mapped the cached pages around it too
    # a one-page table between others: cut off from both neighbours
    mapped = MappedWeights(path, [{"offset": 20 * page, "length": page}])
    assert [(offset // page, size // page) for offset, size, _ in mapped_regions(path)
            if offset // page == 20 and size == page]


@pytest.mark.parametrize("quantize", ["int4", None])
def test_a_truncated_weights_file_is_a_clear_error_mapped_or_read(artifacts, tmp_path, quantize):
    """Without the manifest's checksums (verify=False) the runner still checks each tensor lies
    inside weights.bin, whether it maps the file (quantized) or reads it (fp32)."""
    source = artifacts("tiny", seed=2, **({"quantize": quantize} if quantize else {}))[0].folder
    folder = tmp_path / "artifact"
    shutil.copytree(source, folder)
    weights = folder / "weights.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DogeExportError, match="shorter than its manifest says"):
        OrtRunner(load_manifest(folder, verify=False))


def test_quantized_artifact_refuses_parity_validation(artifacts):
    manifest, _ = artifacts("tiny", seed=2, quantize="int8")
    assert_user_error(run_cli("validate", str(manifest.folder)), "never checked for parity", "top-1 agreement")
    shown = run_cli("inspect", str(manifest.folder))  # inspect names the quantization and its quality
    q = manifest.data["quantization"]["quality"]
    assert shown.returncode == 0 and f"int8 (block 32), top-1 agreement {q['top1_agreement']:.1%}" in shown.stdout
    as_json = json.loads(run_cli("inspect", str(manifest.folder), "--json").stdout)
    assert as_json["quantization"]["mode"] == "int8" and as_json["quantization"]["steps"] == q["steps"]


def test_quantized_artifact_refuses_a_tensorrt_build(artifacts):
    """One clear error instead of a lint report per MatMulNBits and fusion; nothing written."""
    manifest, _ = artifacts("tiny", seed=2, quantize="int4")
    before = sorted(p.name for p in manifest.folder.iterdir())
    assert_user_error(run_cli("trt", str(manifest.folder)), "int4 weights", "without --quantize")
    assert sorted(p.name for p in manifest.folder.iterdir()) == before


def test_graphs_saved_by_a_newer_onnxruntime_are_a_clear_error(artifacts, tmp_path):
    source = artifacts("tiny", seed=2, quantize="int4")[0].folder
    folder = saved_by_a_future_onnxruntime(source, tmp_path / "future")
    with pytest.raises(DogeExportError, match=r"onnxruntime 99\.0\.0 saved optimized.*install onnxruntime>=99\.0\.0"):
        OrtRunner(load_manifest(folder, verify=False))
