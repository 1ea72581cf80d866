"""The C++ runtime (cpp/): built against the onnxruntime wheel's library, it runs artifacts from
their manifest alone (docs/runtime-contract.md) and must agree with the Python runtime token for
token and logit for logit: batch 1 and left-padded batches, dense and CDMoE, the attended width
growing past 64 slots and the window evicting, quantized weights, prepacked weights.

Skips name what is missing: a C++ compiler, or the ONNX Runtime headers (fetched once from
Debian's archive by cpp/build.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from doge_export.backends.cpp import CppServer
from doge_export.backends.torch import TorchRunner
from doge_export.generate import GenerateConfig, decode_step, generate, prefill
from doge_export.runtime import open_runner

from conftest import (CROSSING, REPO, assert_gathered_rows_handed_back, gathered_pages, mapped_regions, mapped_resident_kib, run_cli,
                      saved_by_a_future_onnxruntime)
from parity import varied_prompts

PROMPTS = [[0, 5, 9, 17], [3, 4], list(range(1, 21))]  # left-padded to 20


@pytest.fixture(scope="session")
def doge_run():
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler (g++) to build cpp/build/doge_run")
    result = subprocess.run(["bash", str(REPO / "cpp" / "build.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    if result.returncode != 0 and "could not fetch" in result.stderr:
        pytest.skip(f"needs the ONNX Runtime C++ headers: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    return REPO / "cpp" / "build" / "doge_run"


def run_cpp(binary, folder, prompts, new_tokens, *options) -> subprocess.CompletedProcess:
    cmd = [str(binary), str(folder), "--max-new-tokens", str(new_tokens), *options]
    for prompt in prompts:
        cmd += ["--input-ids", ",".join(map(str, prompt))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def cpp_greedy(binary, folder, prompts, new_tokens, *options) -> tuple[list[list[int]], np.ndarray]:
    result = run_cpp(binary, folder, prompts, new_tokens, "--no-stop", "--print-logits", *options)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return out["tokens"], np.array(out["last_logits"], np.float32).reshape(len(prompts), -1)


def python_greedy(manifest, prompts, new_tokens, backend="onnxruntime", runner=None):
    """The same loop with the Python runtime (or `runner`): the tokens, and the logits the last one
    came from."""
    with runner or open_runner(manifest, backend) as runner:
        logits, positions = prefill(runner, prompts)
        tokens = []
        for n in range(new_tokens):
            tokens.append(logits.argmax(-1))
            if n < new_tokens - 1:
                logits = decode_step(runner, tokens[-1][:, None], positions)
                positions = positions + 1
    return np.stack(tokens, 1).tolist(), logits


def assert_same_generation(binary, manifest, prompts, new_tokens, *options, backend="onnxruntime", atol=1e-4):
    tokens, logits = cpp_greedy(binary, manifest.folder, prompts, new_tokens, *options)
    expected_tokens, expected_logits = python_greedy(manifest, prompts, new_tokens, backend)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=atol)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3-left-padded"])
def test_cpp_matches_python_across_width_growth_and_eviction(doge_run, artifacts, prompts):
    """100 slots: the step's attended width grows 64 -> 100 and then the window evicts (150 tokens)."""
    manifest = artifacts("tiny", seed=3, overrides={"keep_window_size": 100})[0]
    assert manifest.info.capacity == 100
    assert_same_generation(doge_run, manifest, prompts, 150)
    assert_same_generation(doge_run, manifest, prompts, 150, "--all-slots")  # every slot, every step


def test_cpp_matches_transformers_across_the_window_and_the_rope_rescaling(doge_run, artifacts):
    """Against transformers itself (stable keep-window top-k): a keep window of 16 crossed in the
    prompt and while decoding, positions past max_position_embeddings (dynamic RoPE)."""
    manifest, loaded = artifacts("tiny", seed=3, overrides=CROSSING)
    reference = TorchRunner(loaded.model, manifest.info, stable_topk=True)
    for lengths in [(5,), (40,), (60, 3)]:
        prompts = varied_prompts(lengths, loaded.config.vocab_size, seed=len(lengths))
        tokens, logits = cpp_greedy(doge_run, manifest.folder, prompts, 40)
        expected_tokens, expected_logits = python_greedy(manifest, prompts, 40, runner=reference)
        assert tokens == expected_tokens, lengths
        tolerance = 1e-4 + 3e-5 * float(np.abs(expected_logits).max())  # validate's (README "Parity")
        np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=tolerance)


def test_cpp_matches_python_with_cdmoe_routing_across_the_batch(doge_run, artifacts):
    manifest = artifacts("tiny-moe", seed=2)[0]
    assert_same_generation(doge_run, manifest, PROMPTS, 40)


def test_cpp_takes_the_rows_layout_graphs_from_their_min_batch(doge_run, artifacts):
    """Batch 8 (lm_rows.min_batch): the tied matrix held once, transposed, as the rows graphs' input."""
    manifest = artifacts("tiny", seed=4)[0]
    prompts = [[0, 3 + n, 40 + 2 * n][: 1 + n % 3] for n in range(manifest.data["lm_rows"]["min_batch"])]
    assert_same_generation(doge_run, manifest, prompts, 24)
    rows = json.loads(run_cpp(doge_run, manifest.folder, prompts, 4).stdout)["options"]
    columns = json.loads(run_cpp(doge_run, manifest.folder, prompts, 4, "--no-lm-rows").stdout)["options"]
    assert rows["lm_rows"] is True and columns["lm_rows"] is False
    assert_same_generation(doge_run, manifest, prompts, 24, "--no-lm-rows")


def test_cpp_runs_half_precision_artifacts(doge_run, artifacts):
    """fp16 state (empty bias = -65504) and fp16 logits, converted to float by the runtime."""
    manifest = artifacts("tiny", seed=0, dtype="float16")[0]
    assert manifest.info.dtype == "float16"
    assert_same_generation(doge_run, manifest, PROMPTS, 30, atol=1e-3)


def test_cpp_packed_weights_match_the_packed_python_runner(doge_run, artifacts):
    manifest = artifacts("tiny", seed=1)[0]
    assert_same_generation(doge_run, manifest, PROMPTS[:1], 40, "--packed", backend="onnxruntime-packed")


def test_cpp_runs_quantized_weights_with_one_shared_packed_copy(doge_run, artifacts):
    manifest = artifacts("tiny", seed=2, quantize="int4")[0]
    assert_same_generation(doge_run, manifest, PROMPTS, 40)
    out = json.loads(run_cpp(doge_run, manifest.folder, PROMPTS[:1], 4).stdout)
    assert out["options"]["packed"] is True
    # weights.bin mapped, its pages handed back once both sessions hold the packed copy
    weights = manifest.path(manifest.data["weights"]["file"])
    server = CppServer(manifest.folder, batch=1)
    try:
        assert mapped_resident_kib(weights, server.process.pid) == 0
        # the tensors read a row at a time: one mapping region per page (no 64 KiB fault-around)
        assert len(mapped_regions(weights, server.process.pid)) >= gathered_pages(manifest) > 0
        assert server.generate(PROMPTS[:1], 8)["tokens"] == python_greedy(manifest, PROMPTS[:1], 8)[0]
        assert_gathered_rows_handed_back(lambda n: server.generate(PROMPTS[:1], n), manifest, server.process.pid)
    finally:
        server.close()



def test_cpp_names_the_onnxruntime_that_saved_graphs_it_cannot_load(doge_run, artifacts, tmp_path):
    folder = saved_by_a_future_onnxruntime(artifacts("tiny", seed=2, quantize="int4")[0].folder, tmp_path / "future")
    result = run_cpp(doge_run, folder, PROMPTS[:1], 2, "--no-verify")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "99.0.0 saved optimized" in errors[0] and ">= 99.0.0" in errors[0], result.stderr


def test_cpp_stops_rows_at_a_stop_id_like_generate(doge_run, artifacts):
    """A row ends with its first stop id; finished rows are fed pad while the others go on."""
    manifest = artifacts("tiny", seed=0)[0]
    free, _ = python_greedy(manifest, PROMPTS, 30)
    stop = free[1][5]  # row 1 stops at its 6th token (or earlier); the others when they meet it
    expected = generate(open_runner(manifest), PROMPTS, GenerateConfig(max_new_tokens=30, stop_ids=(stop,))).tokens
    assert len(expected[1]) <= 6 and expected != free
    result = run_cpp(doge_run, manifest.folder, PROMPTS, 30, "--stop-id", str(stop))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == expected


def test_cpp_reports_its_measurements(doge_run, artifacts):
    manifest = artifacts("tiny", seed=0)[0]
    result = run_cpp(doge_run, manifest.folder, PROMPTS[:1], 12, "--no-stop", "--warmup", "1", "--repeat", "2")
    out = json.loads(result.stdout)
    assert out["step_ms"]["count"] == 2 * 11 and 0 < out["step_ms"]["p50"] <= out["step_ms"]["p99"]
    assert out["prefill_ms"] > 0 and out["decode_tok_s"] > 0
    assert out["rss_mib"]["peak"] >= out["rss_mib"]["after_load"] > out["rss_mib"]["baseline"] > 0
    assert out["weights_mib"] == pytest.approx(manifest.data["weights"]["bytes"] / 2**20)
    assert out["state_mib"] > 0


def test_cpp_refuses_a_modified_artifact(doge_run, artifacts, tmp_path):
    manifest = artifacts("tiny", seed=0)[0]
    copy = tmp_path / "modified"
    shutil.copytree(manifest.folder, copy)
    weights = copy / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    result = run_cpp(doge_run, copy, PROMPTS[:1], 4)
    assert_cpp_error(result, "does not match its sha256")
    assert run_cpp(doge_run, copy, PROMPTS[:1], 4, "--no-verify").returncode == 0  # unchecked, it runs


@pytest.mark.parametrize("args, message", [
    (["--input-ids", "0,99999"], "outside the vocabulary"),
    (["--input-ids", "0,1,x"], "takes an integer"),
    (["--input-ids", "0,1", "--max-new-tokens", "0"], "at least 1"),
    (["--input-ids", "0,1", "--max-new-tokens", "100000"], "exceeds this artifact's max context"),
    (["--input-ids", "0,1", "--bogus"], "unknown option --bogus"),
    ([], "no prompt given"),
])
def test_cpp_bad_input_is_one_clear_error(doge_run, artifacts, args, message):
    manifest = artifacts("tiny", seed=0)[0]
    result = subprocess.run([str(doge_run), str(manifest.folder), *args], capture_output=True, text=True, timeout=60)
    assert_cpp_error(result, message)


def test_cpp_names_a_folder_that_is_not_an_artifact(doge_run, tmp_path):
    result = subprocess.run([str(doge_run), str(tmp_path), "--input-ids", "0"], capture_output=True, text=True)
    assert_cpp_error(result, "is not an artifact folder")


@pytest.mark.parametrize("content, message", [("[1, 2]", "holds a JSON array, not a manifest"),
                                              ("{", "is not valid JSON"),
                                              ('{"schema": "doge-export/artifact"}', "not a doge-export artifact")])
def test_cpp_names_a_manifest_that_is_not_one(doge_run, artifacts, tmp_path, content, message):
    copy = tmp_path / "edited"
    shutil.copytree(artifacts("tiny", seed=0)[0].folder, copy)
    (copy / "doge_export.json").write_text(content)
    assert_cpp_error(run_cpp(doge_run, copy, PROMPTS[:1], 4), message)


def assert_cpp_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def test_bench_runs_the_cpp_runtime_side_by_side(doge_run, artifacts, tmp_path):
    manifest = artifacts("tiny", seed=0)[0]
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(manifest.folder), "--backends", "onnxruntime,onnxruntime-cpp", "--prompt-len", "6",
                     "--new-tokens", "9", "--warmup", "0", "--repeats", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    backends = json.loads(out.read_text())["backends"]
    cpp, python = backends["onnxruntime-cpp"], backends["onnxruntime"]
    assert cpp["status"] == "ok", cpp
    assert len(cpp["latency_by_step_ms"]) == 8  # 9 tokens: 8 steps after the prefill
    assert cpp["decode_tok_s"] > 0 and cpp["ttft_ms"] > 0
    # its own process's memory: what loading the artifact added to the C++ program
    assert 0 < cpp["runtime_rss_mb"] < cpp["peak_rss_mb"]
    assert cpp["bytes_per_token"] == python["bytes_per_token"] and "filled" in cpp["state_kind"]


def test_bench_skips_the_cpp_runtime_when_it_is_not_built(artifacts, tmp_path):
    manifest = artifacts("tiny", seed=0)[0]
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(manifest.folder), "--backends", "onnxruntime,onnxruntime-cpp", "--prompt-len", "4",
                     "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--json", str(out),
                     env={"DOGE_RUN": str(tmp_path / "missing")})
    assert result.returncode == 0, result.stderr
    cpp = json.loads(out.read_text())["backends"]["onnxruntime-cpp"]
    assert cpp["status"] == "skipped" and "bash cpp/build.sh" in cpp["reason"]


def sampled(binary, manifest, *options) -> list[list[int]]:
    result = run_cpp(binary, manifest.folder, PROMPTS[:2], 48, "--no-stop", *options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["tokens"]


def test_cpp_sampling_is_seeded_and_its_filters_narrow_to_greedy(doge_run, artifacts):
    manifest = artifacts("tiny", seed=0)[0]
    greedy = sampled(doge_run, manifest)
    hot = ("--temperature", "1.5")
    first = sampled(doge_run, manifest, *hot, "--seed", "7")
    assert first == sampled(doge_run, manifest, *hot, "--seed", "7")  # the seed fixes the draw
    assert first != sampled(doge_run, manifest, *hot, "--seed", "8")
    assert first != greedy
    # a filter that leaves one candidate is greedy, whatever the temperature and seed
    assert sampled(doge_run, manifest, *hot, "--top-k", "1", "--seed", "3") == greedy
    assert sampled(doge_run, manifest, *hot, "--top-p", "1e-6", "--seed", "3") == greedy
    assert sampled(doge_run, manifest, "--temperature", "0", "--top-k", "5") == greedy  # 0: greedy


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--temperature", "hot"], "takes a number"),
])
def test_cpp_sampling_options_are_checked(doge_run, artifacts, args, message):
    manifest = artifacts("tiny", seed=0)[0]
    assert_cpp_error(run_cpp(doge_run, manifest.folder, PROMPTS[:1], 4, *args), message)


def test_the_runtime_library_embeds_in_a_program(doge_run, artifacts):
    """cpp/examples/embed.cpp, linked against build/libdoge_runtime.a, generates what doge_run does."""
    manifest = artifacts("tiny", seed=0)[0]
    embed = doge_run.parent / "embed"
    result = subprocess.run([str(embed), str(manifest.folder), *map(str, PROMPTS[0])], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = json.loads(run_cpp(doge_run, manifest.folder, PROMPTS[:1], 16).stdout)["tokens"][0]
    assert [int(t) for t in result.stdout.split()] == expected


def test_cmake_builds_the_same_runtime(doge_run, artifacts, tmp_path):
    """cpp/CMakeLists.txt (for embedding projects) builds a doge_run and an embed that agree with
    build.sh's; the headers are the ones build.sh fetched."""
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake to test cpp/CMakeLists.txt")
    import glob

    import onnxruntime

    library = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0]
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(REPO / "cpp"), "-B", str(build), f"-DORT_LIBRARY={library}"],
                ["cmake", "--build", str(build), "-j2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    manifest = artifacts("tiny", seed=0)[0]
    expected = json.loads(run_cpp(doge_run, manifest.folder, PROMPTS[:1], 16).stdout)["tokens"]
    assert json.loads(run_cpp(build / "doge_run", manifest.folder, PROMPTS[:1], 16).stdout)["tokens"] == expected
    embedded = subprocess.run([str(build / "embed"), str(manifest.folder), *map(str, PROMPTS[0])],
                              capture_output=True, text=True, timeout=60)
    assert [int(t) for t in embedded.stdout.split()] == expected[0], embedded.stderr


def test_artifact_ab_compares_two_exports_in_the_cpp_runtime(doge_run, artifacts, tmp_path):
    """benchmarks/artifact_ab.py: per-artifact medians and per-round ratios, the command recorded."""
    old, new = artifacts("tiny", seed=2)[0].folder, artifacts("tiny", seed=2, quantize="int4")[0].folder
    out = tmp_path / "ab.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "artifact_ab.py"), str(old), str(new),
                             "--rounds", "2", "--prompt-len", "8", "--new-tokens", "6", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert "artifact_ab.py" in report["command"] and len(report["runs"]["new"]) == 2
    for field in ("step_p50_ms", "prefill_ms", "runtime_rss_mib"):
        assert report["median"][field]["old"] > 0 and report["median"][field]["new"] > 0
        assert len(report["new_over_old"][field]["per_round"]) == 2
    too_long = subprocess.run([sys.executable, str(REPO / "benchmarks" / "artifact_ab.py"), str(old), str(new),
                               "--rounds", "1", "--prompt-len", "100000"], capture_output=True, text=True, timeout=300)
    assert too_long.returncode == 1 and too_long.stderr.startswith("error:") and "Traceback" not in too_long.stderr
