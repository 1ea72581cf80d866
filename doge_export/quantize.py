"""Opt-in weight-only quantization (int8 / int4) of an exported artifact, with ONNX Runtime's tools.

What is quantized: every MatMul whose weight is a constant matrix of at least MIN_ELEMENTS values
(q/k/v/o projections, the MLP and the lm_head), by onnxruntime's MatMulNBitsQuantizer (round to
nearest, symmetric, one fp32 scale per BLOCK_SIZE input features) into MatMulNBits. The tied
embedding, which the graphs hold once as `lm_weight_t` [hidden, vocab] (a MatMul and a Gather on
axis 1), is then read by a GatherBlockQuantized from the *same* packed bytes as the lm_head
MatMulNBits, so the tied matrix is still stored once. Activations, norms, attention and the state
stay fp32; the graphs' inputs and outputs do not change. The quantized graphs are then saved as
ONNX Runtime's optimizer leaves them (ort_offline.py): they run on its CPU kernels only anyway, and
a session over the optimized graph holds 2-3 MiB less (int4 Doge-20M).

Quality is measured, never assumed: `measure_quality` runs the fp32 and the quantized graphs
side by side (teacher-forced on the fp32 greedy tokens) and reports top-1 agreement and max
|dlogit|. A quantized artifact is never used for parity checks against PyTorch: the export
validates its fp32 graphs, then quantizes them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import DogeExportError

MODES = {"int8": 8, "int4": 4}
# Default input features per scale (--quant-block). Larger blocks trade accuracy for speed: with
# int4 Doge-20M (random weights, AVX-512 VNNI), block 64 made the step 8-15% faster than 32 (lm_head
# 0.32 -> 0.23 ms) at top-1 agreement 0.365 vs 0.376; block 128 0.261 (benchmarks/README.md).
BLOCK_SIZE = 32
MIN_ELEMENTS = 1 << 14  # smaller matrices (dt_proj) stay fp32
QUALITY_STEPS = 512
# MatMulNBits computes with int8 activations (level 4): its 8-bit weights have no fp32-activation
# CPU kernel (a step took 167 ms vs 31 ms), and for 4-bit weights level 4 was also the faster
ACCURACY_LEVEL = 4


def check_mode(mode: str | None) -> None:
    if mode is None:
        return
    if mode not in MODES:
        raise DogeExportError(f"--quantize {mode!r} is not supported; choose one of {', '.join(MODES)}")
    try:  # checked before any export work: the quantizer is the last step
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError as error:
        raise DogeExportError(f"--quantize needs onnxruntime's quantization tools ({error}); "
                              "install them with: pip install onnx onnx-ir") from None


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _small_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes the quantizer must leave alone: non-constant or small weights."""
    inits = _initializers(model)
    skip = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or int(np.prod(weight.dims)) < MIN_ELEMENTS:
            skip.append(node.name)
    return skip


def quantize_model(model: onnx.ModelProto, bits: int, block_size: int = BLOCK_SIZE,
                   accuracy_level: int = ACCURACY_LEVEL) -> onnx.ModelProto:
    """-> the model with its large MatMul weights in MatMulNBits and the tied Gather re-pointed."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(names), "quantizer needs unique node names"
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        nodes_to_exclude=_small_matmuls(model), op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    model = quantizer.model.model
    tie_embedding(model, bits, block_size)
    _drop_unused_initializers(model)
    return model


def tie_embedding(model: onnx.ModelProto, bits: int, block_size: int) -> None:
    """Gather(W [K,N], ids, axis=1) whose W now feeds a MatMulNBits -> GatherBlockQuantized on its B.

    MatMulNBits holds W as B [N, k_blocks, blob] (column n of W = row n of B) and scales
    [N, k_blocks]; GatherBlockQuantized gathers rows of B (gather_axis 0), dequantizes each
    block_size run along the last axis, and a Reshape + Transpose give back the [K, n] columns
    the original Gather produced (ORT cancels that Transpose against the graph's own).
    """
    inits = _initializers(model)
    suffix = f"_Q{bits}"
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Gather" or node.input[0] + suffix not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        K = inits[node.input[0]].dims[0]
        if axis != 1:
            continue
        packed, scales = node.input[0] + suffix, node.input[0] + "_scales"
        s = numpy_helper.to_array(inits[scales])
        scales3 = numpy_helper.from_array(s.reshape(*s.shape, 1), scales + "_gather")
        shape = numpy_helper.from_array(np.array([-1, K], np.int64), node.name + "_shape")
        model.graph.initializer.extend([scales3, shape])
        out = node.output[0]
        new = [
            helper.make_node("GatherBlockQuantized", [packed, node.input[1], scales3.name], [out + "_q"],
                             name=node.name + "_q", domain="com.microsoft", gather_axis=0,
                             quantize_axis=2, block_size=block_size, bits=bits),
            helper.make_node("Reshape", [out + "_q", shape.name], [out + "_rows"], name=node.name + "_rows"),
            helper.make_node("Transpose", [out + "_rows"], [out], name=node.name + "_cols", perm=[1, 0]),
        ]
        del model.graph.node[i]
        for j, n in enumerate(new):
            model.graph.node.insert(i + j, n)
        return


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantized_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the fp32 weights that MatMulNBits now holds (from its B input names)."""
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            out.append(node.input[1].rsplit("_Q", 1)[0])
    return out


GRAPHS = ("prefill", "step")


def quantize_artifact(manifest, mode: str, log=print, block_size: int = BLOCK_SIZE) -> dict:
    """Replace the fp32 graphs and weights in `manifest`'s (unpublished) folder by quantized ones.

    The fp32 files move to a scratch folder, serve as the reference of the quality measurement,
    and are deleted. Updates manifest.data["weights"]; returns the "quantization" manifest entry.
    """
    import copy
    import shutil

    from .manifest import Manifest
    from .onnx_weights import share_weights
    from .ort_offline import optimize_graphs

    bits = MODES[mode]
    folder = manifest.folder
    fp32_dir = folder / ".fp32"
    fp32_dir.mkdir()
    weights_file = manifest.data["weights"]["file"]
    for name in [f"{g}.onnx" for g in GRAPHS] + [weights_file]:
        (folder / name).rename(fp32_dir / name)
    fp32 = Manifest(fp32_dir, copy.deepcopy(manifest.data))
    try:
        log(f"quantizing weights to {mode} (onnxruntime MatMulNBits, block {block_size}) ...")
        graphs = {g: quantize_model(onnx.load(str(fp32_dir / f"{g}.onnx")), bits, block_size) for g in GRAPHS}
        names = quantized_tensors(graphs["step"])
        log("optimizing the quantized graphs with onnxruntime (level extended, saved) ...")
        graphs, offline = optimize_graphs(graphs, manifest.info, log)
        manifest.data["weights"] = share_weights(graphs, folder, weights_file)
        for g, model in graphs.items():
            onnx.save(model, str(folder / f"{g}.onnx"))
        log(f"measuring {mode} quality against the fp32 graphs over {QUALITY_STEPS} decode steps ...")
        quality = measure_quality(fp32, manifest)
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    return {
        "mode": mode, "bits": bits, "block_size": block_size, "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL,
        "method": "onnxruntime MatMulNBitsQuantizer (round to nearest) -> MatMulNBits; the tied embedding "
                  "reads the lm_head's packed bytes through GatherBlockQuantized",
        "quantized": names, "offline_optimization": offline,
        "weights_bytes_fp32": fp32.data["weights"]["bytes"],
        "weights_bytes": manifest.data["weights"]["bytes"], "quality": quality,
        "parity": "not checked against PyTorch: quantized graphs are compared with the validated fp32 graphs",
    }


def measure_quality(reference_manifest, manifest, steps: int = QUALITY_STEPS, prompt_len: int = 32,
                    seed: int = 0) -> dict:
    """fp32 vs quantized ONNX Runtime runners, teacher-forced on the fp32 greedy tokens (batch 1).

    Compares prefill logits and each of `steps` decode steps: top-1 agreement and max |dlogit|.
    """
    from .backends.ort import OrtRunner

    info = manifest.info
    prompt_len = min(prompt_len, info.max_prompt)
    steps = min(steps, info.max_context - prompt_len)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, info.vocab_size, (1, prompt_len), dtype=np.int64)
    positions = np.arange(prompt_len, dtype=np.int64)[None]
    with OrtRunner(reference_manifest) as ref, OrtRunner(manifest) as quant:
        want, got = ref.prefill(ids, np.ones_like(ids), positions), quant.prefill(ids, np.ones_like(ids), positions)
        agree, diffs, scale = [], [], []
        for step in range(steps + 1):
            agree.append(bool(want.argmax() == got.argmax()))
            diffs.append(float(np.abs(want - got).max()))
            scale.append(float(np.abs(want).max()))
            if step == steps:
                break
            token, pos = want.argmax(-1)[:, None], np.array([[prompt_len + step]], np.int64)
            want, got = ref.step(token, pos), quant.step(token, pos)
    return {"steps": steps, "prompt_len": prompt_len, "reference": "fp32 graphs of this export, teacher-forced",
            "top1_agreement": float(np.mean(agree)), "max_abs_dlogit": max(diffs),
            "mean_max_abs_dlogit": float(np.mean(diffs)), "max_abs_logit_fp32": max(scale)}
