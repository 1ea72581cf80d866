"""One decode row of attention over S cached slots, in several ONNX formulations, side by side.

usage: python benchmarks/attention_ops.py [--slots 256 1024 2048] [--layers 8] [--heads 2]
       [--kv-heads 1] [--head-dim 128] [--threads 1] [--rounds 40]

The step's attention core per layer: scores = q·Kᵀ + bias (the dynamic-mask bias of each slot),
softmax over the slots, ·V. Defaults are Doge-20M's shape (8 layers, 2 query heads sharing 1 KV
head of 128). Every layer gets its own K/V, and a 64 MiB buffer is rewritten before each run, so
K/V come from DRAM as they do in a step whose weights have just streamed through the caches.
Formulations, each one graph of all layers:
- grouped: q as [B,G,R,D] (one M=R GEMM per KV head) against Transpose(K)
- broadcast: q as [B,G,R,1,D] against K broadcast over the R query heads
- attention23: the ONNX Attention op (opset 23) with q_num_heads/kv_num_heads and the bias as
  its additive mask (ONNX Runtime's own CPU kernel)
The runs interleave round-robin in one process; the outputs must agree (checked) before timing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

FLUSH_BYTES = 64 << 20


def const(name: str, values: list[int]):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def grouped(l: int, H: int, G: int, D: int, S: int) -> list:
    return [const(f"sh{l}", [1, G, H // G, D]), helper.make_node("Reshape", ["q", f"sh{l}"], [f"qg{l}"]),
            helper.make_node("Transpose", [f"k{l}"], [f"kt{l}"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [f"qg{l}", f"kt{l}"], [f"s{l}"]),
            helper.make_node("Add", [f"s{l}", f"b{l}"], [f"sb{l}"]),
            helper.make_node("Softmax", [f"sb{l}"], [f"p{l}"], axis=-1),
            helper.make_node("MatMul", [f"p{l}", f"v{l}"], [f"o{l}"])]


def broadcast(l: int, H: int, G: int, D: int, S: int) -> list:
    unsqueeze = [helper.make_node("Unsqueeze", [f"{t}{l}", f"ax{l}"], [f"{t}u{l}"]) for t in "kvb"]
    return [const(f"sh{l}", [1, G, H // G, 1, D]), helper.make_node("Reshape", ["q", f"sh{l}"], [f"qg{l}"]),
            const(f"ax{l}", [2]), *unsqueeze,
            helper.make_node("Transpose", [f"ku{l}"], [f"kt{l}"], perm=[0, 1, 2, 4, 3]),
            helper.make_node("MatMul", [f"qg{l}", f"kt{l}"], [f"s{l}"]),
            helper.make_node("Add", [f"s{l}", f"bu{l}"], [f"sb{l}"]),
            helper.make_node("Softmax", [f"sb{l}"], [f"p{l}"], axis=-1),
            helper.make_node("MatMul", [f"p{l}", f"vu{l}"], [f"o{l}"])]


def attention23(l: int, H: int, G: int, D: int, S: int) -> list:
    # the bias is per KV head [B,G,1,S]; the op's mask must broadcast to [B,H,1,S]
    expand = [const(f"rep{l}", [1, H // G, 1, 1]), helper.make_node("Tile", [f"b{l}", f"rep{l}"], [f"m{l}"])]
    return [*expand, helper.make_node("Attention", ["q", f"k{l}", f"v{l}", f"m{l}"], [f"o{l}"],
                                      q_num_heads=H, kv_num_heads=G, scale=1.0)]


FORMULATIONS = {"grouped": grouped, "broadcast": broadcast, "attention23": attention23}


def make_feeds(layers: int, H: int, G: int, D: int, S: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, H, 1, D), dtype=np.float32)}
    for l in range(layers):
        feeds[f"k{l}"] = rng.standard_normal((1, G, S, D), dtype=np.float32)
        feeds[f"v{l}"] = rng.standard_normal((1, G, S, D), dtype=np.float32)
        feeds[f"b{l}"] = rng.standard_normal((1, G, 1, S), dtype=np.float32)
    return feeds


def build(body, feeds: dict, layers: int, H: int, G: int, D: int, S: int) -> bytes:
    """One graph: every layer's attention row, the outputs flattened and concatenated."""
    nodes = [n for l in range(layers) for n in body(l, H, G, D, S)]
    nodes += [const("flat", [1, -1])]
    nodes += [helper.make_node("Reshape", [f"o{l}", "flat"], [f"f{l}"]) for l in range(layers)]
    nodes.append(helper.make_node("Concat", [f"f{l}" for l in range(layers)], ["out"], axis=0))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in feeds.items()]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]).SerializeToString()


def time_slots(args, S: int) -> None:
    H, G, D, L = args.heads, args.kv_heads, args.head_dim, args.layers
    feeds = make_feeds(L, H, G, D, S)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(build(body, feeds, L, H, G, D, S), options, providers=["CPUExecutionProvider"])
                for name, body in FORMULATIONS.items()}
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    first = next(iter(outputs.values()))
    for name, out in outputs.items():  # the same attention, within summation-order rounding
        np.testing.assert_allclose(out, first, rtol=1e-4, atol=1e-4, err_msg=name)
    flush = np.ones(FLUSH_BYTES, np.uint8)
    times = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            flush += 1
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    kv_bytes = L * 2 * G * S * D * 4
    base = np.median(times["grouped"])
    for name, t in times.items():
        median = np.median(t)
        print(f"slots {S:5d}  {name:12s} {median * 1e6:8.1f} us  x{median / base:.2f} of grouped  "
              f"({kv_bytes / median / 1e9:.1f} GB/s over {kv_bytes >> 10} KiB of K+V)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if min(args.slots) < 1 or args.layers < 1 or args.rounds < 1 or args.heads % args.kv_heads:
        parser.error("slots, layers and rounds must be >= 1, and --heads a multiple of --kv-heads")
    print(f"onnxruntime {ort.__version__}, {args.layers} layers, {args.heads} query heads / {args.kv_heads} KV heads "
          f"of {args.head_dim}, {args.threads} thread(s), median of {args.rounds} interleaved runs")
    for S in args.slots:
        time_slots(args, S)


if __name__ == "__main__":
    main()
