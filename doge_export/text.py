"""Tokenizer layer of the runtime: encode, decode, chat templates and streaming decode.

Needs only `tokenizers` and `jinja2` (no torch, no transformers) and reproduces what transformers'
`AutoTokenizer` does with the same folder: the same ids from `encode`, the same text from `decode`,
and the same rendering and ids from `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from doge_export.errors import DogeExportError

# What an exporter copies next to the graphs. generation_config.json is model config, not tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# transformers' named special tokens, in its order; the ones that are set become template variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def files_to_copy(src_dir: str | Path) -> list[Path]:
    """The tokenizer files present in `src_dir`; raises if tokenizer.json is missing."""
    src = Path(src_dir)
    _require_tokenizer_json(src)
    return [src / name for name in TOKENIZER_FILES if (src / name).is_file()]


def special_ids(tok_dir: str | Path) -> dict[str, int | None]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of the tokenizer in `tok_dir` (None when unset)."""
    tok = TextTokenizer.from_dir(tok_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


class TextTokenizer:
    """A fast tokenizer plus the tokenizer_config.json settings that transformers applies on top of it.

    Build it with `from_dir`. `special_tokens` maps names like "bos_token" to their strings;
    `chat_template` is a template string, a {name: template} dict, or None.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str], chat_template: str | dict | None,
                 padding_side: str = "right", clean_up_spaces: bool = False, source: str = "<memory>"):
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.source = source
        # transformers skips this cleanup for BPE models: it would eat spaces before punctuation
        self._clean_up_spaces = clean_up_spaces and type(tokenizer.model).__name__ != "BPE"
        self.bos_id = self.token_id("bos_token")
        self.eos_id = self.token_id("eos_token")
        self.pad_id = self.token_id("pad_token")
        # True when tokenizer.json's post-processor prepends bos. As in transformers 5, add_bos_token /
        # add_eos_token in tokenizer_config.json are ignored when tokenizer.json exists (it always does here).
        self.add_bos = self.bos_id is not None and tokenizer.encode("").ids[:1] == [self.bos_id]

    @classmethod
    def from_dir(cls, tok_dir: str | Path) -> TextTokenizer:
        """Load tokenizer.json and, when present, tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
        src = Path(tok_dir)
        path = _require_tokenizer_json(src)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise DogeExportError(f"Could not load {path}: {err}. Expected a Hugging Face "
                                  "fast-tokenizer file; re-save the tokenizer with a recent transformers.") from err
        config = _read_json(src / "tokenizer_config.json")
        special = _special_tokens(config, _read_json(src / "special_tokens_map.json"))
        # transformers' __call__ neither pads nor truncates a single text unless asked to
        json_padding = tokenizer.padding
        tokenizer.no_padding()
        tokenizer.no_truncation()
        padding_side = config.get("padding_side") or (json_padding or {}).get("direction") or "right"
        return cls(tokenizer, special, _chat_template(src, config), padding_side,
                   bool(config.get("clean_up_tokenization_spaces", False)), str(src))

    def token_id(self, name: str) -> int | None:
        """The id of a named special token ("bos_token", ...), or None when the tokenizer has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, as `AutoTokenizer(...)(text)["input_ids"]` gives them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as `AutoTokenizer(...).decode(ids, skip_special_tokens=...)` gives it."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None, tools: list[dict] | None = None,
                    documents: list[dict] | None = None, **extra) -> str:
        """Render a conversation with the chat template, as `apply_chat_template(..., tokenize=False)`.

        Args:
            messages: dicts with "role" and "content"; keys whose value is None are dropped, as transformers does.
            chat_template: a template name (when the tokenizer has several) or a template string.
            tools, documents: JSON-schema dicts, passed to the template as is.
            extra: more template variables (e.g. date_string); they override the special-token variables.
        """
        template = self._select_template(chat_template, tools)
        chat = _normalize_messages(messages)
        variables = {**self.special_tokens, **extra}
        try:
            return _compile_template(template).render(messages=chat, tools=tools, documents=documents,
                                                      add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as err:
            raise DogeExportError(f"The chat template of {self.source} rejected the conversation: {err}. "
                                  "Check the roles and order of the messages.") from err

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """Ids of the rendered conversation, tokenized without adding special tokens (the template writes bos)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)

    def _select_template(self, name_or_template: str | None, tools: list[dict] | None) -> str:
        """transformers' get_chat_template: pick a named template, the default one, or the given string."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if name_or_template is not None:
                return templates.get(name_or_template, name_or_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise DogeExportError(f"The tokenizer in {self.source} has several chat templates "
                                  f"({', '.join(sorted(templates))}) and none named 'default'; "
                                  "pass chat_template=<name>.")
        if name_or_template is not None:
            return name_or_template
        if templates is None:
            raise DogeExportError(f"The tokenizer in {self.source} has no chat template (no 'chat_template' in "
                                  "tokenizer_config.json, no chat_template.jinja). Use the tokenizer of an "
                                  "-Instruct checkpoint, pass chat_template=..., or encode plain text instead.")
        return templates


class IncrementalDecoder:
    """Streaming decode: feed the growing list of ids, get back only the newly completed text.

    Text is held back while it ends in an incomplete UTF-8 sequence (a multi-byte character split
    across tokens), so the pieces returned by `step`, followed by `finish`, add up to `decode(ids)`.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._prefix = 0  # start of the window that is decoded again for context
        self._read = 0  # ids before this have been returned as text

    def step(self, ids: Sequence[int]) -> str:
        """The text completed since the last call; "" while a character is still incomplete."""
        prefix_text = self._decode(ids[self._prefix:self._read])
        new_text = self._decode(ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return new_text[len(prefix_text):]

    def finish(self, ids: Sequence[int]) -> str:
        """Whatever is still held back, incomplete characters included (as U+FFFD, like `decode`)."""
        prefix_text = self._decode(ids[self._prefix:self._read])
        new_text = self._decode(ids[self._prefix:])
        self._prefix = self._read = len(ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _require_tokenizer_json(src: Path) -> Path:
    path = src / "tokenizer.json"
    if not path.is_file():
        what = "no such folder" if not src.is_dir() else f"it holds {sorted(p.name for p in src.iterdir())[:8]}"
        raise DogeExportError(f"No tokenizer.json in {src} ({what}). Expected a Hugging Face tokenizer folder "
                              "(tokenizer.json, tokenizer_config.json); point at the model or export folder.")
    return path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DogeExportError(f"{path} is not valid JSON ({err}); restore it from the model repository.") from err


def _special_tokens(config: dict, special_map: dict) -> dict[str, str]:
    """Named special tokens as strings; tokenizer_config.json wins, special_tokens_map.json fills the gaps."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name) or special_map.get(name)
        if isinstance(value, dict):  # serialized AddedToken
            value = value.get("content")
        if value is not None:
            tokens[name] = value
    return tokens


def _chat_template(src: Path, config: dict) -> str | dict | None:
    """The chat template: chat_template.jinja overrides tokenizer_config.json; a list becomes {name: template}."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template}
    jinja_file = src / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template


def _normalize_messages(messages: Sequence[dict]) -> list[dict]:
    if not messages:
        raise DogeExportError("Cannot apply a chat template to an empty conversation; pass at least one message.")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise DogeExportError(f"Chat messages must be dicts with 'role' and 'content', got {message!r}.")
        chat.append({key: value for key, value in message.items() if value is not None})
    return chat


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era space cleanup); never used for BPE models."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` (assistant-mask marker); renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike jinja's own tojson it does not HTML-escape and takes json.dumps options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """Compile in the same sandboxed environment, with the same helpers, as transformers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise DogeExportError(f"The chat template does not compile: {err} (line {err.lineno}). "
                              "Fix the template or pass another one with chat_template=...") from err
