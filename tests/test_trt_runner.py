"""TrtRunner without a GPU: its binding, buffers, row write and generation, over a stand-in TensorRT.

No GPU is available in CI, so the real engines cannot run here. What the runner itself does (bind
every tensor by name from the spec, keep the state in aligned arenas, let the prefill engine write
them, write each step's new rows into their slots with index_copy_, refuse what it cannot run) is
checked with a stand-in `trt` module whose "engines" run the artifact's ONNX graphs in ONNX
Runtime, reading and writing the very memory the runner bound (CPU tensors, by address).
CUDA streams and CUDA-graph capture are the parts this cannot reach (benchmarks/gpu_check.py does).
"""

import ctypes
import hashlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import DogeForCausalLM

from doge_export import trt_engines
from doge_export.artifact import export_artifact
from doge_export.backends import trt as trt_backend
from doge_export.backends.ort import OrtRunner
from doge_export.errors import DogeExportError
from doge_export.export_onnx import ExportConfig
from doge_export.generate import greedy_tokens
from doge_export.manifest import load_manifest
from doge_export.model import LoadedModel, make_config, preset_config, randomize_
from doge_export.trt_build import BuildResult

NP_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}


class _DType:
    def __init__(self, name):
        self.name = name


class FakeContext:
    """Runs an ONNX graph in ONNX Runtime on the memory bound with set_tensor_address."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def _dims(self, name):
        symbols = {"batch": self.shapes["input_ids"][0], "prompt": self.shapes["input_ids"][1]}
        return tuple(symbols.get(d, d) for d in self.engine.shapes[name])

    def get_tensor_shape(self, name):
        return self.shapes.get(name) or self._dims(name)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def _array(self, name):
        dtype, shape = np.dtype(self.engine.dtypes[name]), self.get_tensor_shape(name)
        raw = (ctypes.c_char * (dtype.itemsize * int(np.prod(shape)))).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        session = self.engine.session
        feed = {i.name: self._array(i.name).copy() for i in session.get_inputs()}
        for out, value in zip(session.get_outputs(), session.run(None, feed)):
            self._array(out.name)[...] = value
        return True


class FakeEngine:
    def __init__(self, onnx_path):
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        values = self.session.get_inputs() + self.session.get_outputs()
        self.names = [v.name for v in values]
        self.dtypes = {v.name: {"tensor(float)": "float32", "tensor(float16)": "float16",
                                "tensor(int64)": "int64"}[v.type] for v in values}
        self.shapes = {v.name: tuple(v.shape) for v in values}
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return _DType(NP_TO_TRT[self.dtypes[name]])

    def create_execution_context(self):
        return FakeContext(self)


class FakeTrt:
    __version__ = "0.fake"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return FakeEngine(plan.decode().removeprefix("FAKE:")) if plan.startswith(b"FAKE:") else None


def _with_fake_engines(manifest, batch):
    """Record 'engines' whose plans name the ONNX graph the stand-in runs."""
    plans, records = {}, {}
    for graph in trt_engines.GRAPHS:
        plan = f"FAKE:{manifest.graph_file(graph)}".encode()
        result = BuildResult(plan, 0.0, "tensorrt", FakeTrt.__version__, "8.9")
        profiles = trt_engines.profiles_for(manifest.info, graph, batch)
        plans[graph] = plan
        records[graph] = trt_engines.engine_record(graph, result, "8.9", manifest.info, profiles,
                                                   trt_engines.EngineConfig(flavor="tensorrt", batch=batch), None)
    trt_engines.save_engines(manifest, plans, records)
    return load_manifest(manifest.folder)


def tiny_with_window(window: int) -> LoadedModel:
    config = make_config({**preset_config("tiny"), "keep_window_size": window})
    torch.manual_seed(0)
    model = DogeForCausalLM(config)
    randomize_(model, seed=0)
    model.config._attn_implementation = "eager"
    return LoadedModel(model.float().eval(), "random:tiny", "native", None)


@pytest.fixture(scope="module", params=["float32", "float16"])
def artifact(request, tmp_path_factory):
    loaded = tiny_with_window(6)
    out = tmp_path_factory.mktemp("trt") / request.param
    return export_artifact(loaded, out, ExportConfig(dtype=request.param), log=lambda *a: None)


@pytest.fixture
def gpu_89(monkeypatch):
    monkeypatch.setattr(trt_backend, "device_compute_capability", lambda device: "8.9")


def test_runner_matches_onnxruntime_through_prefill_and_steps(artifact, gpu_89):
    """Batch 3, left-padded, 20 greedy steps: far past the 6-slot window, so evictions and
    slot -1 (the new token losing) both happen, and every row write goes through index_copy_."""
    manifest = _with_fake_engines(artifact, batch=3)
    prompts = [[5, 9, 11, 40, 7, 3, 8, 90], [17, 4], [60, 61, 62, 63, 64]]
    with trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt) as runner, OrtRunner(manifest) as ort_runner:
        assert greedy_tokens(runner, prompts, 20) == greedy_tokens(ort_runner, prompts, 20)
        for name, want in ort_runner.state.full_arrays().items():
            np.testing.assert_array_equal(runner.state.arrays[name], want.astype(runner.state.arrays[name].dtype))


def test_validate_takes_the_engine_batch(artifact, gpu_89):
    """`doge-export validate --backend tensorrt`: cases of the step engine's fixed batch only."""
    from doge_export.backends.torch import TorchRunner
    from doge_export.validate import ValidateConfig, validate_runner

    manifest = _with_fake_engines(artifact, batch=2)
    model = tiny_with_window(6).model
    if artifact.info.dtype == "float16":
        from doge_export.precision import cast_model

        cast_model(model, "fp16")
    with trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt) as runner:
        report = validate_runner(runner, TorchRunner(model, manifest.info, stable_topk=True),
                                 ValidateConfig(decode_steps=4, greedy_steps=8), log=lambda *a: None)
    assert [len(c["prompt_lengths"]) for c in report["cases"]] == [2] and report["passed"], report


def test_arenas_are_aligned_and_share_one_stride(artifact, gpu_89):
    manifest = _with_fake_engines(artifact, batch=3)
    runner = trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt)
    arenas = list(runner.state_arenas.values())
    assert len({a.stride for a in arenas}) == 1 and len({a.spare for a in arenas}) == 1
    for arena in arenas + list(runner.row_arenas.values()):
        for tensor in arena.tensors:
            assert tensor.data_ptr() % trt_backend.ALIGN == 0 and tensor.is_contiguous()


def test_runner_refuses_other_batches_and_stale_engines(artifact, gpu_89, monkeypatch):
    manifest = _with_fake_engines(artifact, batch=2)
    runner = trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt)
    ids = np.array([[5, 6, 7]])
    with pytest.raises(DogeExportError, match=r"built for batch 2, got 1 .*--batch 1"):
        runner.prefill(ids, np.ones_like(ids), np.arange(3)[None])
    with pytest.raises(DogeExportError, match="step\\(\\) called before prefill"):
        runner.step(ids[:, :1], ids[:, :1])

    class NewerTrt(FakeTrt):
        __version__ = "0.newer"

    with pytest.raises(DogeExportError, match=r"built with tensorrt 0.fake but 0.newer .*must be rebuilt here: "
                                              r"doge-export trt .* --flavor tensorrt --compute-capability 8.9 --batch 2"):
        trt_backend.TrtRunner(manifest, device="cpu", trt=NewerTrt)
    monkeypatch.setattr(trt_backend, "device_compute_capability", lambda device: "12.0")
    with pytest.raises(DogeExportError, match=r"targets compute capability 8.9 but this GPU is 12.0"):
        trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt)


def test_engine_files_are_checksummed_and_a_bad_plan_says_rebuild(artifact, gpu_89):
    manifest = _with_fake_engines(artifact, batch=1)
    for graph, record in manifest.data["engines"].items():
        data = manifest.path(record["file"]).read_bytes()
        assert manifest.data["files"][record["file"]]["sha256"] == hashlib.sha256(data).hexdigest() == record["sha256"]
    manifest.path("step.engine").write_bytes(b"garbage")
    with pytest.raises(DogeExportError, match="step.engine does not match its checksum"):
        load_manifest(manifest.folder)
    manifest = load_manifest(manifest.folder, verify=False)
    with pytest.raises(DogeExportError, match=r"could not load step.engine .*must be rebuilt"):
        trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt)


def test_no_gpu_is_a_clear_error(artifact):
    manifest = _with_fake_engines(artifact, batch=1)
    with pytest.raises(DogeExportError, match="no CUDA GPU is visible"):
        trt_backend.TrtRunner(manifest, device="cpu", trt=FakeTrt)


def test_arena_rows_and_spare_row():
    arena = trt_backend.Arena(3, (2, 1, 5), (1,), torch.float16, "cpu")
    assert arena.stride == 128 and arena.spare == 384 and arena.rows.shape == (385, 1)
    arena.tensors[1][0, 0, 4] = 7.0
    assert arena.rows[128 + 4, 0] == 7.0 and arena.all_rows().shape == (30, 1)
