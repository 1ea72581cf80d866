"""The graph's dynamic NTK RoPE frequencies equal transformers' bit for bit up to max_context
(a table torch computes at export); ONNX Runtime's own Pow would differ by an ulp (rope.py)."""

import io

import numpy as np
import onnxruntime as ort
import torch
from conftest import CROSSING

from doge_export.model import load_model
from doge_export.rope import RotaryFromPositions

TABLE_TO = 300


class InvFreq(torch.nn.Module):
    def __init__(self, rotary):
        super().__init__()
        self.rotary = rotary

    def forward(self, position_ids):
        return self.rotary.inv_freq(position_ids)


def _session(rotary) -> ort.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(InvFreq(rotary), (torch.tensor([[70]]),), buffer, input_names=["position_ids"], dynamo=False,
                      dynamic_axes={"position_ids": {0: "batch", 1: "sequence"}})
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def _transformers_inv_freq(model, n: int) -> np.ndarray:
    """What transformers' rotary uses for a fresh forward over positions 0..n-1."""
    rotary = model.model.rotary_emb
    rotary.inv_freq, rotary.max_seq_len_cached = rotary.original_inv_freq.clone(), rotary.original_max_seq_len
    rotary(torch.zeros(1, n, model.config.hidden_size), torch.arange(n)[None])
    return rotary.inv_freq.numpy()


def test_frequencies_equal_transformers_up_to_the_table_end_and_close_past_it():
    loaded = load_model("random:tiny", seed=0, overrides=CROSSING)
    assert loaded.config.rope_parameters["rope_type"] == "dynamic"
    session = _session(RotaryFromPositions(loaded.config, TABLE_TO))
    for n in [1, 30, 64, 65, 66, 100, 257, TABLE_TO, TABLE_TO + 1, 400]:
        got = session.run(None, {"position_ids": np.arange(n)[None]})[0]
        want = _transformers_inv_freq(loaded.model, n)
        if n <= TABLE_TO:
            np.testing.assert_array_equal(got, want, err_msg=f"seq_len {n}")
        else:  # the in-graph formula: ONNX Runtime's Pow, within a couple of ulps
            np.testing.assert_allclose(got, want, rtol=3e-7, err_msg=f"seq_len {n}")
