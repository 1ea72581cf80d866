"""`doge-export bench` runs and reports every field; the step reads the state where it lies.

No timing is asserted anywhere (the machine is shared and noisy): benchmarks are commands, their
numbers are recorded under benchmarks/.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from doge_export.backends.ort import OrtRunner, shared_initializers
from doge_export.bench import BenchConfig
from doge_export.bench_worker import step_weight_bytes
from doge_export.bench_report import cpu_isa, isa_summary, isa_tag
from doge_export.errors import DogeExportError
from doge_export.spec import state_names

from conftest import assert_user_error, run_cli

LATENCY = ("p50", "p90", "p99")


@pytest.fixture(scope="module")
def tiny(artifacts):
    return artifacts("tiny", seed=1)[0]


def test_bench_runs_and_json_has_the_fields(tiny, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    result = run_cli("bench", str(tiny.folder), "--prompt-len", "8", "--new-tokens", "6", "--warmup", "1",
                     "--repeats", "2", "--probe-to", "240", "--json", str(out), *plot)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["command"].startswith("doge-export bench ")
    machine = report["machine"]
    for key in ("cpu_model", "logical_cores", "versions", "bandwidth_gb_s", "started_utc", "ended_utc"):
        assert machine[key], key
    assert machine["versions"]["onnxruntime"] and machine["bandwidth_gb_s"]["used"] > 0
    assert isinstance(machine["cpu_isa"], list) and isa_summary(machine["cpu_isa"]) in result.stdout
    backends = report["backends"]
    assert set(backends) == {"torch-generate", "torch", "onnxruntime", "onnxruntime-packed", "onnxruntime-cpp", "tensorrt"}
    for name in ("torch-generate", "torch", "onnxruntime", "onnxruntime-packed"):
        entry = backends[name]
        assert entry["status"] == "ok", entry
        for key in ("ttft_ms", "decode_tok_s", "e2e_tok_s", "peak_rss_mb", "runtime_rss_mb", "floor_ms",
                    "floor_ratio", "bytes_per_token"):
            assert entry[key] > 0, (name, key)
        assert all(entry["latency_ms"][q] > 0 for q in LATENCY)
        assert len(entry["latency_by_step_ms"]) == 5
    assert backends["onnxruntime"]["imports_torch"] is False and backends["onnxruntime-packed"]["imports_torch"] is False
    assert backends["onnxruntime"]["lm_rows"] is False  # batch 1: the default graphs
    assert backends["tensorrt"]["status"] in ("ok", "skipped")
    assert backends["onnxruntime-cpp"]["status"] in ("ok", "skipped")  # tests/test_cpp_runtime.py runs it
    probe = report["probe"]["onnxruntime"]
    assert probe["last_position"] == 239 and probe["ratios"]["end_vs_start"] > 0
    assert "onnxruntime" in result.stdout and "p50/floor" in result.stdout
    if plot:
        assert png.stat().st_size > 10_000


def test_cpu_isa_reads_the_kernel_relevant_flags():
    """The results depend on the vector ISA (AVX2 vs AVX-512, VNNI for int8): it is recorded."""
    zen5 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16\n"
    zen2 = "flags\t\t: fpu sse2 avx avx2 fma\n"
    assert cpu_isa(zen5) == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert isa_summary(cpu_isa(zen5)) == "AVX-512 + VNNI"
    assert isa_summary(cpu_isa(zen2)) == "AVX2 without VNNI"
    assert isa_summary(cpu_isa("Features\t: fp asimd asimddp\n")) == "NEON"
    assert cpu_isa("") == [] and isa_summary([]) == "unknown ISA"
    assert [isa_tag(cpu_isa(c)) for c in (zen5, zen2, "")] == ["avx512-vnni", "avx2", "unknown-isa"]


def test_bench_user_errors(tiny):
    assert_user_error(run_cli("bench", str(tiny.folder), "--backends", "torch,jax"), "unknown backend", "jax")
    assert_user_error(run_cli("bench", str(tiny.folder), "--prompt-len", "1000"), "does not fit")
    with pytest.raises(DogeExportError, match="new-tokens"):
        BenchConfig(new_tokens=1)


def test_bench_refuses_unwritable_outputs_before_running(tiny, tmp_path):
    """--json/--plot paths are checked before the (long) run, and nothing is left behind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("bench", str(tiny.folder), "--json", str(blocker / "report.json"))
    assert_user_error(result, "cannot write --json", "writable path")
    assert "decoding" not in result.stderr  # refused before any backend ran
    assert_user_error(run_cli("bench", str(tiny.folder), "--plot", str(tmp_path)), "--plot", "is a folder")
    if importlib.util.find_spec("matplotlib"):  # a name matplotlib has no writer for: before the run too
        result = run_cli("bench", str(tiny.folder), "--plot", str(tmp_path / "plot.txt"))
        assert_user_error(result, "cannot write .txt", "use .png")
        assert "decoding" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert_user_error(run_cli("bench", str(tiny.folder), "--backends", "onnxruntime,onnxruntime"), "a backend twice")


def test_bench_writes_into_new_folders_and_marks_unmeasured_ratios(tiny, tmp_path):
    out = tmp_path / "new" / "dir" / "bench.json"
    result = run_cli("bench", str(tiny.folder), "--backends", "onnxruntime", "--prompt-len", "4", "--new-tokens", "3",
                     "--warmup", "0", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["backends"]["onnxruntime"]["status"] == "ok"
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left
    row = next(line for line in result.stdout.splitlines() if line.startswith("onnxruntime "))
    assert "nan" not in row and " - " in row  # "x gen": no torch-generate in this run


def test_step_weight_bytes_counts_every_matrix_once(tiny):
    listed = sum(t["length"] for t in tiny.data["weights"]["tensors"])
    assert 0 < step_weight_bytes(tiny) <= listed


def test_optimized_step_reads_the_state_in_place(tiny, tmp_path):
    """In ONNX Runtime's optimized step graph only the attention products read key/value: no
    Transpose, Concat or copy of the cache. q.K^T is a FusedMatMul with transB, and both products
    see the cache through an Unsqueeze (a view: ONNX Runtime aliases its output to its input),
    as one-row MatMuls per query head."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "step.opt.onnx")
    weights = shared_initializers(tiny)  # must outlive the session
    for name, value in weights.items():
        opts.add_initializer(name, value)
    ort.InferenceSession(str(tiny.graph_file("step")), opts, providers=["CPUExecutionProvider"])
    del weights
    graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    for layer in range(tiny.info.num_layers):
        for name in state_names(layer)[:2]:
            readers = _readers_through_views(graph, name)
            assert readers and readers <= {"MatMul", "FusedMatMul", "Shape"}, (layer, name, readers)


def _readers_through_views(graph, name: str) -> set[str]:
    """Op types that read tensor `name`, looking through Unsqueeze (a view in ONNX Runtime)."""
    readers = set()
    for node in graph.node:
        if name not in node.input:
            continue
        if node.op_type == "Unsqueeze":
            readers |= _readers_through_views(graph, node.output[0])
        else:
            readers.add(node.op_type)
    return readers


def test_runner_state_buffers_never_move(tiny):
    """Prefill writes into the bound buffers and each step writes rows into them in place."""
    with OrtRunner(tiny) as runner:
        ids = np.arange(3, 13, dtype=np.int64)[None]
        logits = runner.prefill(ids, np.ones_like(ids), np.arange(10)[None])
        arrays = {n: a for n, a in runner.state.arrays.items()}
        pointers = {n: a.ctypes.data for n, a in arrays.items()}
        for position in range(10, 40):
            logits = runner.step(logits.argmax(-1)[:, None], np.array([[position]]))
        assert {n: a.ctypes.data for n, a in runner.state.arrays.items()} == pointers
        assert all(runner.state.arrays[n] is a for n, a in arrays.items())
        assert (runner.state.arrays["position.0"] >= 0).all()  # the window filled up in place


def test_ab_step_times_artifacts_side_by_side(tiny):
    """benchmarks/ab_step.py decodes every artifact in turns and reports its ratio to the first."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_step.py"
    folder = str(tiny.folder)
    result = subprocess.run([sys.executable, str(script), folder, folder + "@packed", "--prompt-len", "8",
                             "--new-tokens", "40", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(folder)]
    assert len(rows) == 2 and "x1.000 of the first" in rows[0] and rows[1].startswith(folder + "@packed")
    assert all("step p50" in row for row in rows)


def test_attention_ops_benchmark_runs_and_checks_agreement():
    """benchmarks/attention_ops.py times the attention formulations after checking they agree."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_ops.py"
    result = subprocess.run([sys.executable, str(script), "--slots", "16", "--layers", "2", "--head-dim", "32",
                             "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("slots")]
    assert [row.split()[2] for row in rows] == ["grouped", "broadcast", "attention23"]
    bad = subprocess.run([sys.executable, str(script), "--heads", "3", "--kv-heads", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of --kv-heads" in bad.stderr


def test_prefill_session_runs_without_a_memory_pattern(artifacts):
    """The prefill's memory pattern would be allocated on top of the arena its first run grew
    (peak RSS +28 MiB at Doge-20M batch 8); the step keeps it (its intermediates are tiny)."""
    manifest, _ = artifacts("tiny", seed=3)
    with OrtRunner(manifest) as runner:
        assert runner.prefill_session.get_session_options().enable_mem_pattern is False
        assert runner.step_session.get_session_options().enable_mem_pattern is True
