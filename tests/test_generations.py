"""Generation detection from weight names and shapes (facts §2, §7.1), on every layout.

Each layout is a random-weight checkpoint written with that generation's own tensor names and
config keys (legacy_checkpoints.py); unknown and unsupported layouts are refused with evidence.
"""

from __future__ import annotations

import json

import pytest
from legacy_checkpoints import TINY, config_for, tensor_shapes, write_checkpoint

from doge_export.errors import DogeExportError
from doge_export.generations import SUPPORTED, checkpoint_shapes, detect_generation, require_supported
from doge_export.inspect_cmd import describe_checkpoint

LAYOUTS = [  # (generation, moe, router_bias, evidence fragment)
    ("g1-binary-mask", False, False, "pre_sequence_layernorm"),
    ("g1-binary-mask", True, False, "multi-head product-key"),
    ("g2-jan2025", False, False, "dense MLP"),
    ("g2-jan2025", True, False, "multi-head product-key"),
    ("g3-feb2025", True, False, "single CDMoE router (router_gate)"),
    ("g3-feb2025", True, True, "router_gate.bias"),
    ("g4-jun2025", False, False, "q_norm/k_norm absent"),
    ("g4-jun2025", True, False, "single CDMoE router"),
]


def _detect(generation, moe=False, router_bias=False, lm_head=False, **edits):
    config = {**config_for(generation, TINY, moe), **edits}
    return detect_generation(tensor_shapes(generation, TINY, moe, router_bias, lm_head), config)


@pytest.mark.parametrize("generation,moe,router_bias,fragment", LAYOUTS)
def test_each_legacy_layout_is_detected_with_evidence(tmp_path, generation, moe, router_bias, fragment):
    folder = write_checkpoint(tmp_path / "ckpt", generation, moe=moe, router_bias=router_bias)
    shapes, safetensors = checkpoint_shapes(folder, allow_pickle=False)
    detection = detect_generation(shapes, json.loads((folder / "config.json").read_text()))
    assert safetensors and detection.generation == generation
    assert any(fragment in e for e in detection.evidence), detection.evidence
    assert any("A shape [4]" in e for e in detection.evidence), detection.evidence
    require_supported(detection)  # every one of these exports


def test_native_layout_is_detected():
    from doge_export.model import random_model

    model = random_model("tiny").model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    detection = detect_generation(shapes, model.config.to_dict())
    assert detection.generation == "native"
    assert any("q_norm/k_norm present" in e for e in detection.evidence)
    assert any("self_attn.A shape [2]" in e for e in detection.evidence)  # per KV head


def test_tied_lm_head_is_part_of_the_evidence():
    assert any("tied" in e for e in _detect("g2-jan2025").evidence)
    assert not any("tied" in e for e in _detect("g2-jan2025", lm_head=True).evidence)


def test_g0_inner_function_attention_is_detected_and_refused():
    shapes = {"model.layers.0.in_attn_layernorm.weight": (64,), "model.layers.0.attn.q_proj.weight": (64, 64),
              "model.layers.0.attn.v_queries.weight": (16, 64), "model.layers.0.attn.v_embed.weight": (256, 64)}
    detection = detect_generation(shapes, {"num_attention_heads": 4})
    assert detection.generation == "g0-inner-func" and "g0-inner-func" not in SUPPORTED
    with pytest.raises(DogeExportError, match="inner-function.*cannot be exported.*retrieved by a top-k"):
        require_supported(detection)


def test_unknown_layout_is_refused_with_evidence():
    shapes = {"transformer.h.0.attn.c_attn.weight": (64, 192), "transformer.wte.weight": (512, 64)}
    with pytest.raises(DogeExportError, match="unknown Doge weight layout.*evidence: none.*transformer.h.0"):
        detect_generation(shapes, {"num_attention_heads": 4})


@pytest.mark.parametrize("generation", ["g2-jan2025", "g4-jun2025"])
def test_shapes_that_contradict_the_names_are_refused(generation):
    """A per KV head ([2]) under G2 names, or q_norm-less native names with A [G]: no known generation."""
    shapes = tensor_shapes(generation, TINY, False, False, False)
    shapes = {k: ((2,) if k.endswith(".A") else s) for k, s in shapes.items()}
    with pytest.raises(DogeExportError, match=r"unknown Doge weight layout.*A shape \[2\]"):
        detect_generation(shapes, config_for(generation, TINY, False))


def test_g1_names_with_grouped_heads_are_refused():
    with pytest.raises(DogeExportError, match="expected MHA"):
        _detect("g1-binary-mask", num_key_value_heads=2)


def test_g3_queries_proj_development_router_is_refused():
    shapes = tensor_shapes("g3-feb2025", TINY, False, False, False)
    shapes["model.layers.0.feed_forward.queries_proj.weight"] = (16, 64)
    shapes["model.layers.0.feed_forward.keys"] = (2, 8, 8)
    with pytest.raises(DogeExportError, match="queries_proj.*2025-03-02.*not supported"):
        detect_generation(shapes, config_for("g3-feb2025", TINY, True))


def test_inspect_prints_the_generation_and_why(tmp_path):
    folder = write_checkpoint(tmp_path / "g3", "g3-feb2025", moe=True, router_bias=True)
    data, text = describe_checkpoint(str(folder))
    assert data["generation"] == "g3-feb2025" and data["supported"]
    assert "generation  g3-feb2025" in text and "exportable  yes" in text
    assert "router_gate.bias" in text and "per query head" in text  # evidence and what it changes


def test_inspect_refuses_an_unknown_layout_with_its_evidence(tmp_path):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "doge", "num_attention_heads": 4}))
    save_file({"model.layers.0.pre_layernorm.weight": torch.ones(64), "model.layers.0.self_attn.A": torch.ones(2),
               "model.layers.0.self_attn.dt_proj.weight": torch.ones(2, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DogeExportError, match=r"unknown Doge weight layout.*pre_layernorm.*A shape \[2\]"):
        describe_checkpoint(str(tmp_path))
