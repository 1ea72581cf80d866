"""Load a Doge checkpoint: a local Hugging Face folder, a hub id, or a seeded random preset.

Everything returned is transformers' own DogeForCausalLM in eval mode with eager attention (the
reference, DESIGN §3), or, for a legacy generation (generations.py), our reference of it
(doge_export.legacy): the export wrappers (wrappers.py) reuse its modules and weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from transformers import DogeConfig, DogeForCausalLM

from .errors import DogeExportError
from .generations import checkpoint_shapes, detect_generation, require_supported

RANDOM_PREFIX = "random:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SUPPORTED_ROPE = {"default", "dynamic"}
# preset-only key: weight gain of the random init (test presets are too small to stay varied at 1)
INIT_GAIN_KEY = "doge_export_init_gain"


@dataclass
class LoadedModel:
    model: DogeForCausalLM
    source: str  # what the user passed
    generation: str  # see generations.py
    checkpoint_dir: Path | None  # None for random presets
    generation_config: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # config keys replaced at load time

    @property
    def config(self) -> DogeConfig:
        return self.model.config


def preset_names() -> list[str]:
    files = resources.files("doge_export.models").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def preset_config(name: str) -> dict:
    if name not in preset_names():
        raise DogeExportError(
            f"unknown preset 'random:{name}'; available: "
            + ", ".join(f"random:{n}" for n in preset_names())
        )
    return json.loads(resources.files("doge_export.models").joinpath(f"{name}.json").read_text())


def load_model(source: str, *, seed: int = 0, allow_pickle: bool = False,
               overrides: dict | None = None) -> LoadedModel:
    """Load `source` (random:<preset> | local folder | hub id) as an fp32 eager reference model.

    `overrides` replace config.json keys before the model is built (experiments, tests: e.g. a
    small keep_window_size); the artifact's manifest records them.
    """
    if source.startswith(RANDOM_PREFIX):
        return random_model(source[len(RANDOM_PREFIX):], seed=seed, overrides=overrides)
    path = Path(source).expanduser()
    if not path.exists():
        if HUB_ID.match(source) and not source.startswith((".", "/")):
            path = download_from_hub(source)
        else:
            raise DogeExportError(
                f"model directory '{source}' does not exist; pass a folder with config.json and "
                "*.safetensors, a hub id (org/name), or a preset such as random:doge-20m"
            )
    return load_checkpoint_dir(path, source=str(path.resolve()), allow_pickle=allow_pickle, overrides=overrides)


def random_model(name: str, *, seed: int = 0, overrides: dict | None = None) -> LoadedModel:
    raw = preset_config(name)
    gain = raw.pop(INIT_GAIN_KEY, 1.0)
    config = make_config(with_overrides(raw, overrides))
    torch.manual_seed(seed)
    model = DogeForCausalLM(config)
    randomize_(model, seed=seed, gain=gain)
    return LoadedModel(_reference_mode(model), RANDOM_PREFIX + name, "native", None, overrides=dict(overrides or {}))


def with_overrides(raw: dict, overrides: dict | None) -> dict:
    unknown = sorted(set(overrides or {}) - set(DogeConfig().to_dict()))
    if unknown:
        raise DogeExportError(f"unknown config key(s) to override: {', '.join(unknown)}")
    return {**raw, **(overrides or {})}


def check_model_type(raw: dict) -> None:
    if raw.get("model_type") != "doge":
        raise DogeExportError(
            f"config model_type is {raw.get('model_type')!r}, expected 'doge': this is not a Doge "
            "checkpoint (Doge2 'doge2' is a different architecture and not supported)"
        )


def make_config(raw: dict) -> DogeConfig:
    check_model_type(raw)
    config = DogeConfig(**{k: v for k, v in raw.items() if k != "transformers_version"})
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise DogeExportError(
            f"rope type {rope_type!r} is not supported (Doge uses 'dynamic' or none); "
            f"supported: {sorted(SUPPORTED_ROPE)}"
        )
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize_(model: DogeForCausalLM, *, seed: int, gain: float = 1.0) -> None:
    """Non-degenerate random weights: peaked logits, a live dynamic mask, varied scales.

    Default init gives near-uniform logits and A = 0 (no dynamic mask), under which greedy
    matches prove nothing (facts/export-findings.md). Linear weights ~ N(0, gain^2/fan_in); A, the
    residual scales and every norm weight are randomised; the embedding is scaled so that logits
    through the (tied) lm_head have a standard deviation of about 3. Larger gains give more
    varied greedy streams but a chaotic network: fp32 rounding differences between two correct
    runtimes then grow past 1e-4 (measured: gain 1.5 -> 1.4e-4, this setting -> 4e-5 on a
    600-token Doge-20M prompt).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith("self_attn.A"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.75)
        elif name.endswith(("residual", "norm.weight")):
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        elif p.dim() == 2 and ("embed" in name or "lm_head" in name):
            std = 2.8 / math.sqrt(hidden) if "embed_tokens" in name or "lm_head" in name else hidden**-0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1])))
        else:  # biases (attention_bias / mlp_bias configs)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _reference_mode(model: DogeForCausalLM) -> DogeForCausalLM:
    model.config._attn_implementation = "eager"
    return model.float().eval()


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise DogeExportError(
            f"could not download '{repo_id}' from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). If this machine is offline, "
            f"download it elsewhere with `huggingface-cli download {repo_id} --local-dir DIR`, "
            "copy DIR here and pass --model DIR"
        ) from None


def load_checkpoint_dir(path: Path, *, source: str, allow_pickle: bool, overrides: dict | None = None) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DogeExportError(f"'{path}' has no config.json; expected a Hugging Face model folder")
    raw = json.loads(config_file.read_text())
    check_model_type(raw)
    shapes, use_safetensors = checkpoint_shapes(path, allow_pickle=allow_pickle)
    detection = detect_generation(shapes, raw)
    require_supported(detection)
    gen_file = path / "generation_config.json"
    gen_cfg = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    if detection.generation != "native":  # our reference of that generation (doge_export.legacy)
        from .legacy.load import load_legacy

        model = load_legacy(path, with_overrides(raw, overrides), detection.generation, shapes, use_safetensors)
        return LoadedModel(model, source, detection.generation, path, gen_cfg, dict(overrides or {}))
    config = make_config(with_overrides(raw, overrides))
    if "lm_head.weight" not in shapes:  # trained tied; never let lm_head be random (facts §7.2)
        config.tie_word_embeddings = True
    model = DogeForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, use_safetensors=use_safetensors
    )
    return LoadedModel(_reference_mode(model), source, detection.generation, path, gen_cfg, dict(overrides or {}))
