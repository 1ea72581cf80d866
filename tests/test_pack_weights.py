"""onnxruntime-packed (OrtRunner(pack_weights=True)): the step session prepacks fp32 weights at
batch 1 too; the results are the default runner's, within summation-order rounding, and
transformers' within the validation tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from doge_export.backends.ort import OrtRunner
from doge_export.backends.torch import TorchRunner
from doge_export.errors import DogeExportError
from doge_export.runtime import open_runner
from doge_export.validate import ValidateConfig, failures, validate_runner

from conftest import run_cli


def prepacks(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # the entry is not set: ONNX Runtime's default, prepacking on
        return True


def _greedy(runner, ids, steps=8):
    B, T = ids.shape
    logits = [runner.prefill(ids, np.ones_like(ids), np.tile(np.arange(T), (B, 1)))]
    for p in range(T, T + steps):
        logits.append(runner.step(logits[-1].argmax(-1)[:, None], np.full((B, 1), p)))
    return np.stack(logits)


def test_packed_runner_prepacks_the_step_at_batch_1_and_agrees(artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    ids = np.random.default_rng(3).integers(3, manifest.info.vocab_size, (1, 12))
    with open_runner(manifest, "onnxruntime-packed") as packed, OrtRunner(manifest) as plain:
        assert packed.name == "onnxruntime-packed" and plain.name == "onnxruntime"
        assert prepacks(packed.step_session) and not prepacks(plain.step_session)
        assert not prepacks(packed.prefill_session)  # the prefill keeps one copy of the weights
        got, want = _greedy(packed, ids), _greedy(plain, ids)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_from_batch_2_packed_is_the_default_runner(artifacts):
    """Every runner prepacks from batch 2 on, and takes the rows layout from min_batch on."""
    manifest = artifacts("tiny", seed=1)[0]
    ids = np.random.default_rng(4).integers(3, manifest.info.vocab_size, (8, 5))
    with OrtRunner(manifest, pack_weights=True) as packed, OrtRunner(manifest) as plain:
        for batch, rows in ((2, False), (8, True)):
            got, want = _greedy(packed, ids[:batch], steps=2), _greedy(plain, ids[:batch], steps=2)
            assert prepacks(packed.step_session) and prepacks(plain.step_session)
            assert packed.lm_rows == plain.lm_rows == rows
            np.testing.assert_array_equal(got, want)


def test_packed_runner_passes_validation_against_transformers(artifacts):
    manifest, loaded = artifacts("tiny-moe", seed=2)
    ties = []  # CDMoE routing ties the reference logs (validate: legitimate divergences)
    reference = TorchRunner(loaded.model, manifest.info, stable_topk=True, tie_log=ties)
    with open_runner(manifest, "onnxruntime-packed") as runner:
        report = validate_runner(runner, reference, ValidateConfig(prompt_lengths=((5,), (9, 3, 6))),
                                 log=lambda *a: None, tie_log=ties)
    assert report["backend"] == "onnxruntime-packed"
    assert report["passed"], failures(report)


def test_bench_skips_packed_for_quantized_weights(artifacts, tmp_path):
    manifest = artifacts("tiny", seed=2, quantize="int8")[0]
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(manifest.folder), "--backends", "onnxruntime,onnxruntime-packed", "--prompt-len", "4",
                     "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    backends = json.loads(out.read_text())["backends"]
    assert backends["onnxruntime"]["status"] == "ok"
    assert backends["onnxruntime-packed"]["status"] == "skipped"
    assert "already runs them packed" in backends["onnxruntime-packed"]["reason"]


def test_bench_skips_packed_from_batch_2(artifacts, tmp_path):
    """From batch 2 on the onnxruntime row runs the same packed sessions: no duplicate row."""
    manifest = artifacts("tiny", seed=1)[0]
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(manifest.folder), "--backends", "onnxruntime,onnxruntime-packed", "--batch", "2",
                     "--prompt-len", "4", "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    backends = json.loads(out.read_text())["backends"]
    assert backends["onnxruntime"]["status"] == "ok"
    assert backends["onnxruntime-packed"]["status"] == "skipped"
    assert "at batch 2" in backends["onnxruntime-packed"]["reason"]


def test_unknown_layout_is_still_refused_with_packing(artifacts):
    with pytest.raises(DogeExportError, match="lm_layout"):
        OrtRunner(artifacts("tiny", seed=1)[0], pack_weights=True, lm_layout="diagonal")
