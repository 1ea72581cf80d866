"""benchmarks/gpu_check.py on a machine without a GPU: it refuses loudly, and its measuring helpers
work on any runner. The GPU flow itself (engines for the local GPU, CUDA graphs) needs a GPU."""

import importlib.util
from pathlib import Path

import pytest

from doge_export.artifact import export_artifact
from doge_export.backends.ort import OrtRunner
from doge_export.export_onnx import ExportConfig
from doge_export.model import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_artifact(load_model("random:tiny"), tmp_path_factory.mktemp("gc") / "a", ExportConfig(),
                           log=lambda *a: None)


def test_without_a_gpu_it_fails_loudly(gpu_check, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--work", "/tmp/doge_gpu_check_test"])
    assert stop.value.code == 1 and "GPU CHECK FAILED: torch sees no CUDA GPU" in capsys.readouterr().err


def test_decode_latency_and_flatness_on_any_runner(gpu_check, tiny):
    with OrtRunner(tiny) as runner:
        result = gpu_check.decode_latency(runner, prompt_len=16, new_tokens=12, vocab=tiny.info.vocab_size)
        flat = gpu_check.flatness(runner, tiny.info, flat_to=240)
    assert result["steps"] == 12 and result["step_ms_median"] > 0 and result["tokens_per_s"] > 0
    assert flat["positions"][0] == 100 and flat["late_over_early"] > 0 and flat["keep_window"] == 16


def test_fp16_validation_floors_each_case_at_what_fp16_moves_transformers(gpu_check, tmp_path_factory, monkeypatch):
    """As at export: a case's tolerance is max(the fp16 tolerance, the fp16-vs-fp32 spread of
    transformers on that case). The TensorRT runner is stood in for by transformers in fp16."""
    import doge_export.backends.trt as trt_backend
    import doge_export.validate as validate_module
    from doge_export.backends.torch import TorchRunner
    from doge_export.precision import cast_model

    work = tmp_path_factory.mktemp("gc16")
    art = export_artifact(load_model("random:tiny"), work / "art", ExportConfig(dtype="float16"), log=lambda *a: None)
    for batch in (1, 3):
        (work / f"fp16-b{batch}").symlink_to(art.folder)
    spreads = []

    def fake_spreads(reference, fp32, cfg):
        assert next(fp32.model.parameters()).dtype.is_floating_point and cfg.prompt_lengths
        spreads.append(tuple(7.0 + i for i in range(len(cfg.prompt_lengths))))
        return spreads[-1]

    monkeypatch.setattr(validate_module, "case_spreads", fake_spreads)
    monkeypatch.setattr(trt_backend, "TrtRunner", lambda manifest: TorchRunner(
        cast_model(load_model("random:tiny").model, "fp16"), manifest.info, stable_topk=True))
    result = gpu_check.validate(work, "random:tiny", greedy_steps=4)
    # (random:tiny in fp16 overflows inside transformers on batch 3's prompts: NaN on both sides)
    assert result["reports"]["batch1"]["passed"] and len(spreads) == 2
    for (name, report), case_spreads in zip(result["reports"].items(), spreads):
        for case, spread in zip(report["cases"], case_spreads):
            assert case["checks"] and all(c["tol"] == spread for c in case["checks"] if "logits" in c["output"]), name
