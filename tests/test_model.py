"""Loading checkpoints and presets; the reference runner drives transformers as generate() does."""

from __future__ import annotations

import pytest
import torch
from conftest import save_checkpoint
from parity import lockstep, varied_prompts

from doge_export.backends.ort import OrtRunner
from doge_export.backends.torch import TorchRunner
from doge_export.errors import DogeExportError
from doge_export.generate import greedy_tokens
from doge_export.model import load_model, preset_names


def weights_digest(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_presets_cover_the_published_shapes():
    for name in ("doge-20m", "doge-60m", "doge-160m", "doge-320m", "doge-20m-moe", "doge-120m-moe",
                 "doge-40m", "doge-40m-moe", "tiny", "tiny-moe"):
        assert name in preset_names()


def test_random_presets_are_seeded_and_not_degenerate():
    a, b = load_model("random:doge-20m", seed=1), load_model("random:doge-20m", seed=1)
    c = load_model("random:doge-20m", seed=2)
    assert weights_digest(a.model) == weights_digest(b.model) != weights_digest(c.model)
    layer = a.model.model.layers[0]
    assert layer.self_attn.A.abs().min() > 0  # a live dynamic mask (A = 0 is the default init)
    assert layer.input_residual.std() > 0.1 and layer.input_layernorm.weight.std() > 0.1
    with torch.no_grad():
        probs = a.model(torch.arange(3, 40)[None]).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 0.1  # peaked, not near-uniform (1/32768)


def test_unknown_preset():
    with pytest.raises(DogeExportError, match="random:doge-20m"):
        load_model("random:doge-7b")


def test_config_override_and_unknown_key():
    assert load_model("random:tiny", overrides={"keep_window_size": 8}).config.keep_window_size == 8
    with pytest.raises(DogeExportError, match="no_such_key"):
        load_model("random:tiny", overrides={"no_such_key": 1})


def test_hub_id_offline_says_how_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DogeExportError, match="huggingface-cli download SmallDoge/Doge-20M"):
        load_model("SmallDoge/Doge-20M")


def test_local_tied_checkpoint_exports_with_parity(hf_checkpoint, tmp_path):
    """A folder whose safetensors has no lm_head is tied (never a random lm_head)."""
    from doge_export.artifact import export_artifact
    from doge_export.export_onnx import ExportConfig

    loaded = load_model(str(hf_checkpoint))
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
    assert weights_digest(loaded.model) == weights_digest(load_model("random:tiny", seed=4).model)
    manifest = export_artifact(loaded, tmp_path / "a", ExportConfig(), log=lambda *a: None)
    with OrtRunner(manifest) as runner:
        result = lockstep(runner, TorchRunner(loaded.model, manifest.info, stable_topk=True),
                          varied_prompts((20, 6), 512, seed=1), 32)
    assert result.max_step_diff <= 1e-4 and result.first_divergence is None


def test_untied_checkpoint(tmp_path):
    from doge_export.artifact import export_artifact
    from doge_export.export_onnx import ExportConfig

    loaded = load_model("random:tiny", seed=8, overrides={"tie_word_embeddings": False})
    with torch.no_grad():
        loaded.model.lm_head.weight.normal_(0, 0.3)
    folder = save_checkpoint(loaded, tmp_path / "untied")
    again = load_model(str(folder))
    assert torch.equal(again.model.lm_head.weight, loaded.model.lm_head.weight)
    manifest = export_artifact(again, tmp_path / "a", ExportConfig(), log=lambda *a: None)
    with OrtRunner(manifest) as runner:
        result = lockstep(runner, TorchRunner(again.model, manifest.info, stable_topk=True),
                          varied_prompts((12,), 512, seed=2), 16)
    assert result.max_step_diff <= 1e-4 and result.first_divergence is None


def test_pickle_checkpoint_loads_when_allowed(pickle_checkpoint):
    with pytest.raises(DogeExportError, match="--allow-pickle"):
        load_model(str(pickle_checkpoint))
    loaded = load_model(str(pickle_checkpoint), allow_pickle=True)
    assert weights_digest(loaded.model) == pytest.approx(weights_digest(load_model("random:tiny", seed=4).model))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_torch_runner_is_what_generate_does(preset):
    """The reference runner's greedy tokens equal transformers' own generate(), padded batch too."""
    loaded = load_model(f"random:{preset}", seed=7)
    info = load_info(loaded)
    prompts = [[5, 17, 99, 3, 250, 41], [7, 300]]
    runner_tokens = greedy_tokens(TorchRunner(loaded.model, info), prompts, 20)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41], [2, 2, 2, 2, 7, 300]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                    eos_token_id=None, pad_token_id=2)
    assert runner_tokens == out[:, 6:].tolist()


def load_info(loaded):
    from doge_export.export_onnx import ExportConfig, model_info

    return model_info(loaded.config, ExportConfig())


def test_greedy_streams_of_presets_differ_by_seed():
    info = None
    streams = []
    for seed in (1, 2):
        loaded = load_model("random:tiny", seed=seed)
        info = info or load_info(loaded)
        streams.append(greedy_tokens(TorchRunner(loaded.model, info), [[5, 6, 7]], 8)[0])
    assert streams[0] != streams[1]
