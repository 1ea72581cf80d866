"""Generation over any runner: prefill, decode_step, sample, generate (STYLE habit 3).

Knows no backend and imports neither torch nor transformers. Batches are left-padded; position
ids follow transformers' generate(): cumsum(mask) - 1 (0 at padding), then +1 per step. Rows that
stop keep being fed pad_token_id, as generate() does (CDMoE routing mixes the batch, so what
finished rows feed still matters for the others).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import DogeExportError
from .spec import ModelInfo


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] | None = None  # None: the artifact's eos ids; (): never stop
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise DogeExportError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise DogeExportError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DogeExportError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DogeExportError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise DogeExportError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class GenerateResult:
    tokens: list[list[int]]  # generated ids per prompt, up to and including a stop id
    stats: dict = field(default_factory=dict)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids, attention_mask [B,T] int64, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, T - len(prompt):] = prompt
            mask[row, T - len(prompt):] = 1
    return ids, mask


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    return np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def check_prompts(prompts: list[list[int]], info: ModelInfo, max_new_tokens: int) -> None:
    if not prompts:
        raise DogeExportError("no prompt given")
    for n, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DogeExportError(f"prompt {n} is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad:
            raise DogeExportError(f"prompt {n} has token id {bad[0]} outside the vocabulary [0, {info.vocab_size})")
    T = max(len(p) for p in prompts)
    if T > info.max_prompt:
        raise DogeExportError(
            f"prompt of {T} tokens is longer than this artifact's max prompt length {info.max_prompt}; "
            "shorten it or re-export with a larger --max-prompt"
        )
    if T + max_new_tokens > info.max_context:
        raise DogeExportError(
            f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds this artifact's max context "
            f"{info.max_context}; lower --max-new-tokens or re-export with a larger --max-context"
        )


def prefill(runner, prompts: list[list[int]]):
    """-> logits [B,V] of each prompt's last token, and the next position per row [B,1]."""
    ids, mask = left_pad(prompts, runner.info.pad_token_id or 0)
    positions = prompt_positions(mask)
    return runner.prefill(ids, mask, positions), positions[:, -1:] + 1


def decode_step(runner, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """tokens, positions [B,1] -> logits [B,V]."""
    return runner.step(tokens, positions)


def apply_repetition_penalty(logits: np.ndarray, history: list[list[int]], penalty: float) -> np.ndarray:
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, seen in enumerate(history):
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        vals = logits[row, idx]
        logits[row, idx] = np.where(vals < 0, vals * penalty, vals / penalty)
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    logits = logits.astype(np.float64)
    if 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = np.cumsum(probs, axis=-1) - probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def sample(logits: np.ndarray, history: list[list[int]], cfg: GenerateConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [B,V] -> next token per row [B] int64."""
    logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if not cfg.do_sample or cfg.temperature == 0:
        return logits.argmax(-1).astype(np.int64, copy=False)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


OnToken = Callable[[int, np.ndarray, np.ndarray], None]  # (step, tokens [B], finished [B])


def generate(runner, prompts: list[list[int]], cfg: GenerateConfig = GenerateConfig(),
             on_token: OnToken | None = None) -> GenerateResult:
    """Generate for a batch of token-id prompts; `on_token` streams each step's tokens.

    The per-token bookkeeping is plain Python on lists: it runs right after a step that has pushed
    the weights through the CPU caches, where every numpy call costs ~10x its warm time (a Doge-20M
    int4 step spent ~0.1 ms of its ~3 ms here with numpy bookkeeping, measured).
    """
    info = runner.info
    check_prompts(prompts, info, cfg.max_new_tokens)
    stop = set(info.eos_token_id if cfg.stop_ids is None else cfg.stop_ids)
    pad = info.pad_token_id or 0
    rng = np.random.default_rng(cfg.seed)
    history = [list(p) for p in prompts]  # read by the repetition penalty only
    out: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), dtype=bool)
    done = [False] * len(prompts)
    start = time.perf_counter()
    logits, positions = prefill(runner, prompts)
    ttft = time.perf_counter() - start
    step_times = []
    for step in range(cfg.max_new_tokens):
        tokens = sample(logits, history, cfg, rng)
        ids = tokens.tolist()
        for row, token in enumerate(ids):
            if done[row]:
                ids[row] = pad  # finished rows are fed the pad token
                continue
            out[row].append(token)
            if cfg.repetition_penalty != 1.0:
                history[row].append(token)
            if token in stop:
                done[row] = finished[row] = True
        if any(done):
            tokens = np.array(ids, dtype=np.int64)
        if on_token:
            on_token(step, tokens, finished)
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = decode_step(runner, tokens[:, None], positions)
        step_times.append(time.perf_counter() - t0)
        positions = positions + 1
    return GenerateResult(out, generation_stats(ttft, step_times, out))


def generation_stats(ttft: float, step_times: list[float], out: list[list[int]]) -> dict:
    decode = sum(step_times)
    return {
        "prefill_seconds": round(ttft, 6),
        "decode_steps": len(step_times),
        "decode_seconds": round(decode, 6),
        "decode_tokens_per_second": round(len(step_times) / decode, 2) if decode > 0 else None,
        "generated_tokens": sum(len(o) for o in out),
    }


def greedy_tokens(runner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens per prompt, never stopping early (for parity checks)."""
    cfg = GenerateConfig(max_new_tokens=n, stop_ids=())
    return generate(runner, prompts, cfg).tokens
