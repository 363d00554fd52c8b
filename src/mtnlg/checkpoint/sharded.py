"""Sharded, atomic, verifiable training checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout of one checkpoint::

    RUN/checkpoints/step_00000100/
        .metadata, __0_0.distcp, ...   model + optimizer (DCP: each rank writes its own shards)
        trainer_rank0.json ...         step, data position, schedulers, RNG states (per rank; JSON, no pickle)
        config.yaml, tokenizer/        so that the directory alone is loadable
        manifest.json                  size + sha256 of every file above; written last

Writes go to ``RUN/checkpoints/.step_00000100.tmp-XXXX``, renamed to ``step_00000100`` only after the
manifest is written. States are keyed by parameter name (flattened optimizer state) and the vocabulary
is stored unpadded (``vocab_size`` rows; the padding rows a layout adds are zero and rebuilt on load),
so a checkpoint saved under any (dp_shard, dp_replicate, tp, pp) layout loads under any other,
including one process without a process group. Nothing is unpickled on load
(:mod:`mtnlg.checkpoint.safe_read`), and a model or optimizer state that is not finite is never saved.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from mtnlg.atomic import ordinary_permissions
from mtnlg.checkpoint import outer as outer_ckpt
from mtnlg.checkpoint.manifest import fsync_dir, write_manifest
from mtnlg.checkpoint.resolve import abandon_after, list_checkpoints, step_dir_name
from mtnlg.checkpoint.safe_read import dcp_load, read_metadata
from mtnlg.checkpoint.trainer_state import load_trainer_state, rng_state, save_trainer_state
from mtnlg.config import Config
from mtnlg.errors import CheckpointError

log = logging.getLogger(__name__)

_OPTS = StateDictOptions(flatten_optimizer_state_dict=True)
VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_true(ok: bool) -> bool:
    """``ok`` on every rank (gloo/nccl all-reduce MIN)."""
    if not _dist():
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


# -- state of the model parts and their optimizers -------------------------------------------------


def model_state(model_parts: Sequence[nn.Module]) -> dict[str, Any]:
    """One name-keyed state dict over all parts (parts keep global parameter names)."""
    out: dict[str, Any] = {}
    for part in model_parts:
        out.update(get_model_state_dict(part, options=_OPTS))
    return out


def optimizer_state(model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Flattened (``state.<param>.<key>``, ``param_groups.<param>.<key>``) optimizer states of all parts."""
    out: dict[str, Any] = {}
    for part, opt in zip(model_parts, optimizers, strict=True):
        out.update(get_optimizer_state_dict(part, opt, options=_OPTS))
    return out


def vocab_size_of(model_parts: Sequence[nn.Module]) -> int | None:
    """The real (unpadded) vocabulary of the model the parts come from (``GPT.vocab_size``)."""
    sizes = {getattr(p, "vocab_size", None) for p in model_parts} - {None}
    return int(next(iter(sizes))) if len(sizes) == 1 else None


def _is_vocab_key(key: str) -> bool:
    """Model (``tok_embeddings.weight``) and optimizer (``state.tok_embeddings.weight.exp_avg``) keys of
    tensors whose rows are the vocabulary."""
    if key in VOCAB_PARAMS:
        return True
    return key.startswith("state.") and key[len("state."):].rsplit(".", 1)[0] in VOCAB_PARAMS


def _vocab_tensors(state: dict[str, Any]):
    for key, v in state.items():
        if _is_vocab_key(key) and isinstance(v, torch.Tensor) and v.dim() >= 1:
            yield key, v


def unpad_vocab(state: dict[str, Any], vocab: int | None) -> None:
    """Replace padded vocabulary tensors (``rows > vocab``) by their first ``vocab`` rows, gathered
    (collective over each tensor's mesh: every rank holding it calls this)."""
    if vocab is None:
        return
    for key, v in list(_vocab_tensors(state)):
        if v.shape[0] > vocab:
            full = v.full_tensor() if isinstance(v, DTensor) else v
            state[key] = full[:vocab].detach().clone()


def _finite(state: dict[str, Any]) -> str | None:
    """The first key whose (local) tensor holds a NaN or an infinity, or None."""
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            t = v.to_local() if isinstance(v, DTensor) else v
            if not bool(torch.isfinite(t).all()):
                return key
    return None


# -- save ------------------------------------------------------------------------------------------


def save_checkpoint(root: str | Path, step: int, model_parts: Sequence[nn.Module],
                    optimizers: Sequence[torch.optim.Optimizer], trainer_state: dict[str, Any],
                    keep: int, config: Config | None = None, tokenizer_dir: str | Path | None = None,
                    outer: Any = None) -> Path:
    """Collective: every rank calls it. Writes ``root/step_N`` atomically and prunes to ``keep``.
    ``outer``: the engine's local-SGD ``OuterSync`` (``parallel.sync_every > 1``), saved as
    :mod:`mtnlg.checkpoint.outer` describes.

    Raises CheckpointError (on every rank, nothing written) when a weight or optimizer value is not
    finite: a diverged model is never saved."""
    root = Path(root)
    rank = _rank()
    final = root / step_dir_name(step)
    state = {"model": model_state(model_parts), "optim": optimizer_state(model_parts, optimizers)}
    outer_info = None
    if outer is not None:
        groups, outer_info = outer_ckpt.outer_groups(outer, outer_ckpt.param_names(model_parts, outer.params))
        state.update(groups)
    bad = next((b for b in map(_finite, state.values()) if b), None)
    if not _all_true(bad is None):
        where = f" ({bad} on rank {rank})" if bad else ""
        raise CheckpointError(f"step {step}: the weights or optimizer state are not finite{where}; not saving a "
                              f"diverged model (lower train.lr, check the data, or resume from {root})")
    vocab = vocab_size_of(model_parts)
    for group in state.values():
        unpad_vocab(group, vocab)
    if outer is not None and outer.replicas > 1:  # per-replica tensors, stacked over dp_replicate
        state.update(outer_ckpt.replica_groups(outer, state))
        state.pop("outer_start", None)
    name = [None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root)
    if _dist():
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _dist())
        trainer_state = {**trainer_state, "rng": rng_state(), "world_size": _world(), "rank": rank}
        if outer_info is not None:
            trainer_state["outer"] = outer_info
        save_trainer_state(trainer_state, tmp / f"trainer_rank{rank}.json")
        _barrier()
        if rank == 0:
            if config is not None:
                config.save(tmp / "config.yaml")
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            write_manifest(tmp, step, {"world_size": _world(), "vocab_size": vocab})
            ordinary_permissions(tmp)
            fsync_dir(tmp)
            abandon_after(root, step)  # a newer checkpoint here belongs to an abandoned history
            if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one aside first
                _delete(final)
            tmp.rename(final)
            fsync_dir(root)
            prune(root, keep)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:  # one line per checkpoint, not one per rank
        log.info("saved checkpoint %s", final)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _step, path in list_checkpoints(root)[keep:]:
        _delete(path)


def _delete(path: Path) -> None:
    """Rename ``step_N`` to a temporary name, then delete it: a crash mid-delete never leaves a
    half-deleted directory under a checkpoint's name."""
    doomed = path.with_name(f".{path.name}.tmp-del{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temps(root: str | Path) -> None:
    """Remove ``.step_*.tmp-*`` left by a run killed while saving (rank 0, before training)."""
    r = Path(root)
    if r.is_dir():
        for p in r.glob(".step_*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# -- load ------------------------------------------------------------------------------------------


def _fit_template(state: dict[str, Any], meta: dict[str, Any], vocab: int | None, path: Path) -> dict[str, Any]:
    """Check ``state`` (this layout's tensors) against the checkpoint's index and swap each padded
    vocabulary tensor for a plain one of the saved shape. Returns ``{key: tensor to pad into}``."""
    swapped: dict[str, Any] = {}
    for key, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        saved = meta.get(key)
        if saved is None:
            raise CheckpointError(f"{path} has no tensor '{key}': it was saved from a different model (layers, "
                                  "names); resume with the model config it was saved with")
        if not isinstance(saved, TensorStorageMetadata):
            raise CheckpointError(f"{path}: '{key}' is not a tensor in the checkpoint")
        want, got = list(v.shape), list(saved.size)
        if _is_vocab_key(key) and v.dim() >= 1 and vocab is not None and want[1:] == got[1:] \
                and got[0] >= vocab and want[0] >= vocab:
            if want[0] != got[0]:
                swapped[key] = v
                state[key] = torch.empty(got, dtype=saved.properties.dtype)
            continue
        if want != got:
            raise CheckpointError(f"{path}: '{key}' has shape {got} in the checkpoint but {want} in this model; the "
                                  "model config changed since it was saved (resume with the same model.* settings)")
    return swapped


def _alias_tied(state: dict[str, Any], meta: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Without pipeline parallelism the head is tied to the embedding and has no state of its own; the
    last stage's head copy (``output.weight``) then loads the embedding's values and optimizer state
    (the two copies are equal by construction). Renames such keys in ``state`` to their twin in the
    checkpoint and returns ``{key: (twin, renamed)}`` to undo it after loading."""
    out: dict[str, tuple[str, bool]] = {}
    for key in list(state):
        if key in meta or "output.weight" not in key:
            continue
        twin = key.replace("output.weight", "tok_embeddings.weight", 1)
        if twin not in meta:
            continue
        if twin in state:  # both copies on this rank (one stage holds both): load once, share
            del state[key]
            out[key] = (twin, False)
        else:
            state[twin] = state.pop(key)
            out[key] = (twin, True)
    return out


def _pad_back(state: dict[str, Any], swapped: dict[str, Any], vocab: int) -> None:
    """Put each loaded (unpadded) vocabulary tensor back into its layout: zero rows past ``vocab``."""
    for key, target in swapped.items():
        loaded = state[key]
        full = torch.zeros(tuple(target.shape), dtype=target.dtype)
        full[:vocab] = loaded[:vocab]
        if isinstance(target, DTensor):
            full = full.to(target.device)
            state[key] = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        else:
            state[key] = full.to(target.device)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len")


def check_model_config(path: Path, model_parts: Sequence[nn.Module]) -> None:
    """One line naming the first architecture field that differs between the checkpoint's saved
    ``config.yaml`` and the model being loaded (``GPT.cfg``); nothing when either is unknown."""
    cfg = next((getattr(p, "cfg", None) for p in model_parts if getattr(p, "cfg", None) is not None), None)
    file = path / "config.yaml"
    if cfg is None or not file.is_file():
        return
    try:
        saved = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        raise CheckpointError(f"{file} is not a valid config") from None
    for name in SHAPE_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            raise CheckpointError(f"{path}: model.{name} is {saved[name]} in the checkpoint but {getattr(cfg, name)} "
                                  f"in this run; resume with the checkpoint's model.{name}, or start over with "
                                  "--checkpoint.resume=none")


def check_optimizer(path: Path, meta_keys: Iterable[str], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """One line when the checkpoint's optimizer state is the other ``train.optimizer``'s (Muon keeps a
    momentum buffer per block matrix, AdamW two moments)."""
    keys = [k for k in meta_keys if k.startswith("optim.state.")]
    if not keys or not optimizers:
        return
    saved = "muon" if any(k.endswith(".momentum_buffer") for k in keys) else "adamw"
    mine = "muon" if any(g.get("muon") and g["params"] for opt in optimizers for g in opt.param_groups) else "adamw"
    if saved != mine:
        raise CheckpointError(f"{path}: trained with train.optimizer={saved} but this run uses {mine}; resume with "
                              f"--train.optimizer={saved}, or start over with --checkpoint.resume=none")


def load_checkpoint(path: str | Path, model_parts: Sequence[nn.Module],
                    optimizers: Sequence[torch.optim.Optimizer], outer: Any = None) -> dict[str, Any]:
    """Collective: load model + optimizer (resharding onto this layout, re-padding the vocabulary) and
    return the trainer state of this rank (or of rank 0 when the world size changed). ``path`` must be
    verified already. Every failure is a one-line CheckpointError naming what differs. ``outer``: the
    engine's local-SGD ``OuterSync``, restored too (or restarted at the loaded weights when the
    checkpoint has no local-SGD state)."""
    path = Path(path)
    meta = read_metadata(path).state_dict_metadata
    trainer = read_trainer_state(path)
    state = {"model": model_state(model_parts), "optim": optimizer_state(model_parts, optimizers)}
    names: list[str] = []
    stacks_ok = False
    if outer is not None:
        names = outer_ckpt.param_names(model_parts, outer.params)
        kinds, stacks_ok = outer_ckpt.expected(outer, trainer.get("outer"))
        if stacks_ok and outer.overlap and trainer["outer"].get("overlap"):
            kinds = [*kinds, "start"]
        state.update(outer_ckpt.templates(outer, names, kinds))
    vocab = vocab_size_of(model_parts)
    error: CheckpointError | None = None
    swapped: dict[str, dict[str, Any]] = {}
    aliases: dict[str, dict[str, tuple[str, bool]]] = {}
    try:
        check_model_config(path, model_parts)
        check_optimizer(path, meta, optimizers)
        for group in list(state):
            # per-replica round starts are saved only stacked (below); their shapes are the weights'
            src = "model" if group == "outer_start" and stacks_ok else group
            flat_meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(src + ".")}
            aliases[group] = _alias_tied(state[group], flat_meta)
            swapped[group] = _fit_template(state[group], flat_meta, vocab, path)
    except CheckpointError as e:
        error = e
    if not _all_true(error is None):
        raise error or CheckpointError(f"{path}: does not match this model on another rank; see its log")
    stacks: dict[str, dict[str, Any]] = {}
    if stacks_ok:
        stacks = outer_ckpt.replica_groups(outer, state, fresh=True)
        if not {f"{g}.{k}" for g, vals in stacks.items() for k in vals} <= set(meta):
            log.warning("%s has no per-replica local-SGD state: every replica resumes from replica 0's", path)
            stacks = {}
            state.pop("outer_start", None)
    # a tensor loaded per replica is not loaded a second time from its replica-0 copy
    plain = {g: {k: v for k, v in vals.items() if k not in stacks.get(f"replica_{g.removeprefix('outer_')}", {})}
             for g, vals in state.items() if g != "outer_start" or not stacks}
    dcp_load({**plain, **stacks}, path, no_dist=not _dist())
    for group, vals in plain.items():
        state[group].update(vals)  # non-tensor values (param_groups.*) are replaced, not filled in
    outer_ckpt.apply_replicas(state, stacks)
    for group in state:
        _pad_back(state[group], swapped.get(group, {}), vocab or 0)
        for key, (twin, renamed) in aliases[group].items():
            state[group][key] = state[group].pop(twin) if renamed else state[group][twin]
    try:
        for part, opt in zip(model_parts, optimizers, strict=True):
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
            set_optimizer_state_dict(part, opt, state["optim"], options=_OPTS)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot apply the saved state ({str(e).splitlines()[0][:300]})") from None
    if outer is not None:
        outer_ckpt.load_into(outer, names, {g: v for g, v in state.items() if g.startswith("outer_")})
    return trainer


def read_trainer_state(path: Path) -> dict[str, Any]:
    """This rank's trainer state, or rank 0's when the checkpoint was saved by another world size."""
    first = path / "trainer_rank0.json"
    if not first.is_file():
        legacy = " (it was saved by an older mtnlg as a pickle, which is never loaded)" \
            if (path / "trainer_rank0.pt").is_file() else ""
        raise CheckpointError(f"{first} is missing{legacy}; resume with --checkpoint.resume=none, or load the "
                              "weights alone with MegatronLmModel.from_pretrained")
    saved = load_trainer_state(first)
    mine = path / f"trainer_rank{_rank()}.json"
    if saved.get("world_size") == _world() and mine.is_file() and _rank() != 0:
        saved = load_trainer_state(mine)
    elif saved.get("world_size") != _world():
        log.info("resuming a %s-process checkpoint on %s processes (resharded)", saved.get("world_size"), _world())
    return saved
