"""fp16 / bf16 graphs against transformers run in the same dtype (CPU), and the fp16 mask guard.

Executor: onnx's reference evaluator (backends/onnx_ref.py), which rounds in the dtypes the graph
declares, as TensorRT does; ONNX Runtime's CPU provider has no bf16 kernels and runs fp16 through
inserted fp32 casts. Model: the tiny presets, made peaked (see `peaked`).
"""

import copy

import numpy as np
import onnx
import pytest
import torch
from transformers import DogeForCausalLM

from doge_export import precision
from doge_export.artifact import export_artifact
from doge_export.backends.onnx_ref import OnnxReferenceRunner
from doge_export.backends.torch import TorchRunner
from doge_export.errors import DogeExportError
from doge_export.export_onnx import ExportConfig
from doge_export.model import LoadedModel, load_model, make_config, preset_config, randomize_
from doge_export.runtime import open_runner
from doge_export.validate import ValidateConfig, failures, validate_runner
from doge_export.wrappers import softmax_fp32

HALF = ["float16", "bfloat16"]


def peaked(preset: str, seed: int = 0, a_scale: float = 0.5) -> LoadedModel:
    """A tiny preset made peaked, so that greedy decoding has margins a half dtype can resolve.

    The plain presets' top-2 logit gap falls below one bf16 ulp (exact ties too) a few times per
    hundred steps, where two correct bf16 runs may pick different tokens. Here lm_head (untied)
    maps each token's embedding to a successor (a fixed permutation, gain 4), the residual scales
    are doubled so the embedding carries through, and A is scaled by `a_scale`: halved, w =
    exp(A*softplus(dt)) stays far inside fp16; scaled up it overflows fp16 and transformers itself
    returns NaN (test_fp16_overflow_in_the_reference_is_named_not_matched). Measured over the three
    validation cases x 64 greedy steps: top-2 gap >= 1.4 (11 bf16 ulps), max |logit| 30.
    """
    config = make_config({**preset_config(preset), "tie_word_embeddings": False})
    torch.manual_seed(seed)
    model = DogeForCausalLM(config)
    randomize_(model, seed=seed)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        successor = torch.randperm(embed.shape[0], generator=torch.Generator().manual_seed(seed))
        model.lm_head.weight[successor] = embed / embed.norm(dim=1, keepdim=True) * 4.0
        for layer in model.model.layers:
            layer.self_attn.A.mul_(a_scale)
            layer.input_residual.mul_(2.0)
            layer.post_attention_residual.mul_(2.0)
    model.config._attn_implementation = "eager"
    return LoadedModel(model.float().eval(), f"random:{preset}", "native", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def make(preset: str, dtype: str, a_scale: float = 0.5):
        if (preset, dtype, a_scale) not in cache:
            loaded = peaked(preset, a_scale=a_scale)
            out = tmp_path_factory.mktemp("half") / f"{preset}-{dtype}-{a_scale}"
            cache[preset, dtype, a_scale] = (
                export_artifact(loaded, out, ExportConfig(dtype=dtype), log=lambda *a: None), loaded.model)
        return cache[preset, dtype, a_scale]

    return make


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_graphs_match_transformers_in_the_same_dtype(exported, preset, dtype):
    """Prefill + 16 teacher-forced steps within the dtype's tolerance; 64 greedy tokens identical
    (no near tie either), batch 1 inside and past the keep window (24 > 16 slots) and a left-padded
    batch of 3."""
    manifest, model = exported(preset, dtype)
    assert precision.model_dtype(model) == dtype
    reference = TorchRunner(model, manifest.info, stable_topk=True)
    cases = ((12, 4, 7),) if preset == "tiny-moe" else None  # MoE: the batch-mixing case; dense: all three
    with OnnxReferenceRunner(manifest) as runner:
        report = validate_runner(runner, reference, ValidateConfig(prompt_lengths=cases, greedy_steps=64),
                                 log=lambda *a: None)
    worst = max(c["max_abs_diff"] for case in report["cases"] for c in case["checks"] if "logits" in c["output"])
    print(f"{preset} {dtype}: max|dlogits| {worst:.4f} (tol {report['atol']}), greedy 64 identical: "
          f"{all(c['greedy_identical'] for c in report['cases'])}")
    assert report["passed"], report
    assert report["atol"] == precision.TOLERANCES[dtype] and worst <= report["atol"]
    assert all(case["greedy_steps"] == 64 and case["greedy_identical"] for case in report["cases"])


def test_fp16_overflow_in_the_reference_is_named_not_matched(exported):
    """A scaled up: transformers in fp16 overflows (w = exp(A*softplus(dt)) > 65504) and returns NaN;
    the graph stays finite (its softmax clips the +inf bias), and validation says why it fails."""
    manifest, model = exported("tiny", "float16", a_scale=10.0)
    cfg = ValidateConfig(prompt_lengths=((12, 4, 7),), decode_steps=16, greedy_steps=4)
    with OnnxReferenceRunner(manifest) as runner:
        report = validate_runner(runner, TorchRunner(model, manifest.info, stable_topk=True), cfg, log=lambda *a: None)
        assert np.isfinite(runner.step(np.array([[5], [6], [7]]), np.array([[40], [40], [40]]))).all()
    [case] = report["cases"]
    assert not case["reference_finite"] and not report["passed"]
    assert any("non-finite logits (float16 overflow inside transformers)" in f for f in failures(report))


def test_export_validates_bf16_and_records_the_precision(tmp_path):
    """What `doge-export onnx --dtype bf16` does: export, validate (reference evaluator vs
    transformers in bf16, and the bf16-vs-fp32 spread), record it all in the manifest."""
    from doge_export.commands import validate_manifest
    from doge_export.manifest import load_manifest

    out, loaded = tmp_path / "bf16", load_model("random:tiny")
    export_artifact(loaded, out, ExportConfig(dtype="bf16"), log=lambda *a: None,
                    validate=lambda manifest: validate_manifest(manifest, loaded.model, lambda *a: None))
    data = load_manifest(out).data
    record = data["precision"]
    assert record["dtype"] == "bfloat16" and record["state"]["bias"] == "bfloat16"
    assert record["tolerance"]["max_abs_logits"] == 1.0 and "bf16 itself costs" in record["tolerance"]["why"]
    report = data["validation"]["onnx-reference"]
    assert report["passed"] and report["dtype"] == "bfloat16" and report["reference_spread"]["max_abs_logits"] > 0
    spreads = report["reference_spread"]["per_case"]  # each case's tolerance: never below its own spread
    assert len(spreads) == len(report["cases"]) and max(spreads) == report["reference_spread"]["max_abs_logits"]
    for case, spread in zip(report["cases"], spreads):
        assert [c["tol"] for c in case["checks"] if c["output"] == "prefill.logits"] == [max(1.0, spread)]
    step = onnx.load(str(out / "step.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(step.graph.input) + list(step.graph.output)}
    assert types["key.0"] == types["bias.0"] == types["logits"] == onnx.TensorProto.BFLOAT16
    assert types["position.0"] == types["slot.0"] == onnx.TensorProto.INT64


def test_onnxruntime_refuses_bf16_and_points_elsewhere(exported):
    manifest, _ = exported("tiny", "bfloat16")
    with pytest.raises(DogeExportError, match=r"no bfloat16 kernels .*--backend onnx-reference"):
        open_runner(manifest, "onnxruntime")


def test_fp16_fully_masked_rows_stay_finite():
    """transformers adds finfo(fp16).min to the fp16 scores: a score below -16 overflows to -inf,
    and a row with no visible key (a left-padding query) becomes NaN. The graph's softmax clips
    the fp32 copy first: NaN-free, and unchanged in every row that has a key to attend to."""
    minv = torch.finfo(torch.float16).min
    scores = torch.tensor([[-20.0, -30.0, 5.0], [-20.0, -30.0, -17.0]], dtype=torch.float16)
    mask = torch.tensor([[minv, minv, 0.0], [minv, minv, minv]], dtype=torch.float16)
    summed = scores + mask  # as transformers' eager attention computes it
    reference = torch.softmax(summed.float(), dim=-1)
    assert torch.isinf(summed).any() and torch.isnan(reference[1]).all()
    ours = softmax_fp32(summed)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[0], reference[0])


def test_fp32_softmax_is_traced_as_before():
    x = torch.randn(2, 5)
    assert torch.equal(softmax_fp32(x), torch.softmax(x, dim=-1, dtype=torch.float32))


def test_cast_model_loads_like_from_pretrained(tmp_path):
    """from_pretrained(dtype=fp16) keeps the rotary inv_freq in fp32; so does cast_model."""
    from transformers import DogeForCausalLM

    model = load_model("random:tiny").model
    model.save_pretrained(tmp_path)
    loaded = DogeForCausalLM.from_pretrained(tmp_path, dtype=torch.float16, attn_implementation="eager").eval()
    cast = precision.cast_model(copy.deepcopy(model), "fp16")
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([[5, 9, 100, 7]])
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, loaded(ids).logits)


def test_dtype_names():
    assert precision.dtype_name("fp16") == "float16" and precision.dtype_name("bfloat16") == "bfloat16"
    with pytest.raises(DogeExportError, match="unknown dtype 'int8'"):
        ExportConfig(dtype="int8")
    assert np.isclose(precision.tolerance("bf16"), 1.0)
