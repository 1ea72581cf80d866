"""The artifact folder and its manifest: contents, checksums, atomic writes (DESIGN §4)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from doge_export import spec
from doge_export.errors import DogeExportError
from doge_export.manifest import MANIFEST_NAME, load_manifest
from doge_export.onnx_weights import INLINE_LIMIT
from doge_export.rope import RotaryFromPositions


def test_manifest_describes_everything_a_runtime_needs(artifacts):
    manifest, loaded = artifacts("tiny-moe")
    d = manifest.data
    assert d["schema"] == "doge-export/artifact" and d["schema_version"] == 1
    assert d["source"]["generation"] == "native" and d["config"]["is_moe"] is True
    assert set(d["files"]) == {"prefill.onnx", "step.onnx", "weights.bin", "prefill.rows.onnx", "step.rows.onnx"}
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in d["files"].values())
    assert d["state"]["capacity"] == manifest.info.capacity == 16
    assert "latest position" in d["state"]["eviction_rule"]
    assert "left" in d["conventions"]["padding"] and "cumsum" in d["conventions"]["position_ids"]
    info = manifest.info
    for graph, io in spec.graph_specs(info).items():
        assert d["graphs"][graph]["inputs"] == spec.spec_to_json(io["inputs"])
        assert d["graphs"][graph]["outputs"] == spec.spec_to_json(io["outputs"])


def test_graph_io_matches_the_spec_exactly(artifacts):
    manifest, _ = artifacts("tiny")
    info = manifest.info
    for graph, io in spec.graph_specs(info).items():
        model = onnx.load(str(manifest.graph_file(graph)), load_external_data=False)
        got = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
               for v in list(model.graph.input) + list(model.graph.output)]
        assert got == [(s.name, list(s.shape)) for s in io["inputs"] + io["outputs"]]


def test_both_graphs_share_one_weights_file_without_duplicates(artifacts):
    manifest, loaded = artifacts("doge-20m", seed=2)
    params = sum(p.numel() for p in loaded.model.parameters())  # tied: the embedding counted once
    vocab = loaded.config.vocab_size
    weights = manifest.path("weights.bin").stat().st_size
    rope = RotaryFromPositions(loaded.config, manifest.info.max_context).inv_freq_table
    # the lm_head/embedding is stored once; the only extras are layer 0's per-token bias table
    # and the dynamic-RoPE inverse-frequency table (a Constant of the exported graphs)
    assert rope.shape[0] > 1000  # Doge-20M's RoPE is dynamic: one row per seq_len up to max_context
    assert weights <= (params + vocab * loaded.config.num_key_value_heads + rope.numel()) * 4 + 64 * 200
    locations, external = set(), {}
    for graph in ("prefill", "step"):
        model = onnx.load(str(manifest.graph_file(graph)), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locations.add({e.key: e.value for e in t.external_data}["location"])
                external.setdefault(graph, set()).add((t.name, tuple(t.dims)))
        # no tensor of a KiB or more stays inside a graph, where each session would hold its own copy
        assert not [n.output[0] for n in model.graph.node if n.op_type == "Constant"
                    and len(onnx.numpy_helper.to_array(n.attribute[0].t).tobytes()) >= INLINE_LIMIT]
    assert locations == {"weights.bin"}
    table = [name for name, dims in external["step"] & external["prefill"] if dims == tuple(rope.shape)]
    assert len(table) == 1  # one region of weights.bin, shared by both graphs
    assert sum(1 for _ in manifest.data["weights"]["tensors"]) >= loaded.config.num_hidden_layers


def test_validation_results_are_recorded(tmp_path):
    from doge_export.commands import run_export

    run_export("random:tiny", tmp_path / "v", seed=0, overrides=[], max_context=None, max_prompt=None,
               full_logits=False, exporter="torchscript", tokenizer=None, allow_pickle=False, force=False,
               validate=True, log=lambda *a: None)
    validation = json.loads((tmp_path / "v" / MANIFEST_NAME).read_text())["validation"]
    assert set(validation) == {"onnxruntime", "onnxruntime-rows"}  # the rows-layout graphs too
    for report in validation.values():
        assert report["passed"] and len(report["cases"]) == 3
        assert all(c["max_abs_diff"] <= 1e-4 for case in report["cases"] for c in case["checks"])


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from doge_export import artifact
    from doge_export.export_onnx import ExportConfig
    from doge_export.model import load_model

    def explode(manifest):
        raise DogeExportError("validation failed on purpose")

    with pytest.raises(DogeExportError, match="on purpose"):
        artifact.export_artifact(load_model("random:tiny"), tmp_path / "x", ExportConfig(), validate=explode,
                                 log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from doge_export import artifact
    from doge_export.export_onnx import ExportConfig
    from doge_export.model import load_model

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "copy_tokenizer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        artifact.export_artifact(load_model("random:tiny"), tmp_path / "x", ExportConfig(), log=lambda *a: None)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_and_bad_json(tmp_path, artifacts):
    manifest, _ = artifacts("tiny")
    art = tmp_path / "a"
    shutil.copytree(manifest.folder, art)
    (art / "step.onnx").unlink()
    with pytest.raises(DogeExportError, match="step.onnx is missing"):
        load_manifest(art)
    (art / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DogeExportError, match="not valid JSON"):
        load_manifest(art)
    with pytest.raises(DogeExportError, match="no doge_export.json"):
        load_manifest(tmp_path)
