"""Validation's fp32 logit tolerance: 1e-4 absolute plus 1e-5 x the reference's largest |logit|
(precision.RELATIVE_TOLERANCES), and a caller's --atol alone when given."""

from types import SimpleNamespace

import numpy as np

from doge_export.precision import RELATIVE_TOLERANCES, TOLERANCES
from doge_export.validate import ValidateConfig, compare_case, validate_runner

VOCAB = 64


class FakeRunner:
    """Deterministic logits of magnitude `scale` peaked on (last token + 1); `offset` added to all."""

    name = "fake"

    def __init__(self, scale: float, offset: float = 0.0):
        self.info = SimpleNamespace(pad_token_id=0, max_context=64, vocab_size=VOCAB, dtype="float32")
        self.scale, self.offset = scale, offset

    def _logits(self, last_tokens):
        logits = np.zeros((len(last_tokens), VOCAB), np.float64)
        logits[np.arange(len(last_tokens)), (np.asarray(last_tokens) + 1) % VOCAB] = self.scale
        return logits + self.offset

    def prefill(self, ids, mask, pos):
        return self._logits(ids[:, -1])

    def step(self, tokens, positions):
        return self._logits(tokens[:, 0])


def _case(offset: float, scale: float, **cfg):
    cfg = ValidateConfig(decode_steps=4, greedy_steps=4, **cfg)
    return compare_case(FakeRunner(scale, offset), FakeRunner(scale), [[5, 6, 7]], cfg, "fake")


def test_relative_term_follows_the_logit_scale():
    atol, rtol = TOLERANCES["float32"], RELATIVE_TOLERANCES["float32"]
    drift = 1.5e-4  # what a 2048-token context costs Doge-20M (|logit| <= 15)
    assert _case(drift, scale=15.0, atol=atol, rtol=rtol).ok  # 1.5e-4 <= 1e-4 + 15 x 1e-5
    assert not _case(drift, scale=2.0, atol=atol, rtol=rtol).ok  # 1.5e-4 > 1e-4 + 2 x 1e-5
    assert not _case(drift, scale=15.0, atol=atol).ok  # a caller's atol alone: no relative term


def test_report_records_both_terms_and_each_check_tolerance():
    report = validate_runner(FakeRunner(15.0, 1.5e-4), FakeRunner(15.0),
                             ValidateConfig(prompt_lengths=((3,),), decode_steps=2, greedy_steps=2), log=lambda *a: None)
    assert report["passed"] and report["atol"] == 1e-4 and report["rtol"] == 1e-5
    tols = {c["tol"] for case in report["cases"] for c in case["checks"]}
    assert tols == {1e-4 + 15.0 * 1e-5}
