"""Graph dtypes (fp32, fp16, bf16): names, the reference model in that dtype, and parity tolerances.

Half-precision artifacts (DESIGN §3 "Precision") run in the dtype of the ONNX graph, because
TensorRT is strongly typed. Decisions, recorded in every manifest under "precision":
- Activations, weights, the state's key/value rows and the logits are in the graph dtype, as in
  transformers run in that dtype (its lm_head returns fp16/bf16 logits).
- The state's bias is in the graph dtype too: transformers computes w = exp(A*softplus(dt)) in the
  activation dtype, so w is already rounded to it and fp32 storage would hold the same numbers.
  Empty slots hold that dtype's minimum; positions stay int64.
- fp32 islands, as in transformers: RMSNorm variance, softmax over (scores + mask), RoPE
  frequencies (cos/sin cast once); and, so that each op rounds once as PyTorch's CPU kernels do,
  softplus, exp, silu and the CDMoE routing softmax.
- Masks: the bias is added to the scores in the activation dtype (as transformers does); in fp16
  the fp32 copy of the sum is clipped to +-65504 before the softmax, so fp16 min + score, which
  overflows to -inf, can never turn a fully masked (left-padding) row into NaN.
Only torch-free helpers live at module level; `cast_model` imports torch when called.
"""

from __future__ import annotations

from .errors import DogeExportError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SHORT = {v: k for k, v in DTYPES.items()}

# max |logit diff| allowed against transformers run in the same dtype, on prefill and every step.
# Half precision: two correct implementations differ by an ulp or two per layer (accumulation order,
# fusion, the step's split of attention into cached slots + own token), and logits are rounded to
# the dtype. The bound is what the dtype itself costs: transformers in fp16/bf16 vs fp32 on the same
# weights (the report's "reference_spread") measured 1.07-1.20 on the peaked tiny models
# (|logit| <= 32; tests/test_half.py), while the graphs' worst deviation there was 0.19 (fp16,
# 12 ulps) and 0.63 (bf16, 5 ulps). Each tolerance sits below that spread, with margin over that.
# Long contexts cost the dtype more: a validation case's tolerance is never below the spread
# measured on that very case (validate.case_spreads; bf16 Doge-20M at 2048 tokens: 2.26).
TOLERANCES = {"float32": 1e-4, "float16": 0.5, "bfloat16": 1.0}
# fp32 adds a term relative to the reference's largest |value| (numpy's allclose convention), for
# logits and the prefill's keys and values: summation order drifts with context length, and the
# reference itself drifts most. At a 2048-token prompt on Doge-20M (|logit| <= 15; 5 prompts, 32
# steps each, 2026-12-02) transformers in fp32 was up to 2.5e-4 (prefill) and 4.0e-4 (steps) away
# from the same weights run in fp64, our fp32 graphs up to 6.9e-5 and 1.1e-4, and the two fp32
# runs up to 2.3e-4 and 3.2e-4 apart (keys 1.2e-4, |key| <= 6.5). The tests hold the bare 1e-4 on
# their short configs (tests/test_parity.py); validation of long contexts needs this term.
RELATIVE_TOLERANCES = {"float32": 3e-5, "float16": 0.0, "bfloat16": 0.0}
TOLERANCE_WHY = {
    "float32": "DESIGN §7: fp32 ONNX Runtime vs PyTorch max |dlogits| <= 1e-4, plus 3e-5 x max|reference| "
               "(logits; prefill keys and values) for the summation-order drift of long contexts: at 2048 tokens "
               "on Doge-20M transformers fp32 is up to 4.0e-4 from fp64, the graphs 1.1e-4, the two 3.2e-4 apart",
    "float16": "below what fp16 itself costs (transformers fp16 vs fp32, same weights: 1.2 on the peaked "
               "tiny models, |logit| <= 32) and 2.6x the worst measured graph deviation there (0.19, 12 ulps); "
               "per case never below what it costs there (reference_spread.per_case)",
    "bfloat16": "below what bf16 itself costs (transformers bf16 vs fp32, same weights: 1.07-1.19 on the "
                "peaked tiny models, |logit| <= 32) and 1.6x the worst measured graph deviation there (0.63, 5 ulps); "
                "per case never below what it costs there (reference_spread.per_case: 2.26 for Doge-20M at "
                "2048 tokens, where the graph was 1.26 from transformers in bf16)",
}


def dtype_name(dtype: str) -> str:
    """'fp16' / 'float16' -> 'float16' (the numpy/ONNX name used in the spec and the manifest)."""
    name = DTYPES.get(dtype, dtype)
    if name not in SHORT:
        raise DogeExportError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return name


def tolerance(dtype: str) -> float:
    return TOLERANCES[dtype_name(dtype)]


def relative_tolerance(dtype: str) -> float:
    return RELATIVE_TOLERANCES[dtype_name(dtype)]


def precision_record(dtype: str) -> dict:
    """The manifest's "precision" section: what runs in which dtype, and why the tolerance."""
    name = dtype_name(dtype)
    half = name != "float32"
    return {
        "dtype": name,
        "state": {"key": name, "value": name, "bias": name, "position": "int64", "empty_bias": f"min of {name}"},
        "logits": name,
        "fp32_islands": ["rmsnorm variance", "softmax(scores + mask)", "rope frequencies"]
        + (["softplus", "exp", "silu", "cdmoe routing softmax"] if half else []),
        "mask": "additive bias in the activation dtype; masked = dtype min"
        + ("; fp32 scores clipped to +-65504 before softmax (no -inf/NaN rows)" if name == "float16" else ""),
        "tolerance": {"max_abs_logits": TOLERANCES[name], "relative_to_max_logit": RELATIVE_TOLERANCES[name],
                      "why": TOLERANCE_WHY[name]},
    }


def torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype_name(dtype))


def cast_model(model, dtype: str):
    """`model` (transformers Doge, in place) in `dtype`, as from_pretrained(dtype=...) loads it.

    `.to(dtype)` would also round the rotary inv_freq buffers; from_pretrained keeps them fp32
    (measured, transformers 5.24), so they are put back.
    """
    target = torch_dtype(dtype)
    rotary = model.model.rotary_emb
    saved = {name: getattr(rotary, name).clone() for name in ("inv_freq", "original_inv_freq")}
    model.to(target)
    for name, value in saved.items():
        setattr(rotary, name, value)
    return model


def model_dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")
