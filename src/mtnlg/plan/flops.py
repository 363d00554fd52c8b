"""Parameter and FLOP counts: the exact count of our architecture and Megatron's closed forms.

Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", arXiv:2104.04473), with l layers, hidden h, (padded) vocabulary V, sequence s,
batch B (sequences per iteration):

* eq. 2 (parameters): P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h))
* eq. 3 (FLOPs per iteration with full recomputation): F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))

Eq. 3 is 4 passes (forward, recomputed forward, backward = 2 forwards) over the layers
(24·B·s·h² matmul + 4·B·s²·h attention per layer and pass) plus 6·B·s·h·V for the logit layer,
which is never recomputed. Without recomputation one forward pass goes (factor 72, the logit
term stays 6·B·s·h·V); with selective recomputation (Korthikanti et al. 2022) only the attention
core (4·B·s²·h per layer) is recomputed. Both assume a 4·h feed-forward layer, as the papers do.
"""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.errors import ConfigError
from mtnlg.model.transformer import count_parameters

RECOMPUTE = ("full", "selective", "none")


def params_exact(cfg: ModelConfig, tp: int = 1) -> int:
    """Exact parameter count of :class:`mtnlg.model.GPT` with the vocabulary padded for ``tp``."""
    return count_parameters(cfg, padded_vocab_size=cfg.padded_vocab_size(tp))


def params_eq2(num_layers: int, hidden: int, vocab: int, seq_len: int) -> float:
    """Narayanan et al. 2021, eq. 2 (ignores the final LayerNorm; assumes a 4h feed-forward)."""
    l, h, V, s = num_layers, hidden, vocab, seq_len
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


def flops_per_iteration(batch: int, seq_len: int, num_layers: int, hidden: int, vocab: int,
                        recompute: str = "full") -> float:
    """FLOPs of one iteration (``batch`` sequences): eq. 3 for ``full``, the 72-factor form for ``none``."""
    B, s, l, h, V = batch, seq_len, num_layers, hidden, vocab
    if recompute == "full":
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    if recompute == "selective":  # + the attention core (QK^T, softmax·V) once more: 4·B·s²·h per layer
        return 72 * B * s * l * h * h * (1 + s / (6 * h) + s / (18 * h)) + 6 * B * s * h * V
    if recompute == "none":
        return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
    raise ConfigError(f"--recompute '{recompute}' is not one of {list(RECOMPUTE)}")
