"""Two artifacts of one model side by side in the C++ runtime (cpp/build/doge_run): did an export
change make the step or the prefill slower, or the process lighter?

usage: python benchmarks/artifact_ab.py OLD NEW [--rounds 8] [--threads 1] [--spin] [--prompt-len 128]
       [--new-tokens 256] [--json FILE]

Each measurement is a fresh `doge_run --serve` process: one warm-up generation, then one measured
(a prompt of random ids, 128 tokens by default, 256 new tokens, no stop id; the same prompt for both
artifacts in a round). Processes alternate between the two artifacts (OLD first in even rounds,
NEW first in odd ones), so a drift of this shared machine's load reaches both alike. Reported:
per artifact the median over rounds of the step p50, the prefill time and the runtime RSS (peak
VmHWM minus the baseline after ONNX Runtime's set-up); and the per-round NEW / OLD ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CPP = Path(__file__).resolve().parents[1] / "cpp" / "build" / "doge_run"


def measure(folder: str, prompt: list[int], new_tokens: int, threads: int, spin: bool) -> dict:
    """One fresh process: warm-up, then the measured generation."""
    cmd = [str(CPP), folder, "--serve", "--no-verify", "--threads", str(threads)] + (["--spin"] if spin else [])
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(server.stdout.readline())
    for _ in range(2):
        server.stdin.write(json.dumps({"prompts": [prompt], "max_new_tokens": new_tokens}) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        if "error" in answer:  # a prompt or length the artifact does not take
            server.kill()
            sys.exit(f"error: {folder}: {answer['error']}")
    server.stdin.close()
    server.wait()
    return {"step_p50_ms": float(np.median(answer["step_ms"])), "prefill_ms": answer["prefill_ms"],
            "runtime_rss_mib": answer["peak_rss_mib"] - ready["rss_mib"]["baseline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--spin", action="store_true", help="ONNX Runtime's worker threads busy-wait")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not CPP.exists():
        sys.exit(f"error: {CPP} is missing; build it with: bash cpp/build.sh")
    vocab = json.loads((Path(args.old) / "doge_export.json").read_text())["model_info"]["vocab_size"]
    rng = np.random.default_rng(1)
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        prompt = [0] + rng.integers(3, vocab, args.prompt_len - 1).tolist()
        for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
            runs[which].append(measure(getattr(args, which), prompt, args.new_tokens, args.threads, args.spin))
    report = {"command": " ".join(["python", *sys.argv]), "runs": runs, "median": {}, "new_over_old": {}}
    for field in ("step_p50_ms", "prefill_ms", "runtime_rss_mib"):
        old, new = (np.array([m[field] for m in runs[w]]) for w in ("old", "new"))
        report["median"][field] = {"old": float(np.median(old)), "new": float(np.median(new))}
        report["new_over_old"][field] = {"per_round": np.round(new / old, 3).tolist(),
                                         "median": float(np.median(new / old))}
        print(f"{field:16s} old {np.median(old):8.2f}  new {np.median(new):8.2f}  new/old median "
              f"{np.median(new / old):.3f}  per round {np.round(new / old, 2).tolist()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
