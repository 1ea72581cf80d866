"""The command line as a user meets it: results, and bad inputs with one clear line, exit 1,
no traceback and nothing left behind (issue 2 Done-when)."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from conftest import REPO, assert_user_error, run_cli


@pytest.fixture(scope="module")
def small(artifacts):
    """A tiny artifact with short limits: max prompt 8, max context 40."""
    manifest, _ = artifacts("tiny", max_prompt=8, max_context=40)
    return manifest.folder


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("onnx", "generate", "validate", "inspect"):
        assert command in result.stdout


def test_export_generate_validate_inspect_roundtrip(tmp_path):
    out = tmp_path / "art"
    result = run_cli("onnx", "--model", "random:tiny", "--out", str(out), "--override", "keep_window_size=8")
    assert result.returncode == 0, result.stderr
    assert "[ok]" in result.stderr and "wrote" in result.stderr  # progress went to stderr
    manifest = json.loads((out / "doge_export.json").read_text())
    assert manifest["validation"]["onnxruntime"]["passed"] is True
    assert manifest["validation"]["onnxruntime-rows"]["passed"] is True
    assert manifest["model_info"]["capacity"] == 8
    gen = run_cli("generate", str(out), "--input-ids", "5,6,7", "--input-ids", "9", "--max-new-tokens", "5", "--json")
    assert gen.returncode == 0, gen.stderr
    data = json.loads(gen.stdout)
    assert [len(t) for t in data["tokens"]] == [5, 5] and data["text"] == [None, None]
    validated = run_cli("validate", str(out), "--json")
    assert validated.returncode == 0, validated.stderr
    assert "validation passed (onnxruntime and onnxruntime-rows vs transformers)" in validated.stderr
    report = json.loads(validated.stdout)
    assert report["passed"] is True and report["rows_layout"]["passed"] is True
    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0 and "8 slots" in shown.stdout
    # against another model: reported, not recorded over the artifact's own record
    other = run_cli("validate", str(out), "--model", "random:tiny-moe")
    assert other.returncode == 1 and "not recorded in the manifest" in other.stderr
    assert json.loads((out / "doge_export.json").read_text())["validation"]["onnxruntime"]["passed"] is True
    recorded = json.loads((out / "doge_export.json").read_text())["validation"]["onnxruntime"]["settings"]
    assert recorded == {"decode_steps": 16, "greedy_steps": 32, "atol": None}


@pytest.mark.parametrize("args, expected", [
    (["--backend", "torch"], "the PyTorch reference itself"),
    (["--decode-steps", "0"], "--decode-steps must be at least 1"),
    (["--greedy-steps", "-1"], "--greedy-steps must be at least 1"),
    (["--atol", "-1"], "--atol must be greater than 0"),
])
def test_validate_refuses_settings_that_check_nothing(small, args, expected):
    assert_user_error(run_cli("validate", str(small), *args), expected)


def readme_quickstart_commands() -> list[list[str]]:
    """The `doge-export` commands of README.md's quick start, as argument lists."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    segments = (seg.strip() for line in block.replace("\\\n", " ").splitlines() for seg in line.split("&&"))
    return [shlex.split(seg)[1:] for seg in segments if seg.startswith(".venv/bin/doge-export ")]


def test_readme_quickstart_runs_and_passes_its_own_validation(tmp_path):
    """The README's first command, as written (default seed, validation on): a newcomer's first
    export must not fail validation on the machine they run it on."""
    commands = readme_quickstart_commands()
    assert [c[0] for c in commands] == ["onnx", "generate"], commands
    for command in commands:
        args = [str(tmp_path / a) if a.startswith("out/") else a for a in command]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "doge-20m" / "doge_export.json").read_text())
    assert manifest["validation"]["onnxruntime"]["passed"] is True
    assert len(result.stdout.split()) == 32  # generate printed 32 token ids


def test_generate_backends_agree_on_doge_20m(artifacts):
    """`doge-export generate` prints the same tokens for onnxruntime and torch (random:doge-20m)."""
    manifest, _ = artifacts("doge-20m", seed=2)
    outputs = {}
    for backend in ("onnxruntime", "torch"):
        result = run_cli("generate", str(manifest.folder), "--input-ids", "17,923,4051,88,1200",
                         "--input-ids", "31,7", "--max-new-tokens", "24", "--backend", backend, "--json")
        assert result.returncode == 0, result.stderr
        outputs[backend] = json.loads(result.stdout)["tokens"]
    assert outputs["onnxruntime"] == outputs["torch"]
    assert len(set(outputs["onnxruntime"][0])) > 4  # not one repeated token


def no_leftovers(parent, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


def test_missing_model_dir(tmp_path):
    result = run_cli("onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_user_error(result, "does not exist")
    assert no_leftovers(tmp_path, "out")
    assert_user_error(run_cli("inspect", "--model", str(tmp_path / "nope")), "does not exist")  # not a hub id


def test_missing_tokenizer_is_refused_before_the_export(tmp_path):
    for tokenizer, expected in ((tmp_path / "nope", "is not a folder"), (tmp_path, "has no tokenizer.json")):
        result = run_cli("onnx", "--model", "random:tiny", "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer))
        assert_user_error(result, expected)
        assert "loading" not in result.stderr and no_leftovers(tmp_path, "out")


def test_config_that_is_not_doge(tmp_path):
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    result = run_cli("onnx", "--model", str(ckpt), "--out", str(tmp_path / "out"))
    assert_user_error(result, "not a Doge checkpoint")
    assert no_leftovers(tmp_path, "out")


def test_pickle_only_checkpoint_is_refused(tmp_path, pickle_checkpoint):
    result = run_cli("onnx", "--model", str(pickle_checkpoint), "--out", str(tmp_path / "out"))
    assert_user_error(result, "pickle", "--allow-pickle")
    assert no_leftovers(tmp_path, "out")


def test_output_dir_that_exists(tmp_path, small):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert_user_error(run_cli("onnx", "--model", "random:tiny", "--out", str(out)), "already exists", "--force")
    # --force replaces artifact folders only, never a folder of other files
    assert_user_error(run_cli("onnx", "--model", "random:tiny", "--out", str(out), "--force"), "not a doge-export")
    assert (out / "mine.txt").read_text() == "user data"
    assert_user_error(run_cli("onnx", "--model", "random:tiny", "--out", str(out / "mine.txt")), "is a file")
    empty = tmp_path / "empty"  # an empty folder holds nothing to lose: used as it is
    empty.mkdir()
    result = run_cli("onnx", "--model", "random:tiny", "--out", str(empty), "--no-validate")
    assert result.returncode == 0, result.stderr
    assert (empty / "doge_export.json").is_file()


def test_output_dir_that_cannot_be_created(tmp_path):
    """--out under a file: a clear error before the model loads, and nothing written."""
    (tmp_path / "a-file").write_text("")
    result = run_cli("onnx", "--model", "random:tiny", "--out", str(tmp_path / "a-file" / "out"))
    assert_user_error(result, "cannot create --out", "writable folder")
    assert "loading" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_output_dir_parents_are_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "art"
    result = run_cli("onnx", "--model", "random:tiny", "--out", str(out), "--no-validate")
    assert result.returncode == 0, result.stderr
    assert (out / "doge_export.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["art"]  # no probe or partial folder left


def test_force_replaces_an_artifact(tmp_path, small):
    out = tmp_path / "again"
    shutil.copytree(small, out)
    result = run_cli("onnx", "--model", "random:tiny", "--out", str(out), "--force", "--no-validate", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "doge_export.json").read_text())["source"]["seed"] == 1


def test_tampered_artifact(tmp_path, small):
    art = tmp_path / "tampered"
    shutil.copytree(small, art)
    with open(art / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run_cli("generate", str(art), "--input-ids", "1,2,3")
    assert_user_error(result, "weights.bin", "checksum")


def test_unknown_schema_version(tmp_path, small):
    art = tmp_path / "future"
    shutil.copytree(small, art)
    data = json.loads((art / "doge_export.json").read_text())
    data["schema_version"] = 99
    (art / "doge_export.json").write_text(json.dumps(data))
    assert_user_error(run_cli("generate", str(art), "--input-ids", "1,2,3"), "schema version 99")


@pytest.mark.parametrize("edit, expected", [
    (lambda d: [], "not an object"),
    (lambda d: d.pop("files") and d, "'files' missing"),
    (lambda d: d.pop("model_info") and d, "'model_info' missing"),
    (lambda d: d["model_info"].update(vocab_size="abc") or d, "model_info.vocab_size must be a positive integer"),
    (lambda d: d["files"].update({"../../etc/hostname": {"sha256": "0", "bytes": 1}}) or d, "inside the artifact folder"),
])
def test_an_edited_manifest_is_a_clear_error(tmp_path, small, edit, expected):
    """Its files are checksummed, the manifest itself is not: a missing key or a wrong type must
    still be one line, and no listed file may lie outside the folder."""
    art = tmp_path / "edited"
    shutil.copytree(small, art)
    data = edit(json.loads((art / "doge_export.json").read_text()))
    (art / "doge_export.json").write_text(json.dumps(data))
    for command in ("generate", "inspect"):
        args = [command, str(art)] + (["--input-ids", "1,2,3"] if command == "generate" else [])
        assert_user_error(run_cli(*args), expected)


@pytest.mark.parametrize("args, expected", [
    (["generate", "art", "--max-new-tokens", "abc"], "Invalid value for '--max-new-tokens'"),
    (["generate", "art", "--bogus"], "No such option: --bogus"),
    (["onnx"], "Missing option '--model'"),
    (["generate", "a", "b"], "unexpected extra argument"),
    (["nosuchcommand"], "No such command"),
])
def test_bad_flags_and_values_are_one_error_line(args, expected):
    """Usage errors too: one `error:` line naming the command's --help, exit 1 (not click's box, exit 2)."""
    result = run_cli(*args)
    assert_user_error(result, expected, "--help`")


def test_bare_command_prints_the_help():
    result = run_cli()
    assert result.returncode == 0 and "Usage" in result.stdout and "generate" in result.stdout


def test_prompt_longer_than_max_prompt(small):
    ids = ",".join(str(i) for i in range(3, 12))  # 9 > max prompt 8
    assert_user_error(run_cli("generate", str(small), "--input-ids", ids), "max prompt length 8")


def test_prompt_plus_generation_beyond_max_context(small):
    assert_user_error(run_cli("generate", str(small), "--input-ids", "5,6", "--max-new-tokens", "39"), "max context 40")


def test_token_id_outside_vocab(small):
    assert_user_error(run_cli("generate", str(small), "--input-ids", "5,512"), "512", "vocabulary")


@pytest.mark.parametrize("option,value,expected", [
    ("--temperature", "-0.5", "temperature must be >= 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ("--top-k", "-1", "top_k must be >= 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
])
def test_invalid_sampling_values(small, option, value, expected):
    assert_user_error(run_cli("generate", str(small), "--input-ids", "5,6", option, value), expected)


def test_text_prompt_without_tokenizer(small):
    assert_user_error(run_cli("generate", str(small), "--prompt", "hello"), "no tokenizer", "--input-ids")


@pytest.mark.parametrize("args, expected", [
    (["--input-ids", "0,,3"], "comma-separated integers"),
    (["--input-ids", "0,3", "--chat"], "--chat and --system apply to --prompt"),
    (["--input-ids", "0,3", "--stop-id", "-1"], "--stop-id -1 is outside the vocabulary"),
    (["--input-ids", "0,3", "--threads", "0"], "--threads must be at least 1"),
])
def test_generate_refuses_what_it_would_silently_ignore(small, args, expected):
    assert_user_error(run_cli("generate", str(small), *args), expected)


def test_malformed_input_ids(small):
    assert_user_error(run_cli("generate", str(small), "--input-ids", "5,x"), "comma-separated integers")


def test_missing_artifact(tmp_path):
    assert_user_error(run_cli("generate", str(tmp_path / "none"), "--input-ids", "1"), "does not exist")
    (tmp_path / "a-file").write_text("")
    assert_user_error(run_cli("inspect", str(tmp_path / "a-file")), "is a file", "artifact folder")


def test_help_shows_every_bracketed_default():
    """A help text's `[default]` must reach the screen (rich markup swallows an unescaped `[word]`)."""
    import re

    from typer.testing import CliRunner

    from doge_export.cli import app

    source = (REPO / "doge_export" / "cli.py").read_text()
    defaults = [h[h.index("["):].replace("\\\\[", "[") for _, h in re.findall(r'help=(["\'])(.*?)\1', source)
                if "[" in h and "[[" not in h]
    assert len(defaults) >= 6, defaults
    shown = ""
    for command in ("onnx", "generate", "validate", "inspect", "bench", "trt", "lint"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        shown += result.output
    flat = " ".join(shown.split())
    missing = [d for d in defaults if " ".join(d.split()) not in flat]
    assert not missing, missing
