"""The MT-NLG decoder: a GPT with pre-LayerNorm blocks, learned positions, GELU and a tied LM head.

::

    tokens ─► tok_embeddings + pos_embeddings ─► dropout
              └─► layers["0" .. "L-1"]:  x = x + drop(attn(ln_1(x)))
                                         x = x + drop(mlp(ln_2(x)))
              └─► norm ─► output (weight tied to tok_embeddings) ─► logits

The fused QKV projection orders its output features as ``(head, {q,k,v}, head_dim)`` (Megatron's
layout), so splitting its rows contiguously into ``tp`` pieces splits by whole heads. Layers live in
a ``ModuleDict`` keyed by their global index, so a pipeline stage can delete the layers it does not
own (and the embeddings / head) and keep the same parameter names; ``forward`` skips what is None.
Model code never imports torch.distributed: parallelism is applied from outside (``mtnlg.parallel``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.config import ModelConfig
from mtnlg.device import gelu, inference_attention
from mtnlg.model.decode_linear import project
from mtnlg.model.dropout import HashDropout
from mtnlg.model.dropout import row_keys as dropout_keys
from mtnlg.model.kv_cache import LayerCache


def activation_fn(name: str):
    """The MLP non-linearity: exact GELU (MT-NLG), tanh-approximated GELU (GPT-2) or ReLU."""
    if name == "gelu":
        return gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    from mtnlg.errors import ConfigError

    raise ConfigError(f"model.activation='{name}' is not supported; use gelu, gelu_tanh or relu")


class Attention(nn.Module):
    """Causal multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attention_dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = project(self.qkv, x)
        heads = qkv.shape[-1] // (3 * self.head_dim)  # local heads under tensor parallelism
        q, k, v = qkv.view(B, T, heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        S = k.shape[2]
        dropout = self.attention_dropout if self.training else 0.0
        if T == 1 and attn_mask is not None and not self.training and torch.compiler.is_compiling():
            y = one_query_attention(q, k, v, attn_mask)
        elif attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # T new queries after S - T cached positions: bottom-right-aligned causal mask
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, heads * self.head_dim)
        return project(self.proj, y)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query per row over a masked key set, written out: what a compiled decode
    step uses (:mod:`mtnlg.infer.compiled`), because inductor fuses it into its own kernels while the CPU
    SDPA kernel costs ~40 us a call at decode sizes (8 x 36 heads over 256 keys), a seventh of the step."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


class MLP(nn.Module):
    """hidden -> ffn_hidden -> hidden with the configured activation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=True)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.fc2, self.act(project(self.fc1, x)))


class Block(nn.Module):
    """One pre-LayerNorm transformer layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)
        # hidden dropout, one mask site per residual branch (layout-independent: mtnlg.model.dropout)
        self.drop_attn = HashDropout(cfg.dropout, 1 + 2 * layer_idx)
        self.drop_mlp = HashDropout(cfg.dropout, 2 + 2 * layer_idx)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                attn_mask: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """``keys``: the rows' dropout keys (:func:`~mtnlg.model.dropout.row_keys`), when dropout is on."""
        x = x + self.drop_attn(self.attn(self.ln_1(x), cache, attn_mask), keys=keys)
        x = x + self.drop_mlp(self.mlp(self.ln_2(x)), keys=keys)
        return x


class GPT(nn.Module):
    """The MT-NLG-style decoder. Build it on the meta device and materialize it explicitly
    (:func:`mtnlg.model.init.materialize`), or load weights into it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = cfg.padded_vocab_size()
        # _weight=empty skips nn.Embedding's own normal_ init (ours comes at materialization; on the
        # meta device that init would also pull in torch._dynamo and cost ~1.5 s).
        h = cfg.hidden_size
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(
            self.padded_vocab_size, h, _weight=torch.empty(self.padded_vocab_size, h))
        self.pos_embeddings: nn.Embedding | None = nn.Embedding(
            cfg.max_seq_len, h, _weight=torch.empty(cfg.max_seq_len, h))
        self.emb_dropout = HashDropout(cfg.dropout, 0)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head's weight with the token embedding (MT-NLG ties them)."""
        if self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              token_embeds: torch.Tensor | None = None, start: int = 0,
              keys: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings. ``token_embeds`` replaces the token lookup (soft prompts);
        ``keys``: the rows' dropout keys."""
        h = token_embeds if token_embeds is not None else self.tok_embeddings(tokens)
        if positions is None:
            if start + h.shape[1] > self.cfg.max_seq_len:
                from mtnlg.errors import ConfigError

                raise ConfigError(f"sequence of {start + h.shape[1]} positions exceeds model.max_seq_len="
                                  f"{self.cfg.max_seq_len} (max_position_embeddings); shorten the input")
            positions = torch.arange(start, start + h.shape[1], device=h.device)
        return self.emb_dropout(h + self.pos_embeddings(positions), keys=keys)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LayerCache | None = None, attn_mask: torch.Tensor | None = None,
                token_embeds: torch.Tensor | None = None, logits_at: int | torch.Tensor | None = None,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                row_keys: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` [B, T] -> logits [B, T, padded_vocab].

        On a pipeline stage without embeddings ``tokens`` is the incoming hidden state, and
        without a head the hidden state is returned; ``row_keys`` ([B], the dropout keys of the rows'
        tokens, :func:`~mtnlg.model.dropout.row_keys`) then tells the stage's dropout which rows it holds
        (the first stage computes them from the tokens when not given). ``attn_mask`` (bool, True = attend) is
        broadcast to [B, H, T, S]; without it attention is causal over the cache plus the input.
        ``logits_at`` runs the final norm and head only where logits are needed: a column
        (``-1`` while decoding) or one column per row (a [B] tensor); the result is then [B, V].
        ``head`` replaces ``self.output`` (a faster layout of the same weight for decoding).
        """
        h = self.hidden_states(tokens, positions, cache, attn_mask, token_embeds, logits_at, row_keys)
        out = head if head is not None else self.output
        return out(h) if out is not None else h

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: LayerCache | None = None, attn_mask: torch.Tensor | None = None,
                      token_embeds: torch.Tensor | None = None,
                      logits_at: int | torch.Tensor | None = None,
                      row_keys: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` without the LM head: the final (normed) hidden states [B, T, h] (at
        ``logits_at`` only, when given), for a loss that applies the head itself in chunks (never
        holding all [B*T, vocab] logits at once)."""
        start = cache.length if cache is not None else 0
        keys = row_keys
        if keys is None and self.training and self.cfg.dropout > 0 and self.tok_embeddings is not None \
                and tokens is not None:  # the masks of this batch are keyed by its rows' tokens
            keys = dropout_keys(tokens)
        h = self.embed(tokens, positions, token_embeds, start, keys) if self.tok_embeddings is not None else tokens
        with inference_attention(h.device) if not self.training else contextlib.nullcontext():
            for layer in self.layers.values():
                h = layer(h, cache, attn_mask, keys)
        if cache is not None:
            cache.advance(h.shape[1])
        if logits_at is not None:
            h = h[:, logits_at] if isinstance(logits_at, int) else h[torch.arange(h.shape[0], device=h.device),
                                                                       logits_at]
        if self.norm is not None:
            h = self.norm(h)
        return h


def count_parameters(cfg: ModelConfig, padded_vocab_size: int | None = None) -> int:
    """Closed-form parameter count of :class:`GPT` (tied head, all biases, final LayerNorm).

    per layer: 2 LayerNorms (4h) + QKV (3h^2 + 3h) + proj (h^2 + h) + fc1 (h f + f) + fc2 (f h + h)
    """
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    V = padded_vocab_size if padded_vocab_size is not None else cfg.padded_vocab_size()
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return V * h + cfg.max_seq_len * h + L * per_layer + 2 * h
