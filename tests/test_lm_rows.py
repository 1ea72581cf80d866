"""The rows-layout graphs (lm_rows.py, backends/ort_rows.py): the tied matrix read as an input
[vocab, hidden], the same results as the default graphs, chosen by batch size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from doge_export.backends.ort import OrtRunner, shared_initializers
from doge_export.backends.ort_rows import COLUMNS, ROWS, read_rows
from doge_export.errors import DogeExportError
from doge_export.lm_rows import rewrite_for_rows


def _graph_reads(path) -> tuple[set, set, dict]:
    graph = onnx.load(str(path), load_external_data=False).graph
    read = {name for node in graph.node for name in node.input}
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return read, {t.name for t in graph.initializer}, inputs


def test_rows_graphs_read_the_tied_matrix_as_an_input(artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    entry = manifest.data["lm_rows"]
    info = manifest.info
    hidden = next(t for t in manifest.data["weights"]["tensors"] if t["name"] == COLUMNS)["shape"][0]
    assert entry["input"]["shape"] == [info.vocab_size, hidden] and entry["min_batch"] == 8
    for graph, name in entry["graphs"].items():
        assert name in manifest.data["files"]  # checksummed like the default graphs
        read, initializers, inputs = _graph_reads(manifest.path(name))
        assert COLUMNS not in read and COLUMNS not in initializers, graph
        assert ROWS in read and inputs[ROWS] == [info.vocab_size, hidden], graph
        default_read, _, default_inputs = _graph_reads(manifest.graph_file(graph))
        assert COLUMNS in default_read and ROWS not in default_inputs


def _decode(runner, ids, mask, steps=6):
    B, T = ids.shape
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits = [runner.prefill(ids, mask, positions)]
    for p in range(T, T + steps):
        logits.append(runner.step(logits[-1].argmax(-1)[:, None], np.full((B, 1), p)))
    return np.stack(logits), runner.state.full_arrays()


def test_rows_layout_gives_the_logits_and_state_of_the_default_layout(artifacts):
    """Batch 3, left-padded: the same greedy tokens, logits within 1e-5 and the same state."""
    manifest = artifacts("tiny", seed=1)[0]
    rng = np.random.default_rng(5)
    ids = rng.integers(3, manifest.info.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    with OrtRunner(manifest, batch=3, lm_layout="rows") as rows, OrtRunner(manifest, batch=3, lm_layout="columns") as cols:
        (got, got_state), (want, want_state) = _decode(rows, ids, mask), _decode(cols, ids, mask)
        assert rows.lm_rows and not cols.lm_rows
        assert ROWS not in rows._weights and COLUMNS not in rows._weights  # one copy: the input
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for name, array in want_state.items():
        np.testing.assert_allclose(got_state[name], array, rtol=0, atol=1e-5, err_msg=name)


def test_the_runner_takes_the_rows_graphs_from_min_batch_on(artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    ids = np.random.default_rng(0).integers(3, manifest.info.vocab_size, (8, 4))
    with OrtRunner(manifest) as runner:
        for batch, rows in ((1, False), (8, True), (7, False)):
            _decode(runner, ids[:batch], np.ones_like(ids[:batch]), steps=2)
            assert (runner.session_batch, runner.lm_rows) == (batch, rows)


def test_artifacts_without_a_float32_tied_matrix_have_no_rows_graphs(artifacts):
    manifest = artifacts("tiny", seed=2, quantize="int4")[0]
    assert manifest.data["lm_rows"] is None
    assert not any(".rows." in name for name in manifest.data["files"])
    with pytest.raises(DogeExportError, match="has no rows-layout graphs"):
        OrtRunner(manifest, lm_layout="rows")
    with OrtRunner(manifest, batch=8) as runner:  # auto: the default graphs
        assert not runner.lm_rows


def test_full_logits_artifacts_have_no_rows_graphs(artifacts):
    """Their prefill's lm_head is [B,T,H] x [H,V]: not the two-dimensional pattern of the rewrite."""
    manifest = artifacts("tiny", seed=1, full_logits=True)[0]
    assert manifest.data["lm_rows"] is None and manifest.info.full_logits
    assert not any(".rows." in name for name in manifest.data["files"])


def test_a_tied_matrix_read_another_way_is_not_rewritten(artifacts):
    model = onnx.load(str(artifacts("tiny", seed=1)[0].graph_file("step")), load_external_data=False)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == COLUMNS)
    gather.attribute[0].i = 0  # a Gather on the other axis: no pattern of the rewrite
    before = model.SerializeToString()
    assert rewrite_for_rows(model) is False
    assert model.SerializeToString() == before


def test_read_rows_transposes_in_chunks(tmp_path):
    columns = np.arange(40 * 7, dtype=np.float32).reshape(40, 7)  # 40 rows: chunks of 16, 16, 8
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 12 + columns.tobytes())
    rows = read_rows(path, {"shape": [40, 7], "offset": 12})
    assert rows.shape == (7, 40) and not rows.flags.writeable
    np.testing.assert_array_equal(rows, columns.T)


def test_weights_left_out_are_never_read(artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    values = shared_initializers(manifest, without=COLUMNS)
    every = shared_initializers(manifest)
    assert set(every) - set(values) == {COLUMNS}
    for name, value in values.items():
        np.testing.assert_array_equal(value.numpy(), every[name].numpy(), err_msg=name)


def test_an_artifact_from_before_the_rows_graphs_runs_the_default_graphs(artifacts):
    import copy

    from doge_export.manifest import Manifest

    manifest = artifacts("tiny", seed=1)[0]
    data = copy.deepcopy(manifest.data)
    del data["lm_rows"]  # exported before 2026-12-02
    old = Manifest(manifest.folder, data)
    ids = np.random.default_rng(0).integers(3, old.info.vocab_size, (8, 4))
    with OrtRunner(old, batch=8) as runner:
        _decode(runner, ids, np.ones_like(ids), steps=2)
        assert not runner.lm_rows
