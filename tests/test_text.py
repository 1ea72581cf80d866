"""doge_export.text against transformers (the oracle) on the real Doge tokenizer files.

The tokenizer is read from ../shared/reference/doge-tokenizer (never copied into the repo);
tests that need it skip when that folder is absent.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from doge_export.errors import DogeExportError
from doge_export.text import IncrementalDecoder, TextTokenizer, files_to_copy, special_ids

REPO = Path(__file__).resolve().parents[1]
REF_DIR = REPO.parent / "shared" / "reference" / "doge-tokenizer"

STRINGS = [
    "",
    "Hey how are you doing?",
    "Hi, how are you doing today?",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\nand\r\nnewlines\n",
    "    indented code line",
    "def add(a, b):\n    return a + b  # sum\n",
    'print(f"{x!r:>10}") if x else None; {"k": [1, 2.5e-3]}',
    "numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000",
    "CJK: 你好，世界！ 日本語のテキスト 한국어 문장",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "accents: café naïve Zoë façade Ångström",
    "Cyrillic and Greek: Привет мир, Καλημέρα κόσμε",
    "Arabic and Hebrew: مرحبا بالعالم שלום עולם",
    "math: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ",
    "URL https://example.com/a?b=c&d=e#frag and mail a.b@c.org",
    "I'm sure it's what they've said, we'll see; you'd DON'T",
    "<|begin_of_text|>special tokens in text<|end_of_text|>",
    "zero\u200bwidth\u00a0nbsp and combining e\u0301",
    "\n\n\n",
]

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "  You are a helpful assistant.  "},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help? 😀"},
        {"role": "user", "content": "Write 你好 in pinyin."},
        {"role": "assistant", "content": "nǐ hǎo"},
        {"role": "user", "content": "Thanks"},
    ],
    "user_only": [{"role": "user", "content": "Hi, how are you doing today?"}],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville <b>now</b>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def ref_dir():
    if not REF_DIR.is_dir():
        pytest.skip(f"reference tokenizer folder {REF_DIR} is absent")
    return REF_DIR


@pytest.fixture(scope="module")
def tok(ref_dir):
    return TextTokenizer.from_dir(ref_dir)


@pytest.fixture(scope="module")
def hf(ref_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(ref_dir))


def _hf_chat(hf, messages, **kwargs):
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    return ids, text


@pytest.mark.parametrize("text", STRINGS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", STRINGS)
def test_decode_matches_transformers_and_round_trips(tok, hf, text):
    ids = tok.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_documented_example(tok):
    assert tok.encode("Hey how are you doing?") == [0, 20756, 875, 616, 596, 3257, 286]


def test_reference_readme_chat_check(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi, how are you doing today?"}],
                                  add_generation_prompt=True)
    assert len(ids) == 44
    assert ids[:4] == [0, 3, 17882, 4]
    assert ids[-5:] == [3, 817, 9665, 4, 454]
    assert ids.count(0) == 1  # bos once: the template writes it, encode adds none


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_matches_transformers(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ids, text = _hf_chat(hf, messages, add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt) == text
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ids


def test_chat_extra_variables_and_tools_match_transformers(tok, hf):
    messages = CONVERSATIONS["system_user"]
    for kwargs in ({"date_string": "26 Jul 2024"}, {"tools": [WEATHER_TOOL]},
                   {"tools": [WEATHER_TOOL], "tools_in_user_message": False}):
        ids, text = _hf_chat(hf, messages, add_generation_prompt=True, **kwargs)
        assert tok.render_chat(messages, **kwargs) == text
        assert tok.apply_chat_template(messages, **kwargs) == ids
    assert "December 2024" in tok.render_chat(messages)  # template default; no strftime_now in this template


def test_special_ids_and_settings(tok, ref_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert special_ids(ref_dir) == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    assert tok.padding_side == "left"
    assert tok.add_bos
    assert tok.tokenizer.get_vocab_size() == 32768


def test_files_to_copy(ref_dir, tmp_path):
    assert [p.name for p in files_to_copy(ref_dir)] == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja", "config.json"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in files_to_copy(tmp_path)] == ["tokenizer.json", "chat_template.jinja"]


def _stream(tok, ids, skip_special_tokens=True):
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.step(ids[:n]) for n in range(1, len(ids) + 1)]
    return pieces, decoder.finish(ids)


def test_incremental_decode_equals_full_decode(tok):
    text = "Emoji 👨‍👩‍👧‍👦 and 🇫🇷, CJK 日本語のテキスト, math ∑ᵢ xᵢ² ≤ ∞."
    ids = tok.encode(text)
    # the test is only meaningful if some character is split across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # something was held back until its character completed


def test_incremental_decode_with_special_tokens_and_cut_character(tok):
    ids = tok.apply_chat_template(CONVERSATIONS["multi_turn"])
    for skip in (True, False):
        pieces, tail = _stream(tok, ids, skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
    split = next(i for i in tok.encode("👍") if "\ufffd" in tok.decode([i]))
    pieces, tail = _stream(tok, [split])
    assert pieces == [""] and tail == tok.decode([split])  # an unfinished character comes out only at finish


def test_named_templates_and_jinja_helpers_match_transformers(ref_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").symlink_to(ref_dir / "tokenizer.json")
    default = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
               "{% generation %}{{ m.role }}: {{ m.content | tojson(indent=2) }}{% endgeneration %}\n"
               "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    tool_use = ("{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}"
                "{{ tools | tojson }}|{{ strftime_now('%Y') }}|{{ messages[0].content }}")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": 'Ünïcode "<tag>" 😀'}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "dropped by break", "name": None}]
    for kwargs in ({}, {"add_generation_prompt": True}, {"tools": [WEATHER_TOOL]}, {"chat_template": "tool_use"}):
        ids, text = _hf_chat(hf, messages, **kwargs)
        kwargs.setdefault("add_generation_prompt", False)
        assert tok.render_chat(messages, **kwargs) == text
        assert tok.apply_chat_template(messages, **kwargs) == ids
    with pytest.raises(DogeExportError, match="too long"):
        tok.render_chat(messages * 2, chat_template="tool_use")


def test_errors_are_clear(ref_dir, tmp_path):
    with pytest.raises(DogeExportError, match="^No tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(DogeExportError, match="Could not load"):
        TextTokenizer.from_dir(tmp_path / "broken")
    with pytest.raises(DogeExportError, match="no such folder"):
        files_to_copy(tmp_path / "missing")
    (tmp_path / "tokenizer.json").symlink_to(ref_dir / "tokenizer.json")
    bare = TextTokenizer.from_dir(tmp_path)
    with pytest.raises(DogeExportError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DogeExportError, match="not valid JSON"):
        TextTokenizer.from_dir(tmp_path)


def test_empty_conversation_is_an_error(tok):
    with pytest.raises(DogeExportError, match="empty conversation"):
        tok.apply_chat_template([])


def test_import_needs_neither_torch_nor_transformers():
    code = ("import sys, doge_export.text; "
            "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "assert not bad, bad; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_config_add_bos_flags_are_ignored_like_transformers(ref_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").symlink_to(ref_dir / "tokenizer.json")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "add_bos_token": False, "add_eos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("hi there") == hf("hi there")["input_ids"] == [0, 6062, 972]
    assert tok.add_bos
