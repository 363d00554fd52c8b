"""The spec's public API: ``MegatronModelConfig`` and ``MegatronLmModel``.

The spec writes ``from transformers import MegatronModelConfig, MegatronLmModel``; with mtnlg the one
change is ``from mtnlg import MegatronModelConfig, MegatronLmModel``. Every keyword of the spec's
example is accepted with the spec's value as its default, validated, and mapped onto mtnlg's own
:class:`~mtnlg.config.ModelConfig` (short internal names) by :meth:`MegatronModelConfig.to_model_config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtnlg.atomic import atomic_directory
from mtnlg.checkpoint import Resolved, load_weights, resolve_checkpoint, run_config, run_tokenizer
from mtnlg.checkpoint.resolve import MODEL_TYPE
from mtnlg.checkpoint import verify_saved_model, write_manifest
from mtnlg.config import ACTIVATIONS, OUTPUT_LAYER_INITS, ModelConfig, check_type
from mtnlg.data.tokenizer import Tokenizer, byte_tokenizer
from mtnlg.errors import CheckpointError, ConfigError, did_you_mean
from mtnlg.model.init import build_model, materialize
from mtnlg.model.transformer import GPT

log = logging.getLogger(__name__)

PROMPT_STYLES = ("prepend", "prefix_suffix")
STYLE_ARG_NAMES = ("prefix", "suffix")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SOFT_PROMPT_FILE = "soft_prompt.safetensors"


@dataclass(init=False)
class MegatronModelConfig:
    """The spec's model configuration. Field by field:

    * ``vocab_size`` (30522), ``hidden_size`` (4096), ``num_hidden_layers`` (30), ``num_attention_heads``
      (16), ``intermediate_size`` (15360), ``max_position_embeddings`` (512): the architecture.
    * ``use_cache``: generation keeps a KV cache (True) or recomputes the whole prefix each step.
    * ``layernorm_eps``: epsilon of every LayerNorm.
    * ``init_method_std``: std of the normal init; ``output_layer_init_method``: None (std/sqrt(2L) for
      the attention output and MLP fc2, MT-NLG's scaled init), "scaled_normal", "normal" or "zeros".
    * ``parallel_output`` (Megatron's meaning): under tensor parallelism the LM head returns vocab-parallel
      logits (a ``Shard(-1)`` DTensor) consumed by the vocab-parallel loss; False gathers full logits.
      In training ``parallel.loss_parallel`` follows it; in TP inference the vocab-parallel logits are
      gathered once at the model's boundary for sampling. No effect on one device.
    * ``activation_function``: "gelu" (exact), "gelu_tanh" or "relu".
    * ``pre_process_first`` / ``post_process_last``: the first pipeline stage always holds the embedding
      and the last the final norm + head (Megatron's ``pre_process`` / ``post_process``); these count
      them as one transformer layer in the uniform split (Megatron's ``account_for_embedding_in_pipeline_split``
      / ``account_for_loss_in_pipeline_split``), so those stages get a layer fewer (``mtnlg.parallel.pipeline``).
    * ``quantize`` / ``quantize_config``: int8 weight-only Linear layers for inference (``mtnlg.model.quantize``);
      a ``quantize_config`` without ``quantize=True``, and ``symmetric=False``, are refused.
    * ``enable_input_require_grads``: make the embedding output require grad, so activation checkpointing
      and input-gradient methods work with a frozen embedding (as in Hugging Face).
    * ``prompt_tuning`` and ``prompt_tuning_*``: trainable soft prompt over a frozen model
      (``mtnlg.model.prompt_tuning``): number of virtual tokens, init text, update period, lr multiplier,
      maximum sequence length (also at generation) and vocabulary, and the prompt style ("prepend": soft
      tokens, prefix, input, suffix; "prefix_suffix": prefix, soft tokens, input, suffix) with its
      arguments read as ``args_type`` says (:attr:`prompt_style_args`).
    """

    vocab_size: int = 30522
    hidden_size: int = 4096
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    intermediate_size: int = 15360
    max_position_embeddings: int = 512
    use_cache: bool = True
    layernorm_eps: float = 1e-5
    init_method_std: float = 0.02
    output_layer_init_method: str | None = None
    parallel_output: bool = True
    activation_function: str = "gelu"
    pre_process_first: bool = False
    post_process_last: bool = False
    quantize: bool = False
    quantize_config: dict[str, Any] | None = None
    enable_input_require_grads: bool = False
    prompt_tuning: bool = False
    prompt_tuning_num_tokens: int = 0
    prompt_tuning_init_text: str = ""
    prompt_tuning_update_every_n_steps: int = 1
    prompt_tuning_lr_multiplier: float = 1.0
    prompt_tuning_max_seq_length: int = 512
    prompt_tuning_vocab_size: int = 30522
    prompt_tuning_prompt_style: str = "prepend"
    prompt_tuning_prompt_style_args: dict[str, Any] = field(default_factory=dict)
    prompt_tuning_prompt_style_args_type: str = "dict"
    prompt_tuning_prompt_style_args_keys: list[str] = field(default_factory=lambda: ["prefix", "suffix"])
    prompt_tuning_prompt_style_args_values: list[str] = field(default_factory=lambda: ["hello world", "goodbye"])

    def __init__(self, **kwargs: Any):
        fields = {f.name: f for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        for key in kwargs:
            if key not in fields:
                raise ConfigError(f"MegatronModelConfig got an unknown keyword '{key}'" + did_you_mean(key, fields))
        for name, f in fields.items():
            if name in kwargs:
                value = check_type(name, kwargs[name], hints[name])
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        self.validate()

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "prompt_tuning_update_every_n_steps", "prompt_tuning_max_seq_length",
                     "prompt_tuning_vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                              f"{self.num_attention_heads}; change one of them")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"activation_function='{self.activation_function}' is not supported; use one of "
                              f"{list(ACTIVATIONS)}" + did_you_mean(self.activation_function, ACTIVATIONS))
        if self.output_layer_init_method is not None and self.output_layer_init_method not in OUTPUT_LAYER_INITS:
            raise ConfigError(f"output_layer_init_method='{self.output_layer_init_method}' is not supported; use None "
                              f"or one of {list(OUTPUT_LAYER_INITS)}")
        if not self.layernorm_eps > 0 or not self.init_method_std > 0:
            raise ConfigError("layernorm_eps and init_method_std must be > 0")
        if self.prompt_tuning_num_tokens < 0:
            raise ConfigError(f"prompt_tuning_num_tokens must be >= 0, got {self.prompt_tuning_num_tokens}")
        if self.prompt_tuning and self.prompt_tuning_num_tokens == 0:
            raise ConfigError("prompt_tuning=True needs prompt_tuning_num_tokens > 0 (the number of soft-prompt tokens)")
        if not self.prompt_tuning_lr_multiplier > 0:
            raise ConfigError(f"prompt_tuning_lr_multiplier must be > 0, got {self.prompt_tuning_lr_multiplier}")
        if self.prompt_tuning_prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_tuning_prompt_style='{self.prompt_tuning_prompt_style}' is not supported; use one "
                              f"of {list(PROMPT_STYLES)}" + did_you_mean(self.prompt_tuning_prompt_style, PROMPT_STYLES))
        if self.prompt_tuning_prompt_style_args_type not in ("dict", "list"):
            raise ConfigError(f"prompt_tuning_prompt_style_args_type='{self.prompt_tuning_prompt_style_args_type}' must "
                              "be 'dict' (keyword args: the dict plus the keys/values pairs) or 'list' (positional "
                              "args: the values list)")
        room = min(self.prompt_tuning_max_seq_length, self.max_position_embeddings)
        if self.prompt_tuning and self.prompt_tuning_num_tokens + 1 > room:
            raise ConfigError(f"prompt_tuning_num_tokens={self.prompt_tuning_num_tokens} leaves no room in "
                              f"min(prompt_tuning_max_seq_length, max_position_embeddings)={room}")
        self._validate_prompt_style_args()
        self._validate_quantize()

    @property
    def prompt_style_args(self) -> dict[str, Any]:
        """The style arguments (``prefix`` / ``suffix`` texts), read where ``prompt_style_args_type`` says:

        * ``"dict"``: keyword arguments: the ``prompt_tuning_prompt_style_args`` dict plus the pairs of the
          parallel ``_keys`` / ``_values`` lists (a key given in both must agree);
        * ``"list"``: positional arguments: ``prompt_tuning_prompt_style_args_values`` in the style's own
          order (prefix, suffix); the keys list and the dict are not read.
        """
        if self.prompt_tuning_prompt_style_args_type == "list":
            return dict(zip(STYLE_ARG_NAMES, self.prompt_tuning_prompt_style_args_values))
        args = dict(self.prompt_tuning_prompt_style_args)
        args.update(zip(self.prompt_tuning_prompt_style_args_keys, self.prompt_tuning_prompt_style_args_values))
        return args

    def _validate_prompt_style_args(self) -> None:
        keys, values = self.prompt_tuning_prompt_style_args_keys, self.prompt_tuning_prompt_style_args_values
        explicit = self.prompt_tuning_prompt_style_args
        if self.prompt_tuning_prompt_style_args_type == "list":
            if len(values) > len(STYLE_ARG_NAMES):
                raise ConfigError(f"prompt_tuning_prompt_style_args_values has {len(values)} entries but the style "
                                  f"takes at most {len(STYLE_ARG_NAMES)} positional arguments {list(STYLE_ARG_NAMES)}")
            if explicit:
                raise ConfigError("prompt_tuning_prompt_style_args is not read with "
                                  "prompt_tuning_prompt_style_args_type='list' (the values list is); empty it or use "
                                  "args_type='dict'")
        else:
            if len(keys) != len(values):
                raise ConfigError(f"prompt_tuning_prompt_style_args_keys has {len(keys)} entries but "
                                  f"prompt_tuning_prompt_style_args_values has {len(values)}; give them equal lengths")
            if len(set(keys)) != len(keys):
                raise ConfigError(f"prompt_tuning_prompt_style_args_keys has duplicates: {keys}")
            for k, v in zip(keys, values):
                if k in explicit and explicit[k] != v:
                    raise ConfigError(f"prompt_tuning_prompt_style_args['{k}']={explicit[k]!r} contradicts "
                                      f"prompt_tuning_prompt_style_args_values' {v!r} for the same key; keep one")
        for k, v in self.prompt_style_args.items():
            if k not in STYLE_ARG_NAMES:
                raise ConfigError(f"prompt style argument '{k}' is unknown; the styles take {list(STYLE_ARG_NAMES)}"
                                  + did_you_mean(k, STYLE_ARG_NAMES))
            if not isinstance(v, str):
                raise ConfigError(f"prompt style argument '{k}' must be a string, got {type(v).__name__}")

    def _validate_quantize(self) -> None:
        if self.quantize_config is None:
            return
        if not self.quantize:
            raise ConfigError("quantize_config is set but quantize=False, so it would be ignored; set quantize=True "
                              "or drop quantize_config")
        unknown = set(self.quantize_config) - {"bits", "group_size", "symmetric", "per_channel"}
        if unknown:
            raise ConfigError(f"quantize_config has unknown keys {sorted(unknown)}; valid: bits, group_size, "
                              "symmetric, per_channel")
        from mtnlg.model.quantize import QuantConfig

        QuantConfig.from_dict(self.quantize_config)  # bits, symmetric, group_size: one-line errors

    def to_model_config(self) -> ModelConfig:
        """mtnlg's internal architecture config."""
        return ModelConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, ffn_hidden_size=self.intermediate_size,
            max_seq_len=self.max_position_embeddings, layernorm_eps=self.layernorm_eps,
            init_std=self.init_method_std, output_layer_init=self.output_layer_init_method,
            activation=self.activation_function, parallel_output=self.parallel_output,
            pre_process_first=self.pre_process_first, post_process_last=self.post_process_last)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **extra: Any) -> MegatronModelConfig:
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_hidden_size,
                   max_position_embeddings=cfg.max_seq_len, layernorm_eps=cfg.layernorm_eps,
                   init_method_std=cfg.init_std, output_layer_init_method=cfg.output_layer_init,
                   activation_function=cfg.activation, parallel_output=cfg.parallel_output,
                   pre_process_first=cfg.pre_process_first, post_process_last=cfg.post_process_last, **extra)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MegatronLmModel(nn.Module):
    """The spec's model: a :class:`~mtnlg.model.transformer.GPT` plus a tokenizer.

    Construction builds the network on the meta device (no memory, even for the 6B config). Weights
    are allocated by :meth:`materialize` (deterministic for a seed), by :meth:`from_pretrained`, or
    lazily on first use (``__call__`` / ``generate``) on CPU in fp32 with seed 0.
    """

    def __init__(self, config: MegatronModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        if not isinstance(config, MegatronModelConfig):
            raise ConfigError(f"MegatronLmModel needs a MegatronModelConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but vocab_size="
                              f"{config.vocab_size}; raise vocab_size to at least {self.tokenizer.vocab_size}")
        self.model: GPT = build_model(config.to_model_config())
        self._input_grad_hook = None
        if config.enable_input_require_grads:
            self.enable_input_require_grads()

    # -- weights --------------------------------------------------------------------------------
    @property
    def is_materialized(self) -> bool:
        return not any(p.is_meta for p in self.model.parameters())

    def materialize(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> MegatronLmModel:
        """Allocate and initialise the weights (MT-NLG init, deterministic for ``seed``)."""
        if self.config.quantize:  # int8 straight from the meta device, one Linear at a time
            from mtnlg.model.quantize import materialize_quantized

            materialize_quantized(self.model, self.config.quantize_config, seed=seed, device=device)
        else:
            materialize(self.model, device=device, dtype=dtype, seed=seed)
        return self._quantize_if_configured()

    def _ensure_materialized(self) -> None:
        if not self.is_materialized:
            log.info("materializing %s parameters on CPU (fp32, seed 0); call .materialize() to choose",
                     f"{self.num_parameters():,}")
            self.materialize()

    def num_parameters(self) -> int:
        """Number of parameters (the tied LM head counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def enable_input_require_grads(self) -> None:
        def hook(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            out.requires_grad_(True)

        if self._input_grad_hook is None:
            self._input_grad_hook = self.model.tok_embeddings.register_forward_hook(hook)

    # -- forward / generate ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | list[list[int]] | list[int]) -> torch.Tensor:
        """Token ids [B, T] (or [T]) -> logits [B, T, vocab_size]."""
        self._ensure_materialized()
        device = next(self.model.parameters()).device
        ids = torch.as_tensor(input_ids, device=device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ConfigError(f"input_ids must be in [0, {self.config.vocab_size}), got values in "
                              f"[{int(ids.min())}, {int(ids.max())}]")
        return self.model(ids)[..., : self.config.vocab_size]

    def generate(self, text: str, max_length: int = 50, max_new_tokens: int | None = None,
                 return_full_text: bool = True, **sampling: Any) -> str:
        """Continue ``text``. ``max_length`` counts prompt + new tokens (as in Hugging Face);
        ``max_new_tokens`` overrides it. Returns the prompt followed by its continuation, or the
        continuation alone with ``return_full_text=False``. ``sampling``: temperature, top_k, top_p, seed."""
        from mtnlg.infer.generate import SamplingParams, generate

        if not isinstance(text, str):
            raise ConfigError(f"generate() takes a str prompt, got {type(text).__name__}")
        self._ensure_materialized()
        known = {f.name for f in dataclasses.fields(SamplingParams)} - {"max_new_tokens", "max_length", "use_cache",
                                                                         "vocab_limit"}
        for key in sampling:
            if key not in known:
                raise ConfigError(f"generate() got an unknown sampling option '{key}'" + did_you_mean(key, known))
        prompt, soft = self.encode_prompt(text)
        if soft is not None and (max_new_tokens is not None or max_length > len(prompt)):
            # prompt tuning: the prompt and its continuation stay within prompt_tuning_max_seq_length
            wanted = max_new_tokens if max_new_tokens is not None else max_length - len(prompt)
            max_new_tokens = self.soft_prompt.new_token_budget(len(prompt), wanted)
        # one carrier: max_new_tokens wins over max_length (as in HF); the one budget rule: decode.token_budget
        params = SamplingParams(max_new_tokens=max_new_tokens, max_length=max_length if max_new_tokens is None else None,
                                use_cache=self.config.use_cache,
                                stop_token_ids=sampling.pop("stop_token_ids", [self.tokenizer.eod_id]),
                                vocab_limit=self.tokenizer.vocab_size, **sampling)
        was_training = self.model.training
        self.model.eval()
        try:
            continuation = generate(self.model, [prompt], params, self.tokenizer, soft_prompt=soft)[0].text
        finally:
            self.model.train(was_training)
        return text + continuation if return_full_text else continuation

    def encode_prompt(self, text: str):
        """Token ids of ``text`` as the model sees them, and the soft prompt to splice in (or None);
        with prompt tuning the ids carry placeholders (:meth:`mtnlg.model.prompt_tuning.SoftPrompt.layout`)."""
        return self.with_soft_prompt(self.tokenizer.encode(text))

    def with_soft_prompt(self, ids: list[int]):
        """``ids`` laid out around the soft prompt (placeholders, prefix / suffix texts) and the splice
        for the decode loop; ``(ids, None)`` without prompt tuning."""
        soft = getattr(self, "soft_prompt", None)
        if soft is None:
            return list(ids), None
        return soft.format_for_generation(ids, self.tokenizer)

    def context_budget(self, max_new_tokens: int) -> int:
        """How many input tokens fit with ``max_new_tokens`` more: the model's context, or with prompt
        tuning ``prompt_tuning_max_seq_length``, less the soft prompt and its texts."""
        soft = getattr(self, "soft_prompt", None)
        if soft is None:
            return self.model.cfg.max_seq_len - max_new_tokens
        extra = len(soft.layout(self.tokenizer, [])[0])
        return min(self.model.cfg.max_seq_len, soft.max_seq_length) - max_new_tokens - extra

    # -- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` atomically (temp dir + rename).

        A quantized model is saved as it is (int8 ``qweight`` + ``scales``, loaded back without an fp32
        copy); a soft prompt, when there is one, goes to ``soft_prompt.safetensors``."""
        from safetensors.torch import save_file

        self._ensure_materialized()
        out = Path(directory)
        with atomic_directory(out) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()
                     if k != "output.weight" or self.model.output.weight is not self.model.tok_embeddings.weight}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mtnlg": "1"})
            (tmp / CONFIG_FILE).write_text(json.dumps({"model_type": MODEL_TYPE, **self.config.to_dict()},
                                                      indent=2, ensure_ascii=False))
            self.tokenizer.save(tmp)
            if getattr(self, "soft_prompt", None) is not None:
                self.soft_prompt.save(tmp / SOFT_PROMPT_FILE)
            write_manifest(tmp, fmt="mtnlg-pretrained-1")  # checksums, verified by from_pretrained
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path | Resolved, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, quantize: bool | None = None) -> MegatronLmModel:
        """Load what :meth:`save_pretrained` wrote, or a training run: a RUN dir (its newest complete
        checkpoint), its ``checkpoints/`` dir or one checkpoint dir (any layout, see :mod:`mtnlg.checkpoint`).
        The path is interpreted by :func:`mtnlg.checkpoint.resolve_checkpoint`; weights are verified
        against their checksums and read into a model built once.

        ``quantize`` (default: as saved) loads the weights straight into int8, one Linear at a time."""
        resolved = resolve_checkpoint(directory)
        d = resolved.path
        if resolved.kind == "checkpoint":
            if quantize:  # straight into int8, one tensor at a time
                return cls._from_run_quantized(resolved, device, dtype)
            model = cls(MegatronModelConfig.from_model_config(run_config(resolved).model),
                        tokenizer=run_tokenizer(resolved))
            materialize(model.model, device=device, dtype=dtype, init=False)
            load_weights(model.model, d)
            model.model.tie_weights()
            return model._quantize_if_configured()
        cfg_path, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{cfg_path} is not a JSON object")
        raw.pop("model_type", None)
        config = MegatronModelConfig(**raw)
        if quantize is not None and quantize != config.quantize:
            config.quantize = quantize
            if not quantize:
                config.quantize_config = None
            config.validate()
        model = cls(config, tokenizer=Tokenizer.load(d))
        verify_saved_model(d, [WEIGHTS_FILE] + ([SOFT_PROMPT_FILE] if (d / SOFT_PROMPT_FILE).is_file() else []))
        model._load_weights(weights, device, dtype)
        if (d / SOFT_PROMPT_FILE).is_file():
            from mtnlg.model.prompt_tuning import load_soft_prompt

            load_soft_prompt(model, d / SOFT_PROMPT_FILE)
        return model._quantize_if_configured()

    @classmethod
    def _from_run_quantized(cls, resolved: Resolved, device: str | torch.device,
                            dtype: torch.dtype) -> MegatronLmModel:
        """A training checkpoint straight into int8: each Linear read alone from the sharded checkpoint,
        quantized and freed (peak: int8 model + fp32 embeddings + one fp32 Linear; 6B: ~7 GB, not 24)."""
        from mtnlg.checkpoint.stream import dcp_reader
        from mtnlg.model.quantize import load_quantized

        mcfg = run_config(resolved).model
        model = cls(MegatronModelConfig.from_model_config(mcfg, quantize=True), tokenizer=run_tokenizer(resolved))
        load_quantized(model.model, dcp_reader(resolved.path), None, device, dtype)
        model.model.eval()
        return model._quantize_if_configured()

    def _load_weights(self, weights: Path, device: str | torch.device, dtype: torch.dtype) -> None:
        """Fill the meta model from a safetensors file; with ``config.quantize`` one tensor at a time, each
        Linear quantized as it arrives (int8 files taken as they are): the fp32 model never exists."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if self.config.quantize:
                from mtnlg.model.quantize import load_quantized

                with safe_open(str(weights), "pt") as f:
                    keys = set(f.keys())

                    def read(name: str, _shape: torch.Size) -> torch.Tensor | None:
                        return f.get_tensor(name) if name in keys else None

                    load_quantized(self.model, read, self.config.quantize_config, device, dtype)
                self.model.eval()
                return
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights} is corrupt or truncated ({e})") from None
        if any(k.endswith(".qweight") for k in state):
            raise CheckpointError(f"{weights} holds int8 weights but config.json says quantize=False; load it with "
                                  "quantize=True")
        materialize(self.model, device=device, dtype=dtype, init=False)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "output.weight"]
        if missing or unexpected:
            raise CheckpointError(f"{weights} does not match config.json: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}")
        self.model.tie_weights()

    def quantize(self, quantize_config: dict[str, Any] | None = None) -> MegatronLmModel:
        """Switch a loaded model to int8 weight-only inference (sets ``config.quantize``)."""
        self.config.quantize = True
        if quantize_config is not None:
            self.config.quantize_config = quantize_config
        self.config.validate()
        self._ensure_materialized()
        return self._quantize_if_configured()

    def _quantize_if_configured(self) -> MegatronLmModel:
        """After the weights exist: ``config.quantize`` replaces the Linears by int8 ones
        (``mtnlg.model.quantize``); ``config.prompt_tuning`` adds the soft prompt (``mtnlg.model.prompt_tuning``)."""
        if self.config.quantize:
            from mtnlg.model.quantize import quantize_model

            quantize_model(self.model, self.config.quantize_config)
            self.model.eval()
        if self.config.prompt_tuning and getattr(self, "soft_prompt", None) is None:
            from mtnlg.model.prompt_tuning import SoftPrompt

            self.soft_prompt = SoftPrompt.from_config(self).to(self.model.tok_embeddings.weight.device)
        return self

