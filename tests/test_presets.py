"""Every published Doge shape as a `random:<name>` preset (facts §3), exported at reduced depth.

Each preset's config is checked against the published numbers; each exports at 2 layers and ONNX
Runtime matches transformers on a short run (batch 1 and a padded batch of 2). The graphs use
TopK only for the CDMoE router (k = sqrt(experts) and experts per token), never for the keep
window: Doge-40M's window of 4096 is over TensorRT's TopK limit of 3840 and needs no TopK at all.
The real tokenizer rides along in an artifact: the ONNX Runtime path's ids equal transformers'.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from legacy_checkpoints import one_torch_thread  # noqa: F401 (fixture)
from onnx import numpy_helper

from doge_export.artifact import export_artifact
from doge_export.backends.ort import OrtRunner
from doge_export.backends.torch import TorchRunner
from doge_export.export_onnx import ExportConfig
from doge_export.model import LoadedModel, make_config, preset_config, preset_names, randomize_
from doge_export.validate import ValidateConfig, failures, validate_runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REF_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "doge-tokenizer"
TRT_TOPK_MAX = 3840
# vocab, hidden, inter, layers, heads, kv, max_pos, rope (type, theta), window, experts, per_tok, bos/eos/pad
PUBLISHED = {
    "doge-20m": (32768, 256, 512, 8, 2, 1, 2048, ("dynamic", 1e4), 2048, None, None, (0, 1, 2)),
    "doge-60m": (32768, 512, 1024, 16, 4, 2, 2048, ("dynamic", 1e4), 2048, None, None, (0, 1, 2)),
    "doge-160m": (32768, 768, 1536, 24, 6, 3, 2048, ("dynamic", 1e4), 2048, None, None, (0, 1, 2)),
    "doge-320m": (32768, 1024, 2048, 32, 8, 4, 2048, ("dynamic", 1e4), 2048, None, None, (0, 1, 2)),
    "doge-20m-moe": (32768, 256, 512, 8, 2, 1, 2048, ("dynamic", 1e4), 2048, 1024, 16, (0, 1, 2)),
    "doge-120m-moe": (32768, 512, 1024, 16, 4, 2, 2048, ("dynamic", 1e4), 2048, 4096, 32, (0, 1, 2)),
    "doge-40m": (128256, 256, 1024, 8, 2, 1, 4096, ("default", 4e4), 4096, None, None, (128000, 128001, 128001)),
    "doge-40m-moe": (128256, 256, 768, 8, 2, 1, 2048, ("default", 1e4), 2048, 1024, 8, (128000, 128001, 128001)),
}


def reduced(name: str, layers: int = 2, seed: int = 0) -> LoadedModel:
    """The preset at `layers` layers, with the preset's seeded random weights."""
    from transformers import DogeForCausalLM

    raw = {**preset_config(name), "num_hidden_layers": layers}
    raw.pop("doge_export_init_gain", None)
    torch.manual_seed(seed)
    model = DogeForCausalLM(make_config(raw))
    randomize_(model, seed=seed)
    return LoadedModel(model.float().eval(), f"random:{name}", "native", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def make(name: str, tokenizer: Path | None = None):
        if (name, tokenizer) not in cache:
            loaded = reduced(name)
            out = tmp_path_factory.mktemp(name) / "artifact"
            manifest = export_artifact(loaded, out, ExportConfig(max_context=64, max_prompt=32),
                                       tokenizer_dir=tokenizer, log=lambda *a: None)
            cache[name, tokenizer] = (manifest, loaded)
        return cache[name, tokenizer]

    return make


def test_every_published_shape_is_a_preset():
    assert set(PUBLISHED) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_the_published_config(name):
    vocab, hidden, inter, layers, heads, kv, max_pos, rope, window, experts, per_tok, ids = PUBLISHED[name]
    c = make_config({k: v for k, v in preset_config(name).items() if k != "doge_export_init_gain"})
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (vocab, hidden, inter, layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads) == (heads, kv, 128)
    assert (c.max_position_embeddings, c.keep_window_size) == (max_pos, window)
    assert (c.rope_parameters["rope_type"], c.rope_parameters["rope_theta"]) == rope
    assert c.is_moe == (experts is not None)
    if experts:
        assert (c.num_experts, c.num_experts_per_tok) == (experts, per_tok)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == ids
    assert c.tie_word_embeddings


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_exports_at_reduced_depth_and_matches_transformers(exported, name):
    manifest, loaded = exported(name)
    cfg = ValidateConfig(prompt_lengths=((12,), (20, 7)), decode_steps=8, greedy_steps=8)
    with OrtRunner(manifest) as runner:
        report = validate_runner(runner, TorchRunner(loaded.model, manifest.info, stable_topk=True), cfg,
                                 log=lambda *a: None)
    assert report["passed"], failures(report)
    assert manifest.data["generation"]["name"] == "native"


def topk_ks(path: Path) -> list[int]:
    """The k of every TopK node in an ONNX graph (k is a constant in our graphs)."""
    model = onnx.load(str(path), load_external_data=False)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_location != 1}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return [int(np.asarray(consts[n.input[1]]).reshape(-1)[0]) for n in model.graph.node if n.op_type == "TopK"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_topk_is_only_the_router_and_within_tensorrt_limits(exported, name):
    manifest, _ = exported(name)
    experts, per_tok = PUBLISHED[name][9:11]
    expected = [] if experts is None else [math.isqrt(experts), per_tok] * 2  # 2 layers
    for graph in ("prefill", "step"):
        ks = topk_ks(manifest.graph_file(graph))
        assert sorted(ks) == sorted(expected), (graph, ks)
        assert all(k <= TRT_TOPK_MAX for k in ks)
    recorded = manifest.data["generation"]["topk"]
    assert recorded["moe_router"] == ([] if experts is None else [math.isqrt(experts), per_tok])
    assert "no TopK" in recorded["keep_window"]
    if name == "doge-40m":
        assert manifest.info.keep_window_size == 4096 > TRT_TOPK_MAX


@pytest.fixture(scope="module")
def tokenized(exported):
    if not REF_TOKENIZER.is_dir():
        pytest.skip(f"reference tokenizer folder {REF_TOKENIZER} is absent")
    transformers = pytest.importorskip("transformers")
    manifest, _ = exported("doge-20m", tokenizer=REF_TOKENIZER)
    return manifest, transformers.AutoTokenizer.from_pretrained(str(REF_TOKENIZER))


def test_artifact_carries_the_tokenizer_and_names_ids_and_template(tokenized):
    manifest, hf = tokenized
    tok = manifest.data["tokenizer"]
    assert tok["files"] == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in tok["files"]:
        assert (manifest.folder / name).read_bytes() == (REF_TOKENIZER / name).read_bytes()
        assert name in manifest.data["files"]  # checksummed
    assert (tok["bos_token_id"], tok["eos_token_id"], tok["pad_token_id"]) == (0, 1, 2)
    assert tok["padding_side"] == "left"
    import hashlib

    assert tok["chat_template"] == {"file": "tokenizer_config.json",
                                    "sha256": hashlib.sha256(hf.chat_template.encode()).hexdigest()}
    assert manifest.info.eos_token_id == (1,)  # generation stops on <|end_of_text|>


def test_ort_path_ids_equal_transformers(tokenized):
    """The runtime's tokenizer (from the artifact folder, no torch/transformers) vs transformers on
    the source tokenizer: 20 varied strings, 3 conversations, and the CLI's --chat prompt."""
    from test_text import CONVERSATIONS, STRINGS

    from doge_export.runtime import load_tokenizer, prompts_to_ids

    manifest, hf = tokenized
    assert len(STRINGS) == 20 and len(CONVERSATIONS) == 3
    ids, _ = prompts_to_ids(manifest, STRINGS, [], chat=False, system=None)
    assert ids == [hf(s)["input_ids"] for s in STRINGS]
    runtime_tok = load_tokenizer(manifest)
    for messages in CONVERSATIONS.values():
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert runtime_tok.apply_chat_template(messages) == want
    chat, _ = prompts_to_ids(manifest, ["Hi, how are you doing today?"], [], chat=True, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, how are you doing today?"}]
    assert chat[0] == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_generation_stops_on_the_eos_id(tokenized):
    """generate() stops a row at the artifact's eos (1): the eos is fed once, then pad, as transformers'
    generate() does while the other row goes on."""
    from doge_export.backends.base import Runner
    from doge_export.generate import GenerateConfig, generate

    manifest, _ = tokenized

    class Scripted(Runner):  # emits 7, 1, 9, 9, ... (row 0) and 7, 8, 9, ... (row 1)
        def __init__(self, info):
            super().__init__(info)
            self.n, self.fed = 0, []

        def _logits(self):
            out = np.zeros((2, self.info.vocab_size), np.float32)
            out[0, [7, 1, 9][min(self.n, 2)]] = out[1, 7 + self.n] = 1.0
            self.n += 1
            return out

        def _prefill(self, input_ids, attention_mask, position_ids):
            return self._logits()

        def _step(self, input_ids, position_ids):
            self.fed.append(input_ids[:, 0].tolist())
            return self._logits()

    runner = Scripted(manifest.info)
    result = generate(runner, [[5, 6], [5]], GenerateConfig(max_new_tokens=4))
    assert result.tokens[0] == [7, 1] and result.tokens[1] == [7, 8, 9, 10]
    assert [fed[0] for fed in runner.fed] == [7, 1] + [manifest.info.pad_token_id] * (len(runner.fed) - 2)
