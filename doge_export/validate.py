"""Compare a backend against the PyTorch reference; collect every failure, raise once (habit 11).

Reference: transformers' DogeForCausalLM (eager) with the keep-window top-k made stable, the
artifact's documented tie rule (DESIGN §3); without ties it equals plain transformers.
Per case: prefill state, then prefill logits and N teacher-forced decode steps in lock step
(lockstep.py): logits within the tolerance and the same argmax, i.e. identical greedy tokens. A
mismatch at a decision that rounding legitimately flips (a near tie) ends the comparison there
and is reported as such, not as a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .backends.base import Runner
from .generate import left_pad, prompt_positions
from .lockstep import first_mismatch, lockstep, tie_excuse
from .precision import TOLERANCE_WHY, dtype_name, relative_tolerance, tolerance
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
    reference_finite: bool = True  # False: the reference itself overflowed (fp16) and is no reference
    tie_at: int | None = None  # call (0 = prefill) where a legitimate tie ended the comparison
    tie_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.greedy_identical and self.reference_finite and all(c.ok for c in self.checks)


@dataclass(frozen=True)
class ValidateConfig:
    prompt_lengths: tuple[tuple[int, ...], ...] | None = None  # None: derived from the artifact
    decode_steps: int = 16
    greedy_steps: int = 32
    atol: float | None = None  # None: the artifact dtype's tolerance (precision.TOLERANCES)
    rtol: float | None = None  # logits: atol + rtol x max|reference logits|; None: the dtype's
    # half precision: per case (in order), what the reference itself moves when run in the dtype
    # instead of fp32 (case_spreads); a case's logit tolerance is never below it
    spreads: tuple[float, ...] = ()
    seed: int = 0


def default_cases(info: ModelInfo, batch: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Batch 1 short, batch 1 past the keep window (when prompts may be that long), padded batch 3.

    `batch`: a runner that takes only that batch (a TensorRT step engine) gets the cases of that
    size, or one left-padded case of it.
    """
    short = min(8, info.max_prompt)
    long = min(info.max_prompt, info.keep_window_size + 8)
    padded = (min(info.max_prompt, 12), max(1, min(info.max_prompt, 12) // 3), min(info.max_prompt, 7))
    cases = ((short,), (long,), padded)
    if batch is None:
        return cases
    return tuple(c for c in cases if len(c) == batch) or (tuple(max(1, padded[0] - 5 * i) for i in range(batch)),)


def random_prompts(lengths, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def case_prompts(info: ModelInfo, cfg: ValidateConfig, batch: int | None = None) -> list[tuple[str, list]]:
    """The validation cases as (name, prompts): cfg.prompt_lengths or default_cases, seeded per case."""
    cases = cfg.prompt_lengths or default_cases(info, batch)
    return [(f"batch {len(lengths)}, prompt {'/'.join(map(str, lengths))}",
             random_prompts(lengths, info.vocab_size, cfg.seed + n)) for n, lengths in enumerate(cases)]


def compare_case(runner: Runner, reference: Runner, prompts, cfg: ValidateConfig, name: str,
                 tie_log: list | None = None, spread: float = 0.0) -> CaseResult:
    result = CaseResult(name, [len(p) for p in prompts])
    ids, mask = left_pad(prompts, runner.info.pad_token_id or 0)
    pos = prompt_positions(mask)
    start = len(tie_log) if tie_log is not None else 0
    runner.prefill(ids, mask, pos), reference.prefill(ids, mask, pos)
    flipped = flipped_tokens((tie_log or [])[start:], pos)
    state = state_checks(runner, reference, ids, mask, cfg.atol, cfg.rtol or 0.0, flipped)
    steps = min(max(cfg.decode_steps, cfg.greedy_steps), runner.info.max_context - ids.shape[1])
    run = lockstep(runner, reference, prompts, steps, tie_log)
    result.reference_finite = run.reference_finite
    tol = max(cfg.atol + (cfg.rtol or 0.0) * run.reference_scale, spread)
    call = first_mismatch(run, tol)
    result.tie_reason = tie_excuse(run, call, tol)
    end = call if result.tie_reason else len(run.diffs)
    result.tie_at = call if result.tie_reason else None
    if end > 0:
        result.checks.append(Check("prefill.logits", run.prefill_diff, tol))
        result.checks += state
    if end > 1:
        result.checks.append(Check(f"step.logits ({end - 1} steps)", max(run.diffs[1:end]), tol))
    result.greedy_steps = min(steps, end)
    divergence = run.first_divergence
    result.greedy_identical = divergence is None or divergence >= end
    result.first_divergence = divergence
    return result


def flipped_tokens(entries: list, positions: np.ndarray) -> frozenset:
    """(batch row, position id) of every token whose routing a prefill's tie-log entries mark as
    one rounding may flip (lockstep.py's log format; keep-window entries are per query row too)."""
    return frozenset((b, int(positions[b, t])) for *_, rows in entries for b, t in rows)


def state_checks(runner: Runner, reference: Runner, ids, mask, atol: float, rtol: float = 0.0,
                 flipped: frozenset = frozenset()) -> list[Check]:
    """Prefill state vs the reference cache, when both expose them (ORT runner vs torch runner).

    key/value: within atol + rtol x the field's largest |reference value| over all layers, like
    the logits (the same summation-order drift of long contexts: 1.2e-4 on Doge-20M's keys at a
    2048-token prompt, |key| <= ~5). bias = exp(u): compared relatively, which is u's absolute
    difference, within atol + rtol x max|u| (Doge-160M at 2048 tokens: 1.06e-4, both fp32 runs
    5.3e-5 from fp64, |u| <= 7.4). flipped: (batch row, position) of tokens where the reference
    logged a decision rounding may flip (a CDMoE routing near tie): their rows legitimately
    differ from that layer on and are left out, and the check's label says how many.
    """
    state = getattr(runner, "state", None)
    cache = getattr(reference, "cache", None)
    if state is None or cache is None or not hasattr(reference, "state_rows"):
        return []
    expected = reference.state_rows(ids, mask, runner.info.capacity)
    arrays = state.full_arrays() if hasattr(state, "full_arrays") else state.arrays  # all C slots
    note = f" ({len(flipped)} tokens past a rounding-level tie left out)" if flipped else ""
    checks = []
    for field_name in ("key", "value", "bias"):
        worst, scale = field_difference(arrays, expected, field_name, runner.info.num_layers, flipped)
        label = "prefill.state.bias (relative)" if field_name == "bias" else f"prefill.state.{field_name}"
        checks.append(Check(label + note, worst, atol + rtol * scale))
    return checks


def field_difference(arrays: dict, expected: dict, field_name: str, layers: int, flipped: frozenset):
    """-> (max difference over the compared slots of every layer, the reference's scale there).
    Slots compared: occupied in the reference and not holding a flipped token (inf when the two
    hold their tokens in different slots). bias: relative difference, scale max|ln bias| (its
    exponent); key/value: absolute difference, scale max|value|."""
    worst, scale = 0.0, 0.0
    for layer in range(layers):
        positions = expected[f"position.{layer}"]  # [B,G,C]
        if not np.array_equal(arrays[f"position.{layer}"], positions):
            return float("inf"), scale
        compared = positions >= 0
        for row, position in flipped:
            compared[row] &= positions[row] != position
        if not compared.any():
            continue
        want = np.asarray(expected[f"{field_name}.{layer}"], np.float64)[compared]
        delta = np.abs(arrays[f"{field_name}.{layer}"][compared].astype(np.float64) - want)
        if field_name == "bias":  # exp(A*softplus(dt)) spans decades: compare relatively
            delta /= np.maximum(1.0, np.abs(want))
            exponent = np.log(want[want > 0])
            scale = max(scale, float(np.abs(exponent[np.isfinite(exponent)]).max(initial=0.0)))
        else:
            scale = max(scale, float(np.abs(want).max()))
        worst = max(worst, float(delta.max()))
    return worst, scale


def validate_runner(runner: Runner, reference: Runner, cfg: ValidateConfig = ValidateConfig(), log=print,
                    tie_log: list | None = None) -> dict:
    """Run every case; returns a JSON-able report with "passed". tie_log: the stable reference's."""
    if cfg.atol is None:
        cfg = replace(cfg, atol=tolerance(runner.info.dtype))
        if cfg.rtol is None:
            cfg = replace(cfg, rtol=relative_tolerance(runner.info.dtype))
    cases = case_prompts(runner.info, cfg, getattr(runner, "fixed_batch", None))
    results = []
    for n, (name, prompts) in enumerate(cases):
        spread = cfg.spreads[n] if n < len(cfg.spreads) else 0.0
        log(f"  case {n + 1}/{len(cases)}: {name} ...")  # a long case on a slow executor takes minutes
        result = compare_case(runner, reference, prompts, cfg, name, tie_log, spread)
        for c in result.checks:
            log(f"  [{'ok' if c.ok else 'x'}] {name}: {c.output} max|diff| {c.max_abs_diff:.2e} (tol {c.tol:.3g})")
        log(f"  [{'ok' if result.greedy_identical else 'x'}] {name}: greedy "
            f"{result.greedy_steps} steps " + greedy_outcome(result))
        results.append(result)
    return report_from(results, runner, cfg, getattr(reference, "description", REFERENCE))


def greedy_outcome(result: CaseResult) -> str:
    if not result.greedy_identical:
        return f"diverge at step {result.first_divergence}"
    if result.tie_at is not None:
        return f"identical; compared up to call {result.tie_at}, where {result.tie_reason} (legitimate)"
    return "identical"


def report_from(results: list[CaseResult], runner: Runner, cfg: ValidateConfig, reference: str = REFERENCE) -> dict:
    return {
        "passed": all(r.ok for r in results),
        "backend": runner.name,
        "reference": reference + (f", run in {runner.info.dtype}" if runner.info.dtype != "float32" else ""),
        "dtype": runner.info.dtype,
        "atol": cfg.atol,
        "rtol": cfg.rtol or 0.0,  # logits: atol + rtol x max|reference logits| (each check's "tol")
        "atol_why": TOLERANCE_WHY[dtype_name(runner.info.dtype)] if cfg.atol == tolerance(runner.info.dtype)
        else "given by the caller",
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
        out += [f"{case['name']}: {c['output']} max|diff| {c['max_abs_diff']:.2e} > {c['tol']:.3g}"
                for c in case["checks"] if not c["ok"]]
        if not case.get("reference_finite", True):
            out.append(f"{case['name']}: the reference itself returned non-finite logits ({report.get('dtype')} "
                       "overflow inside transformers): this model cannot run in this dtype; export bf16 or fp32")
        if not case["greedy_identical"]:
            out.append(f"{case['name']}: greedy tokens diverge at step {case['first_divergence']}")
    return out


def case_spreads(reference: Runner, fp32_reference: Runner, cfg: ValidateConfig = ValidateConfig()) -> tuple[float, ...]:
    """Per validation case: how far the reference itself moves when run in the artifact's dtype
    instead of fp32 (max |logit diff|, prefill and the steps validation compares, on the half
    reference's greedy tokens). Same weights (the half model upcast): the noise floor a
    half-precision graph is judged against. At a 2048-token prompt bf16 Doge-20M moved 2.26,
    more than the fixed tolerance (1.0), and the graph was 1.26 from transformers in bf16."""
    info, spreads = reference.info, []
    for _, prompts in case_prompts(info, cfg):
        ids, mask = left_pad(prompts, info.pad_token_id or 0)
        positions = prompt_positions(mask)
        got, want = reference.prefill(ids, mask, positions), fp32_reference.prefill(ids, mask, positions)
        worst = float(np.abs(got - want).max())
        positions = positions[:, -1:]
        for _ in range(min(max(cfg.decode_steps, cfg.greedy_steps), info.max_context - ids.shape[1])):
            tokens, positions = got.argmax(-1)[:, None], positions + 1
            got, want = reference.step(tokens, positions), fp32_reference.step(tokens, positions)
            worst = max(worst, float(np.abs(got - want).max()))
        spreads.append(worst)
    return tuple(spreads)


def dtype_spread(spreads: tuple[float, ...], dtype: str) -> dict:
    """The report's reference_spread: the largest of case_spreads."""
    return {"max_abs_logits": max(spreads, default=0.0), "per_case": list(spreads),
            "what": f"transformers in {dtype} vs the same weights in float32"}
