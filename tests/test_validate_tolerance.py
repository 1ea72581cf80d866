"""Validation's fp32 tolerance: 1e-4 absolute plus 3e-5 x the reference's largest |value|
(precision.RELATIVE_TOLERANCES) on logits and on the prefill's keys and values, and a caller's
--atol alone when given."""

from types import SimpleNamespace

import numpy as np

from doge_export.precision import RELATIVE_TOLERANCES, TOLERANCES
from doge_export.validate import ValidateConfig, compare_case, flipped_tokens, state_checks, validate_runner

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
    assert (atol, rtol) == (1e-4, 3e-5)
    drift = 3.2e-4  # the widest a 2048-token context put transformers and the graphs apart (Doge-20M)
    assert _case(drift, scale=15.0, atol=atol, rtol=rtol).ok  # 3.2e-4 <= 1e-4 + 15 x 3e-5
    assert not _case(drift, scale=2.0, atol=atol, rtol=rtol).ok  # 3.2e-4 > 1e-4 + 2 x 3e-5
    assert not _case(drift, scale=15.0, atol=atol).ok  # a caller's atol alone: no relative term


def test_report_records_both_terms_and_each_check_tolerance():
    report = validate_runner(FakeRunner(15.0, 1.5e-4), FakeRunner(15.0),
                             ValidateConfig(prompt_lengths=((3,),), decode_steps=2, greedy_steps=2), log=lambda *a: None)
    assert report["passed"] and report["atol"] == 1e-4 and report["rtol"] == 3e-5
    tols = {c["tol"] for case in report["cases"] for c in case["checks"]}
    assert tols == {1e-4 + 15.0 * 3e-5}


class FakeState:
    """One layer's state at 4 slots, 3 occupied; keys/values of magnitude `scale`, plus `offset`."""

    def __init__(self, scale: float, offset: float = 0.0):
        position = np.array([[[0, 1, 2, -1]]])
        values = scale * np.linspace(-1, 1, 4 * 2).reshape(1, 1, 4, 2) + offset
        self.arrays = {"key.0": values, "value.0": -values, "bias.0": np.full((1, 1, 4), 2.0) + offset,
                       "position.0": position}


class FakeStateRunner:
    def __init__(self, state: FakeState):
        self.info = SimpleNamespace(num_layers=1, capacity=4)
        self.state, self.cache = state, object()

    def state_rows(self, ids, mask, capacity):
        return self.state.arrays


def _state_checks(offset: float, scale: float, rtol: float):
    got, want = FakeStateRunner(FakeState(scale, offset)), FakeStateRunner(FakeState(scale))
    return {c.output: c for c in state_checks(got, want, None, None, 1e-4, rtol)}


def test_state_keys_and_values_get_the_relative_term_and_bias_its_exponent():
    checks = _state_checks(offset=1.5e-4, scale=6.5, rtol=3e-5)
    assert checks["prefill.state.key"].ok and checks["prefill.state.value"].ok  # 1.5e-4 <= 1e-4 + 6.5 x 3e-5
    assert checks["prefill.state.key"].tol == 1e-4 + 6.5 * 3e-5
    # bias = exp(u) is compared relatively (|bias| 2: 1.5e-4 / 2 = 7.5e-5), scaled by |u| = ln 2
    bias = checks["prefill.state.bias (relative)"]
    assert bias.ok and bias.tol == 1e-4 + 3e-5 * float(np.log(2.0))
    small = _state_checks(offset=1.5e-4, scale=1.0, rtol=3e-5)  # 1.5e-4 > 1e-4 + 1 x 3e-5
    assert not small["prefill.state.key"].ok and not small["prefill.state.value"].ok
    assert not _state_checks(offset=1.5e-4, scale=6.5, rtol=0.0)["prefill.state.key"].ok


def test_tokens_past_a_rounding_level_tie_are_left_out_of_the_state_check():
    """A CDMoE routing flip changes that token's rows from its layer on (Doge-20M-MoE at 2048
    tokens: two tokens, 7.6e-3, every other slot within 1.4e-5); only those tokens are left out."""
    flipped_state = FakeState(6.5)
    flipped_state.arrays["key.0"][0, 0, 1] += 1e-2  # position 1 routed the other way
    got, want = FakeStateRunner(flipped_state), FakeStateRunner(FakeState(6.5))
    strict = {c.output: c for c in state_checks(got, want, None, None, 1e-4, 3e-5)}
    assert not strict["prefill.state.key"].ok
    excused = {c.output.split(" (")[0]: c for c in state_checks(got, want, None, None, 1e-4, 3e-5, frozenset({(0, 1)}))}
    assert excused["prefill.state.key"].ok and "1 tokens past a rounding-level tie" in excused["prefill.state.key"].output
    wrong_token = state_checks(got, want, None, None, 1e-4, 3e-5, frozenset({(0, 2)}))
    assert not wrong_token[0].ok  # leaving out another token excuses nothing


def test_flipped_tokens_map_token_indices_to_positions():
    positions = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])  # row 0 left-padded by 2
    entries = [("window", False, 0.5, ()), ("route", False, 1e-6, ((0, 4), (1, 2))), ("route", True, 0.0, ())]
    assert flipped_tokens(entries, positions) == {(0, 2), (1, 2)}


def test_tie_entry_names_the_tokens_a_rounding_level_tie_may_flip():
    import torch

    from doge_export.reference import tie_entry

    # routing scores [B=2, S=3, n=3] sorted descending, top-1 kept
    scores = torch.tensor([[[3.0, 1.0, 0.0], [2.0, 2.0 - 1e-6, 0.0], [5.0, 4.0, 0.0]],
                           [[1.0, 1.0, 0.0], [4.0, 1.0, 0.0], [3.0, 2.0, 1.0]]])
    kind, exact, gap, rows = tie_entry("route", scores, 1, -torch.inf, 3)
    assert (kind, exact) == ("route", True) and rows == ((0, 1), (1, 0))  # a near tie and an exact one
    assert 0 < gap <= 1e-6
    # keep-window biases [B=1, G=2, queries=2, keys=3]: an exact tie is the rule's, a near one may flip
    window = torch.tensor([[[[3.0, 3.0, 1.0], [2.0, 1.0, 0.5]], [[4.0, 2.0, 1.0], [1.0, 1.0 - 1e-7, 0.0]]]])
    assert tie_entry("window", window, 1, -1e30, 2)[3] == ((0, 1),)


def test_a_half_precision_case_is_never_held_tighter_than_what_the_dtype_costs_there():
    """bf16 Doge-20M at 2048 tokens: the graph 1.26 from transformers in bf16, which itself moved
    2.26 from fp32; the fixed bf16 tolerance is 1.0."""
    cfg = ValidateConfig(decode_steps=4, greedy_steps=4, atol=1.0, rtol=0.0)
    runner, reference = FakeRunner(15.0, 1.26), FakeRunner(15.0)
    assert not compare_case(runner, reference, [[5, 6, 7]], cfg, "fake").ok
    assert compare_case(runner, reference, [[5, 6, 7]], cfg, "fake", spread=2.26).ok
    assert not compare_case(runner, reference, [[5, 6, 7]], cfg, "fake", spread=1.2).ok
