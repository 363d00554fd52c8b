"""Supervised fine-tuning (SFT) on conversations: loss on the assistant's tokens only.

::

    RUN (a trained checkpoint) ──► model + tokenizer + config (as inference loads them)
    conversations ──► ChatTemplate.encode_conversation ──► ids + assistant mask ──► padded batches
                                                             (of similar lengths: length_bucketed)
    RUN's own training text (built-in corpus) ──► replay rows, every token learned (sft.replay per conversation)
    AdamW (train.optim) on   mean cross entropy over  mask[1:]  (the reply and its <|end|>) and the replay rows
    ──► a checkpoint saved with mtnlg.checkpoint's save function, in RUN2's (or RUN's) checkpoints/

One process, the materialised model, no parallel layout: the models this stage is for fit one
device, and this path does not depend on how the pre-training engine lays models out. The result is
an ordinary run directory (``config.yaml``, ``tokenizer/``, ``checkpoints/step_N``) that ``mtnlg
chat / generate / serve --checkpoint`` and ``MegatronLmModel.from_pretrained`` load like any run,
plus ``sft.json`` (what was done, the assistant loss before and after). Written into the source run
itself (the stage at the end of ``mtnlg train``), the SFT checkpoint is the run's newest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtnlg.config import Config, SftConfig
from mtnlg.data.chat_template import ChatTemplate
from mtnlg.errors import CheckpointError, ConfigError, DataError
from mtnlg import checkpoint as ckpt
from mtnlg.checkpoint.trainer_state import load_trainer_state
from mtnlg.train.loss import linear_cross_entropy
from mtnlg.train.optim import build_optimizer, build_scheduler
from mtnlg.train.sft_data import Conversation, builtin_conversations, load_conversations

log = logging.getLogger(__name__)

SFT_RECORD = "sft.json"


@dataclass
class SftExample:
    ids: list[int]
    mask: list[bool]  # per id: an assistant token to learn (predicted from the ids before it)


@dataclass
class SftResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    conversations: int
    loss_before: float  # mean assistant-token loss on the held-out conversations
    loss_after: float
    train_loss: float  # last step's loss
    seconds: float


def encode_examples(conversations: Sequence[Conversation], template: ChatTemplate, max_len: int) -> list[SftExample]:
    """Encode with the chat template; cut to ``max_len`` tokens; drop those with nothing left to learn."""
    out = []
    for conv in conversations:
        ids, mask = template.encode_conversation(conv)
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):
            out.append(SftExample(ids, mask))
    return out


def collate(examples: Sequence[SftExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(inputs, targets, loss_mask)``, each [B, T-1]: position t predicts ``ids[t+1]``,
    counted when ``ids[t+1]`` is an assistant token (padding never is)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[i, : len(e.mask)] = torch.tensor(e.mask, dtype=torch.bool)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def replay_examples(run_cfg: Config, tokenizer: Any, max_len: int, seed: int) -> list[SftExample]:
    """Pieces of the source run's own training split (a built-in corpus), every token learned: mixed
    into SFT batches so that fine-tuning on conversations does not make the model forget the language
    it was pre-trained on. Empty when the run trained on ``data.paths`` (its documents are not known
    here as text)."""
    if run_cfg.data.paths:
        return []
    from mtnlg.data.datasets import corpus_splits

    out = []
    for parts in corpus_splits(run_cfg.data.corpus, run_cfg.data.split, run_cfg.data.seed).values():
        for doc in parts["train"]:
            ids = tokenizer.encode(doc) + [tokenizer.eod_id]
            out += [SftExample(ids[i:i + max_len], [True] * len(ids[i:i + max_len]))
                    for i in range(0, len(ids) - 1, max_len)]
    random.Random(seed).shuffle(out)
    return [e for e in out if len(e.ids) > 1]


def length_bucketed(examples: Sequence[SftExample], batch_size: int, rng: random.Random,
                    pool: int = 8) -> list[int]:
    """One pass over ``examples`` in a random order where each run of ``batch_size`` indices has similar
    lengths: shuffle, sort each pool of ``pool`` batches by length, cut it into batches and shuffle
    the batches. Padding to the longest of a batch then wastes little (the conversations range from
    ~20 to ~150 tokens), and every example is still seen once per pass."""
    perm = list(range(len(examples)))
    rng.shuffle(perm)
    span = batch_size * pool
    batches: list[list[int]] = []
    for i in range(0, len(perm), span):
        chunk = sorted(perm[i:i + span], key=lambda j: len(examples[j].ids))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [j for b in batches for j in b]


def masked_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over the masked (assistant) positions; ``reduction="sum"`` for evaluation sums. The LM
    head runs on those positions only, through the chunked head + loss of pre-training (never the
    [tokens, vocab] logits of the user's turns and the padding)."""
    hidden = model.hidden_states(inputs)[mask]
    loss = linear_cross_entropy(hidden, model.output.weight, targets[mask])
    return loss if reduction == "sum" else loss / max(1, int(mask.sum()))


@torch.no_grad()
def assistant_loss(model: torch.nn.Module, examples: Sequence[SftExample], pad_id: int, device: torch.device,
                   batch_size: int = 16) -> float:
    """Mean loss per assistant token over ``examples`` (eval mode, whole set)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            x, y, m = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
            total += float(masked_loss(model, x, y, m, reduction="sum"))
            count += int(m.sum())
    finally:
        model.train(was)
    return total / max(1, count)


# -- loading the source and writing the result --------------------------------------------------------


def _run_files(checkpoint: Path) -> tuple[Path, Path]:
    """``(config.yaml, tokenizer/)`` of a checkpoint: in it, or in its run directory (as inference looks)."""
    resolved = ckpt.Resolved("checkpoint", checkpoint)
    cfg, tok = resolved.find("config.yaml"), resolved.find("tokenizer", want_dir=True)
    if cfg is None or tok is None:
        raise CheckpointError(f"{checkpoint}: no config.yaml / tokenizer/ in the checkpoint or its run directory")
    return cfg, tok


def _load_model(checkpoint: Path, device: torch.device):
    from mtnlg.model.init import build_model, materialize

    mcfg, state, tokenizer = ckpt.load_for_inference(checkpoint)
    model = materialize(build_model(mcfg), device=device, init=False)
    model.load_state_dict(state)
    model.tie_weights()
    return model, tokenizer


def _resume_state(checkpoint: Path) -> dict[str, Any]:
    """The data-sampler and scheduler state of the source checkpoint, so that ``mtnlg train`` can later
    resume from the SFT checkpoint (it resumes from a run's newest)."""
    path = checkpoint / "trainer_rank0.json"
    if not path.is_file():
        return {}
    state = load_trainer_state(path)
    return {k: state[k] for k in ("sampler", "schedulers", "bad_in_a_row", "skipped_steps") if k in state}


def _check_output(output: Path, source_run: Path, run_cfg: Config) -> tuple[Path, bool]:
    """The checkpoints root to write into, and whether it is the source run itself (nothing is written
    yet: a run that fails before its checkpoint leaves no directory behind)."""
    same = output.resolve() == source_run.resolve()
    root = (Path(run_cfg.checkpoint.dir) if run_cfg.checkpoint.dir else output / "checkpoints") if same \
        else output / "checkpoints"
    if not same and ckpt.list_checkpoints(root):
        raise ConfigError(f"--output {output} already holds checkpoints; choose a new directory (or the source "
                          f"run itself, {source_run}, to add the SFT checkpoint to it)")
    return root, same


def _create_output(output: Path, tok_dir: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    if not (output / "tokenizer").is_dir():
        shutil.copytree(tok_dir, output / "tokenizer")


def finetune(source: str | Path, output: str | Path, sft: SftConfig,
             conversations: Sequence[Conversation] | None = None, device: str | torch.device = "cpu",
             on_step: Callable[[int, float], None] | None = None) -> SftResult:
    """Fine-tune the newest (or given) checkpoint of ``source`` on ``conversations`` (None: ``sft.data``,
    or the built-in poem conversations) and save the result as a checkpoint of run ``output``."""
    t0 = time.monotonic()
    device = torch.device(device)
    source_ckpt = ckpt.find_checkpoint(source)
    cfg_file, tok_dir = _run_files(source_ckpt)
    run_cfg = Config.load(cfg_file)
    source_step = int(ckpt.verify_checkpoint(source_ckpt)["step"])
    source_run = source_ckpt.parent.parent
    if conversations is None:  # read (and checked) before anything is written
        conversations = load_conversations(sft.data) if sft.data else builtin_conversations(sft)
    out = Path(output)
    root, same_run = _check_output(out, source_run, run_cfg)

    random.seed(sft.seed)
    torch.manual_seed(sft.seed)
    model, tokenizer = _load_model(source_ckpt, device)
    template = ChatTemplate(tokenizer)
    max_len = min(sft.seq_len, model.cfg.max_seq_len) + 1  # + 1: inputs and targets are shifted by one
    examples = encode_examples(conversations, template, max_len)
    if len(examples) < 2:
        raise DataError(f"only {len(examples)} conversation(s) with assistant tokens within sft.seq_len="
                        f"{sft.seq_len}; SFT needs at least 2")
    rng = random.Random(sft.seed)
    rng.shuffle(examples)
    n_eval = min(max(1, len(examples) // 20), 64)
    held_out, train_set = examples[:n_eval], examples[n_eval:]
    pad = tokenizer.pad_id
    n_replay = round(sft.replay * sft.batch_size)
    replay = replay_examples(run_cfg, tokenizer, run_cfg.train.seq_len + 1, sft.seed) if n_replay else []
    if replay:
        log.info("SFT: each batch adds %d rows of the run's pre-training text (sft.replay=%g)", n_replay, sft.replay)

    tc = dataclasses.replace(run_cfg.train, steps=sft.steps, lr=sft.lr, warmup_steps=min(sft.warmup_steps, sft.steps),
                             lr_decay_steps=None, min_lr_ratio=sft.min_lr_ratio, weight_decay=sft.weight_decay,
                             muon_lr=None if run_cfg.train.muon_lr is None  # Muon's lr keeps its ratio to lr
                             else sft.lr * run_cfg.train.muon_lr / run_cfg.train.lr)
    optimizer = build_optimizer([model], tc)
    scheduler = build_scheduler(optimizer, tc)
    loss_before = assistant_loss(model, held_out, pad, device)
    log.info("SFT: %d conversations (%d held out), assistant loss %.4f before", len(train_set), n_eval, loss_before)
    model.train()
    order: list[int] = []
    loss = float("nan")
    for step in range(sft.steps):
        if len(order) < sft.batch_size:
            order += length_bucketed(train_set, sft.batch_size, rng)
        batch = [train_set[i] for i in order[: sft.batch_size]]
        del order[: sft.batch_size]
        # conversations, then (a forward of their own, so short conversations are not padded to the
        # replay rows' length) rows of pre-training text, a rolling window over them; one mean over
        # every learned token of both
        groups = [batch]
        if replay:
            groups.append([replay[(step * n_replay + k) % len(replay)] for k in range(n_replay)])
        tensors = [[t.to(device) for t in collate(g, pad)] for g in groups]
        count = sum(int(m.sum()) for _x, _y, m in tensors)
        out_loss = sum(masked_loss(model, x, y, m, reduction="sum") for x, y, m in tensors) / count
        out_loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out_loss.detach())
        if on_step is not None:
            on_step(step + 1, loss)
    loss_after = assistant_loss(model, held_out, pad, device)
    log.info("SFT: %d steps, assistant loss %.4f -> %.4f", sft.steps, loss_before, loss_after)

    save_cfg = dataclasses.replace(run_cfg, sft=dataclasses.replace(sft, enabled=False))
    if not same_run:
        _create_output(out, tok_dir)
        save_cfg.save(out / "config.yaml")
    # after every checkpoint of the output run, so that the SFT model is the one a run resolves to
    newest = ckpt.list_checkpoints(root)
    step = max(source_step, newest[0][0] if newest else 0) + sft.steps
    state = {"step": step, "stage": "sft", "source": str(source_ckpt), **_resume_state(source_ckpt)}
    saved = ckpt.save_checkpoint(root, step, [model], [optimizer], state, keep=max(2, run_cfg.checkpoint.keep),
                                 config=save_cfg, tokenizer_dir=tok_dir)
    result = SftResult(out, saved, sft.steps, len(train_set), loss_before, loss_after, loss, time.monotonic() - t0)
    record = {"checkpoint": saved.name, "source": str(source_ckpt), "steps": sft.steps,
              "conversations": len(train_set), "held_out": n_eval, "assistant_loss_before": loss_before,
              "assistant_loss_after": loss_after, "train_loss": loss, "seconds": result.seconds,
              "data": sft.data or "built-in poem conversations"}
    (out / SFT_RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return result


def sft_stage(cfg: Config, run_dir: str | Path, device: str | torch.device = "cpu",
              on_step: Callable[[int, float], None] | None = None) -> SftResult | None:
    """The SFT stage of ``mtnlg train`` (``sft.enabled``): fine-tune the run's newest checkpoint into the
    run itself. Skipped (None) when the run's newest checkpoint already is this stage's result."""
    run = Path(run_dir)
    record = run / SFT_RECORD
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints"
    newest = ckpt.list_checkpoints(root)
    if record.is_file() and newest:
        try:
            done = json.loads(record.read_text()).get("checkpoint")
        except ValueError:
            done = None
        if done == newest[0][1].name:
            log.info("SFT stage already done (%s)", newest[0][1])
            return None
    return finetune(run, run, cfg.sft, device=device, on_step=on_step)
