"""Step latency of several artifacts side by side, in one process (an A/B of a graph change).

usage: python benchmarks/ab_step.py ART_A ART_B [...] [--batch 1] [--threads 1] [--rounds 3]

An artifact written ART@rows or ART@columns runs with that layout of the tied lm_head matrix
(OrtRunner's lm_layout; plain ART: the runner's choice for the batch size); ART@packed with the
step's fp32 weights prepacked at batch 1 too (OrtRunner's pack_weights: onnxruntime-packed).

Each artifact gets its own ONNX Runtime runner, prefilled with the same random prompt; the runners
then take turns, 32 greedy steps each (the first 4 of every turn dropped: the turn before left
the caches full of another artifact's weights), until every runner has decoded `--new-tokens`.
Turns alternate within one process, so a drift of this shared machine's load reaches every
artifact alike; the ratios to the first artifact are the result, not the absolute times.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from doge_export.backends.ort import OrtRunner
from doge_export.manifest import load_manifest

TURN, DROPPED = 32, 4


def decode_in_turns(runners, batch: int, prompt_len: int, new_tokens: int, rounds: int, seed: int = 0):
    """-> per runner, the kept step latencies in seconds."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, runners[0].info.vocab_size, (batch, prompt_len))
    mask, positions = np.ones_like(ids), np.tile(np.arange(prompt_len), (batch, 1))
    kept = [[] for _ in runners]
    for _ in range(rounds):
        tokens = [r.prefill(ids, mask, positions).argmax(-1)[:, None] for r in runners]
        for start in range(0, new_tokens, TURN):
            for j, runner in enumerate(runners):
                for i in range(start, min(start + TURN, new_tokens)):
                    logits = runner.step(tokens[j], np.full((batch, 1), prompt_len + i))
                    if i - start >= DROPPED:
                        kept[j].append(runner.last_latency)
                    tokens[j] = logits.argmax(-1)[:, None]
    return kept


def open_runner(spec: str, threads: int, batch: int) -> OrtRunner:
    path, _, variant = spec.partition("@")
    if variant == "packed":
        return OrtRunner(load_manifest(path), threads=threads, batch=batch, pack_weights=True)
    return OrtRunner(load_manifest(path), threads=threads, batch=batch, lm_layout=variant or "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runners = [open_runner(a, args.threads, args.batch) for a in args.artifacts]
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    kept = decode_in_turns(runners, args.batch, args.prompt_len, args.new_tokens, args.rounds)
    base = np.median(kept[0])
    print(f"{start}, batch {args.batch}, threads {args.threads}, prompt {args.prompt_len}, "
          f"{args.new_tokens} steps x {args.rounds} rounds, {TURN}-step turns")
    for path, times in zip(args.artifacts, kept):
        median = np.median(times)
        print(f"{path:44s} step p50 {1e3 * median:7.3f} ms  p90 {1e3 * np.percentile(times, 90):7.3f} ms  "
              f"x{median / base:.3f} of the first")


if __name__ == "__main__":
    main()
