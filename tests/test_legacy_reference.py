"""Our PyTorch reference of the legacy generations (doge_export.legacy): loading and semantics.

Loading keeps the checkpoint's names, ties lm_head only when absent, keeps router_gate.bias and
refuses anything it cannot place. Semantics are checked against the facts (§2): G1's binary mask
(non-causal uniform rows), G2/G3 without a keep window, G4 with one, per-token vs mixing routers;
and, where a legacy layout is native minus q/k-norm (MHA, identity norms), against transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from legacy_checkpoints import TINY, config_for, one_torch_thread, write_checkpoint  # noqa: F401 (fixture)
from safetensors.torch import load_file, save_file

from doge_export.backends.torch import TorchRunner
from doge_export.errors import DogeExportError
from doge_export.generate import left_pad, prompt_positions
from doge_export.model import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.tensor([[5, 17, 99, 3, 42, 42, 7, 300, 11, 64, 64, 64]])


def _load(tmp_path, generation, **kwargs):
    folder = write_checkpoint(tmp_path / generation, generation, **kwargs)
    return folder, load_model(str(folder)).model


def _logits(model, ids=IDS, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("generation,moe", [("g1-binary-mask", True), ("g2-jan2025", True),
                                            ("g3-feb2025", True), ("g4-jun2025", True)])
def test_state_dict_keeps_the_checkpoints_names(tmp_path, generation, moe):
    folder, model = _load(tmp_path, generation, moe=moe)
    stored = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) - {"lm_head.weight"} == set(stored) - {"lm_head.weight"}
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name


def test_lm_head_is_tied_only_when_absent(tmp_path):
    _, tied = _load(tmp_path, "g2-jan2025")  # no lm_head.weight, no tie key (trained tied)
    assert tied.lm_head.weight is tied.model.word_embed.weight
    folder, untied = _load(tmp_path, "g1-binary-mask")  # tie_word_embeddings false, lm_head stored
    assert untied.lm_head.weight is not untied.model.word_embed.weight
    assert torch.equal(untied.lm_head.weight, load_file(str(folder / "model.safetensors"))["lm_head.weight"])


def test_router_gate_bias_is_kept_and_used(tmp_path):
    folder, model = _load(tmp_path, "g3-feb2025", moe=True, router_bias=True)
    gate = model.model.layers[0].feed_forward.router_gate
    stored = load_file(str(folder / "model.safetensors"))["model.layers.0.feed_forward.router_gate.bias"]
    assert torch.equal(gate.bias, stored)
    before = _logits(model)
    with torch.no_grad():
        gate.bias.zero_()
    assert (before - _logits(model)).abs().max() > 1e-3


def test_missing_unexpected_and_misshapen_tensors_are_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "g2", "g2-jan2025")
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.post_residual.weight")
    tensors["model.layers.0.feed_forward.mlp_scaling"] = torch.ones(64)
    save_file(tensors, str(path))
    with pytest.raises(DogeExportError, match="missing.*post_residual.*unexpected.*mlp_scaling"):
        load_model(str(folder))
    tensors = load_file(str(write_checkpoint(tmp_path / "g4", "g4-jun2025") / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(100, 64)
    save_file(tensors, str(tmp_path / "g4" / "model.safetensors"))
    with pytest.raises(DogeExportError, match="does not fit the g4-jun2025 layout.*up_proj"):
        load_model(str(tmp_path / "g4"))


def test_ratio_masking_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "g3", "g3-feb2025", moe=True)
    _edit_config(folder, dynamic_mask_ratio=0.1)
    with pytest.raises(DogeExportError, match="dynamic_mask_ratio is 0.1"):
        load_model(str(folder))


def test_g1_fully_masked_heads_attend_to_the_future(tmp_path):
    """A head with A < 0 masks every key: its rows are uniform over the whole prompt, so a later
    token changes earlier logits. With every A >= 0 it is plain causal attention."""
    _, model = _load(tmp_path, "g1-binary-mask")
    assert any((layer.attn.A < 0).any() for layer in model.model.layers)
    changed = IDS.clone()
    changed[0, -1] = 1
    assert (_logits(model)[0, :-1] - _logits(model, changed)[0, :-1]).abs().max() > 1e-3
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.A.abs_()
    assert (_logits(model)[0, :-1] - _logits(model, changed)[0, :-1]).abs().max() == 0.0


@pytest.mark.parametrize("generation,windowed", [("g3-feb2025", False), ("g4-jun2025", True)])
def test_keep_window_applies_to_g4_only(tmp_path, generation, windowed):
    folder = write_checkpoint(tmp_path / generation, generation, moe=True)
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = []
    for window in (64, 4):
        _edit_config(folder, keep_window_size=window)
        logits.append(_logits(load_model(str(folder)).model, ids))
    assert ((logits[0] - logits[1]).abs().max() > 1e-3) == windowed


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("generation,mixes", [("g2-jan2025", False), ("g3-feb2025", True), ("g4-jun2025", True)])
def test_which_routers_mix_tokens_across_the_batch(tmp_path, generation, mixes):
    _, model = _load(tmp_path, generation, moe=True)
    other = torch.randint(3, 512, IDS.shape, generator=torch.Generator().manual_seed(1))
    alone = _logits(model)[0]
    batched = _logits(model, torch.cat([IDS, other]))[0]
    assert ((alone - batched).abs().max() > 1e-4) == mixes


def _native_mha(seed: int, **config):
    from doge_export.model import make_config, randomize_
    from transformers import DogeForCausalLM

    raw = {"model_type": "doge", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 64, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
           "pad_token_id": 2, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
           **config}
    torch.manual_seed(seed)
    model = DogeForCausalLM(make_config(raw))
    randomize_(model, seed=seed)
    for layer in model.model.layers:  # native minus q/k-norm
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    return model.eval()


G2_RENAMES = {"model.embed_tokens": "model.word_embed", "model.norm": "model.final_layernorm",
              "input_layernorm": "pre_layernorm", "input_residual": "pre_residual.weight",
              "post_attention_layernorm": "post_layernorm", ".mlp.": ".feed_forward.",
              "post_attention_residual": "post_residual.weight"}


@pytest.mark.parametrize("generation", ["g4-jun2025", "g3-feb2025"])
def test_mha_legacy_equals_transformers_without_qk_norm(tmp_path, generation):
    """With MHA (A per head = per KV head) and identity q/k norms, G4 is native with its keep window,
    G3 is native with no keep window: our reference must give transformers' logits, decoding past
    the window and past max_position_embeddings (dynamic NTK), dense and MoE alike."""
    moe = {"is_moe": True, "num_experts": 64, "num_experts_per_tok": 4}
    window = 16 if generation == "g4-jun2025" else 10**6
    native = _native_mha(3, keep_window_size=window, **moe)
    tensors = {k: v.contiguous() for k, v in native.state_dict().items() if k != "lm_head.weight"}
    if generation == "g3-feb2025":
        for old, new in G2_RENAMES.items():
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
    folder = tmp_path / generation
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {**config_for(generation, {**TINY, "num_key_value_heads": 4}, True), "keep_window_size": 16}
    (folder / "config.json").write_text(json.dumps(config))
    legacy = load_model(str(folder)).model
    prompts = [[int(t) for t in np.random.default_rng(0).integers(3, 512, n)] for n in (30, 9)]
    worst = _lockstep_diff(legacy, native, prompts, steps=60)
    assert worst <= 2e-5, worst


def _lockstep_diff(model_a, model_b, prompts, steps: int) -> float:
    from doge_export.export_onnx import ExportConfig, model_info

    info = model_info(model_b.config, ExportConfig())
    a, b = TorchRunner(model_a, info, stable_topk=True), TorchRunner(model_b, info, stable_topk=True)
    ids, mask = left_pad(prompts, 2)
    pos = prompt_positions(mask)
    la, lb = a.prefill(ids, mask, pos), b.prefill(ids, mask, pos)
    worst = float(np.abs(la - lb).max())
    positions = pos[:, -1:]
    for _ in range(steps):
        tokens, positions = lb.argmax(-1)[:, None], positions + 1
        la, lb = a.step(tokens, positions), b.step(tokens, positions)
        worst = max(worst, float(np.abs(la - lb).max()))
    return worst
