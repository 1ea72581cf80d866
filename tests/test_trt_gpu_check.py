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
