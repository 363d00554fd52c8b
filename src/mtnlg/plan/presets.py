"""Model presets and ``--model`` YAML files for the planner.

A preset or YAML gives the architecture as a :class:`~mtnlg.config.ModelConfig` plus the training
sequence length. Presets pad the vocabulary as Megatron does (to a multiple of 128 x tp).
A YAML can be flat (``num_layers``, ``hidden_size``, ``num_heads``, ``vocab_size``, ``seq_len``,
``ffn_hidden_size`` (default 4 x hidden), ``make_vocab_size_divisible_by`` (default 128)) or an
mtnlg config with a ``model:`` section (then ``train.seq_len`` is the sequence length if present).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class PlanModel:
    """An architecture to plan: the model config and the sequence length trained at."""

    name: str
    cfg: ModelConfig
    seq_len: int


def _preset(name: str, layers: int, hidden: int, heads: int, vocab: int, seq: int, ffn: int | None = None) -> PlanModel:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      ffn_hidden_size=ffn or 4 * hidden, max_seq_len=seq, make_vocab_size_divisible_by=128)
    return PlanModel(name, cfg, seq)


PRESETS: dict[str, PlanModel] = {
    # The spec's configuration (BERT vocabulary, 3.75 x FFN).
    "seed-6b": _preset("seed-6b", 30, 4096, 16, 30522, 512, ffn=15360),
    # Brown et al. 2020; Narayanan et al. 2021 Table 1.
    "gpt3-175b": _preset("gpt3-175b", 96, 12288, 96, 50257, 2048),
    # Smith et al. 2022 (MT-NLG): 105 layers, hidden 20480, 128 heads, sequence 2048.
    "mtnlg-530b": _preset("mtnlg-530b", 105, 20480, 128, 50257, 2048),
    # Narayanan et al. 2021 Table 1, last row.
    "megatron-1t": _preset("megatron-1t", 128, 25600, 160, 50257, 2048),
}

FLAT_KEYS = ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_len", "ffn_hidden_size",
             "make_vocab_size_divisible_by", "name")


def load_model(spec: str) -> PlanModel:
    """A preset name or the path of a YAML file describing the architecture."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--model '{spec}' is neither a preset {list(PRESETS)} nor a YAML file"
                          + did_you_mean(spec, PRESETS))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--model {spec}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model {spec}: expected a mapping of {list(FLAT_KEYS)}")
    if isinstance(data.get("model"), dict):  # an mtnlg config file
        model = dict(data["model"])
        valid = {f.name for f in fields(ModelConfig)}
        for key in model:
            if key not in valid:
                raise ConfigError(f"--model {spec}: unknown key model.{key}" + did_you_mean(key, valid))
        cfg = ModelConfig(**model)
        seq = int((data.get("train") or {}).get("seq_len", cfg.max_seq_len))
        cfg.validate()
        return PlanModel(path.stem, cfg, seq)
    for key in data:
        if key not in FLAT_KEYS:
            raise ConfigError(f"--model {spec}: unknown key '{key}'; use {list(FLAT_KEYS)}"
                              + did_you_mean(key, FLAT_KEYS))
    missing = [k for k in ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_len") if k not in data]
    if missing:
        raise ConfigError(f"--model {spec}: missing {missing}; a model YAML needs num_layers, hidden_size, "
                          "num_heads, vocab_size and seq_len")
    try:
        h, seq = int(data["hidden_size"]), int(data["seq_len"])
        cfg = ModelConfig(vocab_size=int(data["vocab_size"]), hidden_size=h, num_layers=int(data["num_layers"]),
                          num_heads=int(data["num_heads"]), ffn_hidden_size=int(data.get("ffn_hidden_size", 4 * h)),
                          max_seq_len=seq,
                          make_vocab_size_divisible_by=int(data.get("make_vocab_size_divisible_by", 128)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {spec}: every size must be an integer ({e})") from None
    cfg.validate()
    return PlanModel(str(data.get("name", path.stem)), cfg, seq)
