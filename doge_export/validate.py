"""Compare a backend against the PyTorch reference; collect every failure, raise once (habit 11).

Reference: transformers' DogeForCausalLM (eager) with the keep-window top-k made stable, the
artifact's documented tie rule (DESIGN §3); without ties it equals plain transformers.
Per case: prefill logits and state, then N teacher-forced decode steps (same tokens into both),
then free-running greedy streams compared token by token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .backends.base import Runner
from .generate import greedy_tokens, left_pad, prompt_positions
from .spec import ModelInfo

REFERENCE = "transformers DogeForCausalLM (eager attention) with a stable keep-window top-k"


@dataclass
class Check:
    output: str
    max_abs_diff: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tol


@dataclass
class CaseResult:
    name: str
    prompt_lengths: list[int]
    checks: list[Check] = field(default_factory=list)
    greedy_steps: int = 0
    greedy_identical: bool = True
    first_divergence: int | None = None

    @property
    def ok(self) -> bool:
        return self.greedy_identical and all(c.ok for c in self.checks)


@dataclass(frozen=True)
class ValidateConfig:
    prompt_lengths: tuple[tuple[int, ...], ...] | None = None  # None: derived from the artifact
    decode_steps: int = 16
    greedy_steps: int = 32
    atol: float = 1e-4
    seed: int = 0


def default_cases(info: ModelInfo) -> tuple[tuple[int, ...], ...]:
    """Batch 1 short, batch 1 past the keep window (when prompts may be that long), padded batch 3."""
    short = min(8, info.max_prompt)
    long = min(info.max_prompt, info.keep_window_size + 8)
    padded = (min(info.max_prompt, 12), max(1, min(info.max_prompt, 12) // 3), min(info.max_prompt, 7))
    return ((short,), (long,), padded)


def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def compare_case(runner: Runner, reference: Runner, prompts, cfg: ValidateConfig, name: str) -> CaseResult:
    result = CaseResult(name, [len(p) for p in prompts])
    ids, mask = left_pad(prompts, runner.info.pad_token_id or 0)
    pos = prompt_positions(mask)
    got, want = runner.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    result.checks.append(Check("prefill.logits", float(np.abs(got - want).max()), cfg.atol))
    result.checks += state_checks(runner, reference, ids, mask, cfg.atol)
    tokens, positions = want.argmax(-1)[:, None], pos[:, -1:]
    steps = min(cfg.decode_steps, runner.info.max_context - ids.shape[1])
    worst = 0.0
    for _ in range(steps):
        positions = positions + 1
        got, want = runner.step(tokens, positions), reference.step(tokens, positions)
        worst = max(worst, float(np.abs(got - want).max()))
        tokens = want.argmax(-1)[:, None]
    result.checks.append(Check(f"step.logits ({steps} steps)", worst, cfg.atol))
    n = min(cfg.greedy_steps, runner.info.max_context - ids.shape[1])
    a, b = greedy_tokens(runner, prompts, n), greedy_tokens(reference, prompts, n)
    result.greedy_steps = n
    result.greedy_identical = a == b
    if a != b:
        result.first_divergence = min(next(i for i, (x, y) in enumerate(zip(ra + [-1], rb + [-2])) if x != y)
                                      for ra, rb in zip(a, b) if ra != rb)
    return result


def state_checks(runner: Runner, reference: Runner, ids, mask, atol: float) -> list[Check]:
    """Prefill state vs the reference cache, when both expose them (ORT runner vs torch runner)."""
    state = getattr(runner, "state", None)
    cache = getattr(reference, "cache", None)
    if state is None or cache is None or not hasattr(reference, "state_rows"):
        return []
    expected = reference.state_rows(ids, mask, runner.info.capacity)
    checks = []
    for field_name in ("key", "value", "bias"):
        worst = 0.0
        for layer in range(runner.info.num_layers):
            got = state.arrays[f"{field_name}.{layer}"]
            want = expected[f"{field_name}.{layer}"]
            occupied = expected[f"position.{layer}"] >= 0
            same_slots = np.array_equal(state.arrays[f"position.{layer}"], expected[f"position.{layer}"])
            delta = np.abs(got[occupied].astype(np.float64) - want[occupied])
            if field_name == "bias":  # exp(A*softplus(dt)) spans decades: compare relatively
                delta = delta / np.maximum(1.0, np.abs(want[occupied]))
            diff = delta.max() if occupied.any() else 0.0
            worst = max(worst, float(diff) if same_slots else float("inf"))
        label = "prefill.state.bias (relative)" if field_name == "bias" else f"prefill.state.{field_name}"
        checks.append(Check(label, worst, atol))
    return checks


def validate_runner(runner: Runner, reference: Runner, cfg: ValidateConfig = ValidateConfig(), log=print) -> dict:
    """Run every case; returns a JSON-able report with "passed"."""
    cases = cfg.prompt_lengths or default_cases(runner.info)
    results = []
    for n, lengths in enumerate(cases):
        name = f"batch {len(lengths)}, prompt {'/'.join(map(str, lengths))}"
        prompts = random_prompts(lengths, runner.info.vocab_size, cfg.seed + n)
        result = compare_case(runner, reference, prompts, cfg, name)
        for c in result.checks:
            log(f"  [{'ok' if c.ok else 'x'}] {name}: {c.output} max|diff| {c.max_abs_diff:.2e} (tol {c.tol:.0e})")
        log(f"  [{'ok' if result.greedy_identical else 'x'}] {name}: greedy {result.greedy_steps} steps "
            + ("identical" if result.greedy_identical else f"diverge at step {result.first_divergence}"))
        results.append(result)
    return report_from(results, runner, cfg, getattr(reference, "description", REFERENCE))


def report_from(results: list[CaseResult], runner: Runner, cfg: ValidateConfig, reference: str = REFERENCE) -> dict:
    return {
        "passed": all(r.ok for r in results),
        "backend": runner.name,
        "reference": reference,
        "atol": cfg.atol,
        "cases": [
            {**{k: v for k, v in asdict(r).items() if k != "checks"},
             "checks": [{"output": c.output, "max_abs_diff": c.max_abs_diff, "tol": c.tol, "ok": c.ok}
                        for c in r.checks],
             "ok": r.ok}
            for r in results
        ],
    }


def failures(report: dict) -> list[str]:
    out = []
    for case in report["cases"]:
        out += [f"{case['name']}: {c['output']} max|diff| {c['max_abs_diff']:.2e} > {c['tol']:.0e}"
                for c in case["checks"] if not c["ok"]]
        if not case["greedy_identical"]:
            out.append(f"{case['name']}: greedy tokens diverge at step {case['first_divergence']}")
    return out
