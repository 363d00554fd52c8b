"""Configuration: one dataclass per section, loaded from YAML and overridden by ``--section.key=value``.

Sections: ``model``, ``data``, ``parallel``, ``train``, ``checkpoint``, ``log``, ``serve``, ``sft``.
Every value is type-checked against its annotation; an unknown key or a wrong type raises a
:class:`~mtnlg.errors.ConfigError` with one line naming the key, the expected type and the closest
valid key. The defaults are the embedded default job: a small MT-NLG model trained on all the
Chinese text of fortunes-zh (the ``poems`` corpus weighted up, blended with ``zh``) on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtnlg.config_types import apply_overrides, check_type, choice as _choice, parse_value  # noqa: F401
from mtnlg.data.corpora import corpus_weights
from mtnlg.errors import ConfigError, did_you_mean

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
OUTPUT_LAYER_INITS = ("scaled_normal", "normal", "zeros")


@dataclass
class ModelConfig:
    """Architecture of the GPT decoder (MT-NLG style: pre-LN, learned positions, GELU, tied head)."""

    # None = the tokenizer's size: for a built-in corpus, a token for every character it holds plus
    # its frequent merges (see data/tokenizer.py); a number trains a BPE of exactly that size.
    vocab_size: int | None = None
    # The default job's size: at the few minutes' budget of 2 CPU cores the number of steps decides the loss,
    # so this small fast model wins (docs/train.md, "Choosing the default job": 0.7M to 13M measured).
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    ffn_hidden_size: int = 384
    max_seq_len: int = 512  # learned position embeddings (the spec's max_position_embeddings)
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    output_layer_init: str | None = None  # None = std / sqrt(2 * num_layers) ("scaled_normal")
    activation: str = "gelu"
    dropout: float = 0.0  # hidden (residual) dropout
    attention_dropout: float = 0.0
    # Pad the embedding table to a multiple of this (Megatron's make-vocab-size-divisible-by).
    # The padded vocabulary is also rounded up to a multiple of the tensor-parallel degree.
    make_vocab_size_divisible_by: int = 1
    # Megatron's parallel_output: under tensor parallelism the LM head returns vocab-parallel logits
    # (Shard(-1), consumed by the vocab-parallel cross entropy) instead of gathering full logits.
    parallel_output: bool = True
    # Pipeline split (see mtnlg.parallel.pipeline.stage_layer_counts). The first stage always holds the
    # embeddings and the last the final norm + head (Megatron's pre_process / post_process); these flags
    # make the split count them as one transformer layer each (Megatron's
    # account_for_embedding_in_pipeline_split / account_for_loss_in_pipeline_split).
    pre_process_first: bool = False
    post_process_last: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}; "
                f"pick num_heads among {sorted(sorted((d for d in range(1, 129) if self.hidden_size % d == 0), key=lambda d: abs(d - self.num_heads))[:6])}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation='{self.activation}' is not supported; use one of {list(ACTIVATIONS)}"
                              + did_you_mean(self.activation, ACTIVATIONS))
        if self.output_layer_init is not None and self.output_layer_init not in OUTPUT_LAYER_INITS:
            raise ConfigError(f"model.output_layer_init='{self.output_layer_init}' is not supported; use None or one "
                              f"of {list(OUTPUT_LAYER_INITS)}" + did_you_mean(self.output_layer_init, OUTPUT_LAYER_INITS))
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        if not self.layernorm_eps > 0:
            raise ConfigError(f"model.layernorm_eps must be > 0, got {self.layernorm_eps}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (as Megatron pads).

        The one padding formula: the runtime (``mtnlg.parallel.tensor.tp_model_config``) and the planner
        (``mtnlg.plan``) both use it; e.g. GPT-2's 50,257 tokens with 128 at tp=8 -> 51,200 rows."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is not known yet (None = the tokenizer's size): set "
                              "--model.vocab_size=N, or let the run's tokenizer fill it in")
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class DataConfig:
    """Where training tokens come from."""

    # Built-in corpus used when `paths` is empty: a name, or a weighted blend of names (each split by
    # documents, then mixed by weight). The default: all Chinese text of fortunes-zh, poems at twice their share.
    corpus: str = "poems:0.1,zh:0.9"
    # Preprocessed prefixes, optionally weighted: [0.7, "a", 0.3, "b"] or ["a", "b"].
    paths: list[Any] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer dir; None = train one on the corpus and cache it
    split: str = "90,5,5"  # train,valid,test by documents
    seed: int = 1234

    def validate(self) -> None:
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"data.split='{self.split}' must be three comma-separated numbers, e.g. 98,1,1") from None
        if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.split='{self.split}' must be three non-negative numbers, e.g. 98,1,1")
        if not self.paths:  # the names and weights of data.corpus, checked before anything runs
            corpus_weights(self.corpus)


@dataclass
class ParallelConfig:
    """The 4-D layout: world = dp_replicate x dp_shard x tp x pp (dp_shard=-1 takes what is left)."""

    dp_replicate: int = 1  # DDP replicas (or HSDP replica groups when dp_shard > 1)
    dp_shard: int = -1  # FSDP2 shards; -1 = world_size / (dp_replicate * tp * pp)
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = True  # with tp > 1: shard LayerNorm/dropout regions along the sequence
    # Vocab-parallel cross entropy: a spelling of model.parallel_output (the spec's field); False in either
    # turns both off (Config.validate), so the head's layout and the loss always agree.
    loss_parallel: bool = True
    fsdp_reshard_after_forward: bool = True  # False = ZeRO-2-like (keep params gathered until backward)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved | zb
    pp_microbatches: int = 0  # 0 = pp * vpp
    vpp: int = 1  # virtual stages per rank (interleaved schedules)
    pp_layers: list[int] | None = None  # explicit layers per stage, e.g. [3, 5]
    pp_balance: str = "uniform"  # uniform | auto | profile
    grad_sync: str = "mean"  # mean | token_weighted
    sync_every: int = 1  # > 1: local-SGD / DiLoCo outer step every H inner steps
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    # sync_every > 1: run the outer average asynchronously over the next inner steps and apply it one
    # outer step late (overlapped / streaming DiLoCo; mtnlg.parallel.data.OuterSync)
    outer_async: bool = False

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "vpp", "sync_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (fill the rest), got {self.dp_shard}")
        _choice("parallel.pp_schedule", self.pp_schedule, ("gpipe", "1f1b", "interleaved", "zb"))
        _choice("parallel.pp_balance", self.pp_balance, ("uniform", "auto", "profile"))
        _choice("parallel.grad_sync", self.grad_sync, ("mean", "token_weighted"))
        if self.pp_microbatches < 0:
            raise ConfigError(f"parallel.pp_microbatches must be >= 0, got {self.pp_microbatches}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks (``dp_replicate * dp_shard``; resolve ``dp_shard=-1`` first)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        """Processes the layout needs (``pp * dp * tp``; resolve ``dp_shard=-1`` first)."""
        return self.pp * self.dp * self.tp

    def check_model(self, model: ModelConfig) -> None:
        """Heads and the FFN width must split evenly over ``tp`` ranks (checked before any launch)."""
        if model.num_heads % self.tp:
            divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
            raise ConfigError(f"model.num_heads={model.num_heads} is not divisible by parallel.tp={self.tp}; "
                              f"choose parallel.tp among {divisors}")
        if model.ffn_hidden_size % self.tp:
            raise ConfigError(f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp="
                              f"{self.tp}; change one of them")


@dataclass
class TrainConfig:
    """Optimisation, precision and the training schedule."""

    steps: int = 2500  # the default job: ~2.6M tokens (about six passes over the training split), ~3 min on 2 idle CPU cores
    seq_len: int = 128
    global_batch_size: int = 8  # sequences per optimizer step (all data-parallel ranks together)
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    optimizer: str = "muon"  # muon (the blocks' matrices; AdamW for the rest: train/muon.py) | adamw
    lr: float = 2e-3
    muon_lr: float | None = None  # Muon's peak lr; None = 4 x lr (measured best: docs/train.md, "Optimizer")
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    lr_decay_steps: int | None = None  # None = steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # MT-NLG batch-size ramp: start at rampup_batch_start and add rampup_batch_increment sequences at
    # even intervals until global_batch_size is reached after rampup_tokens tokens (0 = no ramp).
    rampup_batch_start: int = 0
    rampup_batch_increment: int = 0
    rampup_tokens: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False  # torch.compile each block (inductor; on-disk cache, so a second run does not recompile)
    chunked_loss: bool = True  # LM head + cross entropy in token chunks (never all [tokens, vocab] logits); 1 process
    fused_adamw: bool = True  # torch's fused AdamW kernel where it applies (plain tensors)
    threads: int = 0  # CPU threads: 0 = torch's, fewer while another process slows the steps (train/threads.py); N = N
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 250
    eval_batches: int = 0  # valid evaluations: at most this many global batches of sequences; 0 = the whole split
    max_bad_steps: int = 5
    max_time_s: float | None = None  # stop (and checkpoint) after this much wall time
    # Every long_seq_every-th step trains on long_seq_len-token sequences (a multiple of seq_len; the same tokens a
    # step where the batch divides): short sequences for speed, long ones so that every learned position is trained.
    # None = the longest multiple of seq_len within model.max_seq_len.
    long_seq_len: int | None = None
    long_seq_every: int = 10  # 0 = no long steps

    def validate(self) -> None:
        for name in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_interval", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.muon_lr is not None and not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise ConfigError(f"train.muon_lr must be a number > 0 (or none for 4 x train.lr), got {self.muon_lr}")
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"train.optimizer must be muon or adamw, got {self.optimizer!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "eval_batches", "warmup_steps", "threads",
                     "long_seq_every"):  # 0: none / all / auto / off
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"train.eps must be > 0, got {self.eps}")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ConfigError(f"train.max_time_s must be > 0 (or none), got {self.max_time_s}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints (torch.distributed.checkpoint)."""

    dir: str | None = None  # None = <run>/checkpoints
    interval: int = 500  # steps; 0 = only at the end and on signals
    keep: int = 3
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | none | a checkpoint path
    fallback: bool = False  # on a corrupt newest checkpoint, fall back on the previous complete one

    def validate(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class LogConfig:
    """Where metrics go."""

    interval: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    peak_tflops: float | None = None  # per-device peak for MFU; None = measure (cached)
    level: str = "INFO"

    def validate(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"log.interval must be >= 1, got {self.interval}")
        _choice("log.level", self.level.upper(), ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class ServeConfig:
    """The OpenAI-compatible server and its continuous-batching engine."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # or env MTNLG_API_KEY
    max_batch: int = 16
    max_model_len: int | None = None  # None = model.max_seq_len
    max_queue: int = 64
    kv_cache_mb: float = 256.0  # memory budget for KV-cache slots
    model_name: str = "mtnlg"
    # The engine in its own process (vLLM's engine core, mtnlg.infer.engine_core: parsing a burst of requests
    # never holds the model's steps back on the GIL): "true"; "false" = a thread of the server process;
    # "auto" = a process on the CPU, a thread on a GPU (where a second CUDA context would take GPU memory).
    engine_process: str = "auto"

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve.port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        _choice("serve.engine_process", self.engine_process, ("auto", "true", "false"))


@dataclass
class SftConfig:
    """Supervised fine-tuning on conversations (``mtnlg sft``; with ``enabled``, the last stage of ``mtnlg train``)."""

    enabled: bool = True  # `mtnlg train` ends with this stage (the default job's model then answers in chat)
    data: str | None = None  # OpenAI-messages JSONL; None = the built-in poem conversations (mtnlg.train.sft_data)
    # Replay keeps the model's other text: without it, long fine-tuning on poems alone cost the previous 5M
    # default 8.1 bits per character instead of 5.2 (docs/train.md; 150 steps at 1e-3 with replay: 0.04).
    steps: int = 150
    batch_size: int = 16  # conversations per step
    seq_len: int = 512  # tokens per conversation at most (longer ones are cut)
    # Rows of the run's own pre-training text added to each batch, as a fraction of batch_size (0 =
    # none): they keep the language the model learned (built-in corpora only)
    replay: float = 0.75
    # The built-in conversations (sft.data unset) go on to another exchange with probability multi_turn, up to
    # max_turns exchanges: a chat's later replies come after a history, which the model must learn to read past
    multi_turn: float = 0.5
    max_turns: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        for name, ok, rule in (("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                               ("seq_len", self.seq_len >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                               ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                               ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                               ("replay", 0 <= self.replay <= 8, "in [0, 8]"),
                               ("multi_turn", 0 <= self.multi_turn <= 1, "in [0, 1]"),
                               ("max_turns", self.max_turns >= 1, ">= 1")):
            if not ok:
                raise ConfigError(f"sft.{name} must be {rule}, got {getattr(self, name)}")


@dataclass
class Config:
    """The whole configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self._resolve_parallel_output()
        self._check_pipeline_accounting()
        self.parallel.check_model(self.model)
        if self.parallel.tp > 1 and self.parallel.sequence_parallel and self.train.seq_len % self.parallel.tp:
            raise ConfigError(f"train.seq_len={self.train.seq_len} is not divisible by parallel.tp={self.parallel.tp} "
                              f"(sequence parallel splits the sequence); change train.seq_len or parallel.tp, or set "
                              f"parallel.sequence_parallel=false")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                              f"lower train.seq_len or raise model.max_seq_len")
        self._check_long_steps()
        return self

    def long_seq_len(self) -> int:
        """``train.long_seq_len`` resolved (None: the longest multiple of ``train.seq_len`` in ``model.max_seq_len``)."""
        t = self.train
        return t.long_seq_len if t.long_seq_len is not None else self.model.max_seq_len // t.seq_len * t.seq_len

    def long_span(self) -> int:
        """Sequences of ``train.seq_len`` packed into one on a long step (``train.long_seq_every``); 1 = none."""
        return max(1, self.long_seq_len() // self.train.seq_len) if self.train.long_seq_every else 1

    def _check_long_steps(self) -> None:
        t, n = self.train, self.train.long_seq_len
        if t.long_seq_every and n is not None and (n % t.seq_len or n < 2 * t.seq_len or n > self.model.max_seq_len):
            raise ConfigError(f"train.long_seq_len={n} must be a multiple (2x or more) of train.seq_len={t.seq_len}, "
                              f"at most model.max_seq_len={self.model.max_seq_len}: change it, leave it unset (the "
                              f"longest that fits) or set train.long_seq_every=0")

    def _check_pipeline_accounting(self) -> None:
        """With model.pre_process_first / post_process_last the embedding / head count as a layer of the
        first / last stage (mtnlg.parallel.pipeline.uniform_split); refuse a split that leaves a stage empty."""
        m, p = self.model, self.parallel
        stages = p.pp * p.vpp
        if stages == 1 or p.pp_layers is not None or p.pp_balance != "uniform":
            return
        base, rem = divmod(m.num_layers + m.pre_process_first + m.post_process_last, stages)
        first = base - m.pre_process_first
        last = base + (rem > 0) - m.post_process_last
        if m.num_layers < stages:  # whatever the flags, some stage would hold no transformer layer
            raise ConfigError(f"parallel.pp x vpp = {stages} stages but model.num_layers={m.num_layers}; "
                              f"use fewer stages")
        if min(first, last, base) < 1:
            field_name = "model.pre_process_first" if first < 1 else "model.post_process_last"
            raise ConfigError(f"{field_name}=True counts a layer's worth on a stage that then has no transformer layer "
                              f"(model.num_layers={m.num_layers}, {stages} pipeline stages); set it False or use "
                              f"fewer stages")

    def _resolve_parallel_output(self) -> None:
        """``parallel.loss_parallel`` and ``model.parallel_output`` are one setting (vocab-parallel logits
        feed the vocab-parallel loss): False in either turns both off."""
        both = self.parallel.loss_parallel and self.model.parallel_output
        self.parallel.loss_parallel = self.model.parallel_output = both

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> Config:
        return _build(cls, data or {}, prefix="", source=source)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Load ``path`` (YAML; None = defaults), apply ``--section.key=value`` overrides, validate."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"--config {path}: no such file")
            try:
                data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                                  f"{e.start}); save the file as UTF-8") from None
            except OSError as e:
                raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"--config {path}: top level must be a mapping of sections")
        cfg = _build(cls, data, prefix="", source=str(path or "defaults"))
        apply_overrides(cfg, overrides or [])
        return cfg.validate()


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown key '{full}' in {source}" + did_you_mean(full, valid))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[key] = _build(tp, value, prefix=f"{full}.", source=source)
        else:
            kwargs[key] = check_type(full, value, tp)
    return cls(**kwargs)
