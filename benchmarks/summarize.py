"""Print the markdown table of benchmarks/README.md from the recorded JSON reports.

usage: python benchmarks/summarize.py [benchmarks/results]   (one table per ISA folder, e.g. results/avx2)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(name: str, report: dict) -> str:
    cfg, art, b = report["config"], report["artifact"], report["backends"]
    gen, ours = b.get("torch-generate", {}), b.get("onnxruntime", {})
    if ours.get("status") != "ok" or gen.get("status") != "ok":
        return f"| {name} | (incomplete) |"
    load = report["machine"].get("load_average_at_start") or [float("nan")]
    probe = report["probe"].get("onnxruntime", {}).get("ratios", {})
    flat = " / ".join(f"{v:.2f}" for v in probe.values()) or "-"
    cells = [
        name, art["quantization"] or art["dtype"], cfg["batch"], f"{cfg['threads'] or 'default'}{' spin' if cfg.get('spin') else ''}",
        f"{gen['decode_tok_s']:.1f}", f"{b['torch']['decode_tok_s']:.1f}" if b.get("torch", {}).get("status") == "ok" else "-",
        f"{ours['decode_tok_s']:.1f}", f"**{ours['vs_torch_generate']['decode_tok_s']:.2f}x**",
        f"{ours['latency_ms']['p50']:.2f}", f"{ours['floor_ms']:.2f}", f"{ours['floor_ratio']:.2f}",
        f"{ours['ttft_ms']:.0f} / {gen['ttft_ms']:.0f}", f"{ours['rss_budget_ratio']:.2f}", flat,
        ratios_cell(b.get("onnxruntime-packed", {})), ratios_cell(b.get("onnxruntime-cpp", {})),
        f"{report['machine']['bandwidth_gb_s']['used']:.1f}", f"{load[0]:.1f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ratios_cell(packed: dict) -> str:
    """onnxruntime-packed (fp32 weights prepacked at batch 1 too) or onnxruntime-cpp (the C++
    runtime): / generate, p50 / floor, RSS / (w+s)."""
    if packed.get("status") != "ok":
        return "-"
    return (f"{packed['vs_torch_generate']['decode_tok_s']:.2f}x · {packed['floor_ratio']:.2f} · "
            f"{packed['rss_budget_ratio']:.2f}")


HEADER = ("| run | weights | batch | threads | torch-generate tok/s | torch tok/s | onnxruntime tok/s | "
          "ort / generate | ort p50 ms | floor ms | p50 / floor | TTFT ms ort / generate | "
          "ort RSS / (w+s) | step flatness (fill 2000, pos 8000 vs 100) | "
          "packed: / generate · p50 / floor · RSS / (w+s) | C++: / generate · p50 / floor · RSS / (w+s) | "
          "GB/s | load |\n" + "|---" * 18 + "|")


def main(folder: Path) -> None:
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.json"))):
        print(f"\n### {sub.name}\n\n{HEADER}")
        for path in sorted(sub.glob("*.json")):
            report = json.loads(path.read_text())
            if "backends" in report:  # a `bench` report (cpp-vs-python.json is another script's)
                print(row(path.stem, report))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results")
