"""Training data: tokenizer choice, document splits, packed GPT samples, weighted blends, the sampler.

::

    data.paths = [0.7, a, 0.3, b]          (or data.corpus = poems, preprocessed into the cache)
         │               │
     IndexedDataset  IndexedDataset        memory-mapped documents, each ending in EOD
         │  split by documents (seeded permutation, data.split = "90,5,5")
     GPTDataset(train) GPTDataset(train)   documents packed back to back; sample i = tokens
         │               │                 [i*L, i*L + L] of that stream (L = train.seq_len)
         └─ BlendedDataset(0.7, 0.3) ─┘    deterministic interleave, proportions exact to 1 sample
                      │
                BatchSampler               epoch-wise permutation from the seed; rank r takes the
                                           r-th slice of each global batch; state_dict() resumes exactly

Caches live under ``$MTNLG_CACHE`` (default ``~/.cache/mtnlg``): ``tokenizers/<hash>/`` and
``data/<corpus>-<hash>.{bin,idx}``. Writes are atomic (temporary name + rename), so ranks that
race to fill a cache entry all end up reading the same complete files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mtnlg.atomic import ordinary_permissions
from mtnlg.data.corpora import corpus_fingerprint, corpus_weights, load_corpus
from mtnlg.data.indexed import IndexedDataset, exists, tokenizer_path
from mtnlg.data.tokenizer import MIN_VOCAB, TOKENIZER_FILE, Tokenizer, train_bpe
from mtnlg.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


def cache_dir() -> Path:
    """``$MTNLG_CACHE`` or ``~/.cache/mtnlg``."""
    return Path(os.environ.get("MTNLG_CACHE") or Path.home() / ".cache" / "mtnlg")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- tokenizer

def prepare_tokenizer(cfg, run_dir: Path | None = None) -> Tokenizer:
    """The run's tokenizer, saved to ``run_dir/tokenizer/`` when ``run_dir`` is given.

    ``data.tokenizer`` (a directory or tokenizer.json) if set; else, with ``data.paths``, the tokenizer
    that ``mtnlg preprocess`` stored next to the first prefix; else a byte-level BPE of
    ``model.vocab_size`` tokens trained on ``data.corpus`` and cached by (corpus content, vocab size).
    """
    d = cfg.data
    if d.tokenizer:
        tok = Tokenizer.load(d.tokenizer)
    elif d.paths:
        prefix = parse_paths(d.paths)[0][1]
        side = tokenizer_path(prefix)
        if not side.is_file():
            raise DataError(f"data.tokenizer is not set and {side} is missing; set --data.tokenizer=DIR to the "
                            f"tokenizer given to `mtnlg preprocess`")
        tok = Tokenizer.load(side)
    else:
        tok = corpus_tokenizer(d.corpus, cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    padded = cfg.model.padded_vocab_size()
    if tok.vocab_size > padded:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                          f"tokens; set --model.vocab_size={tok.vocab_size}")
    if run_dir is not None:  # atomic, so ranks that all save it never leave a torn file
        dest = Path(run_dir) / "tokenizer"
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / f".{TOKENIZER_FILE}.{os.getpid()}.tmp"
        tok.hf.save(str(tmp))
        os.replace(tmp, dest / TOKENIZER_FILE)
    return tok


def corpus_tokenizer(corpus: str, vocab_size: int | None = None) -> Tokenizer:
    """A BPE trained on the built-in corpora that ``corpus`` names (``"poems"`` or a blend such as
    ``"poems:0.3,zh:0.7"``, weights ignored: every document once), trained once and cached under
    ``tokenizers/<hash>/``. ``vocab_size=None``: the size the corpus calls for (see ``train_bpe``)."""
    names = sorted(n for n, _ in corpus_weights(corpus))
    if vocab_size is not None and vocab_size < MIN_VOCAB:  # train_bpe would name its own flag: name the field
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for the built-in corpus's byte-level BPE (at "
                          f"least {MIN_VOCAB}: 256 bytes and the special tokens); leave it unset")
    content = ",".join(f"{n}={corpus_fingerprint(n)}" for n in names)
    key = hashlib.sha256(f"bpe-v3:{content}:{vocab_size}".encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / key
    if (target / TOKENIZER_FILE).is_file():
        return Tokenizer.load(target)
    log.info("training a %s byte-level BPE on %s (cached in %s)",
             f"{vocab_size}-token" if vocab_size else "character-covering", "+".join(names), target)
    tok = train_bpe([doc for n in names for doc in load_corpus(n)], vocab_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    tok.save(tmp)
    ordinary_permissions(tmp)
    try:
        os.rename(tmp, target)  # atomic; fails if another process got there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(target)  # whoever won, everyone reads the same file


def corpus_prefix(corpus: str, tokenizer: Tokenizer) -> Path:
    """The built-in corpus preprocessed with ``tokenizer`` (cached under ``data/``), as a prefix."""
    key = hashlib.sha256(f"{corpus_fingerprint(corpus)}:{tokenizer_hash(tokenizer)}".encode()).hexdigest()[:16]
    prefix = cache_dir() / "data" / f"{corpus}-{key}"
    if not exists(prefix):
        from mtnlg.data.preprocess import preprocess

        log.info("tokenizing corpus '%s' into %s", corpus, prefix)
        preprocess([f"corpus:{corpus}"], tokenizer, prefix, workers=1)
    return prefix


# ----------------------------------------------------------------------------------------------- splits

def parse_split(split: str) -> np.ndarray:
    """``"90,5,5"`` -> fractions summing to 1."""
    try:
        w = np.array([float(x) for x in split.split(",")])
    except ValueError:
        raise ConfigError(f"data.split='{split}' must be three comma-separated numbers, e.g. 98,1,1") from None
    if w.size != 3 or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"data.split='{split}' must be three non-negative numbers, e.g. 98,1,1")
    return w / w.sum()


def split_documents(num_docs: int, split: str, seed: int) -> dict[str, np.ndarray]:
    """Document ids of each split: a seeded permutation cut by the split fractions.

    The three parts are disjoint and cover every document; every split with a positive weight gets
    at least one document (taken from the largest split), so tiny corpora still have valid/test data.
    """
    frac = parse_split(split)
    positive = frac > 0
    if num_docs < positive.sum():
        raise DataError(f"only {num_docs} document(s): data.split='{split}' needs at least {positive.sum()}")
    ends = np.round(np.cumsum(frac) * num_docs).astype(np.int64)
    ends[-1] = num_docs
    counts = np.diff(np.concatenate([[0], ends]))
    for j in np.flatnonzero(positive & (counts == 0)):
        counts[int(np.argmax(counts))] -= 1
        counts[j] = 1
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return {name: perm[bounds[k]:bounds[k + 1]] for k, name in enumerate(SPLITS)}


# ----------------------------------------------------------------------------------------------- datasets

class GPTDataset(Dataset):
    """Fixed-length samples of ``seq_len + 1`` tokens packed across document boundaries (as Megatron's).

    The split's documents (each ending in EOD) form one token stream; sample ``i`` is
    ``stream[i*seq_len : i*seq_len + seq_len + 1]``, so inputs and shifted targets come from one item
    and consecutive samples share one boundary token. The stream is cyclic: a split shorter than one
    sequence (a small corpus's valid/test split) still yields one sample, repeating its documents.
    Items are ``torch.long`` tensors.
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, seq_len: int, name: str = "train"):
        if seq_len < 1:
            raise ConfigError(f"train.seq_len must be >= 1, got {seq_len}")
        self.indexed, self.seq_len, self.name = indexed, seq_len, name
        self.documents = np.asarray(documents, dtype=np.int64)
        lengths = indexed.lengths[self.documents].astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._starts[-1])
        self.num_samples = 0 if self.num_tokens == 0 else max(1, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.window(i, 1)

    def window(self, i: int, span: int) -> torch.Tensor:
        """Samples ``i .. i + span - 1`` as one sequence: the ``span * seq_len + 1`` tokens from sample i's start
        (training's long steps; ``span=1`` is sample ``i``)."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for the {self.name} split ({self.num_samples} samples)")
        i %= self.num_samples
        need = span * self.seq_len + 1
        out, filled = np.empty(need, np.int64), 0
        pos = i * self.seq_len % self.num_tokens
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        off = pos - int(self._starts[k])
        while filled < need:
            piece = self.indexed.get(int(self.documents[k]), off, need - filled)
            out[filled:filled + piece.size] = piece
            filled += piece.size
            k, off = (k + 1) % self.documents.size, 0
        return torch.from_numpy(out)


    def stream(self) -> np.ndarray:
        """The split's whole token stream (its documents back to back, each ending in EOD)."""
        parts = [self.indexed.get(int(d)) for d in self.documents]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def whole(self, context: int = 0) -> list[torch.Tensor] | list[tuple[torch.Tensor, int]]:
        """The stream cut into pieces of at most ``seq_len + 1`` tokens so that every token after the first is
        a target exactly once (the last piece may be shorter). ``context=0``: the pieces overlap by one token.
        ``context=C`` (Megatron's overlapping evaluation): each piece after the first starts C tokens before
        its first scored target, so every target but the first C sees at least C tokens of the text before
        it; the pieces are ``(tokens, skip)``, the first ``skip`` targets context only (not scored)."""
        tokens = torch.from_numpy(self.stream())
        L = self.seq_len
        if not context:
            return [tokens[k:k + L + 1] for k in range(0, max(0, tokens.numel() - 1), L)]
        if not 0 < context < L:
            raise ConfigError(f"evaluation context {context} must be in [0, seq_len={L}); e.g. {L // 2}")
        stride = L - context
        out = []
        for k in range(0, max(0, tokens.numel() - 1), stride):
            start = max(0, k - context)
            out.append((tokens[start:k + stride + 1], k - start))
        return out


def corpus_splits(corpus: str, split: str, seed: int) -> dict[str, dict[str, list[str]]]:
    """``{name: {"train"|"valid"|"test": documents}}`` for each built-in corpus in ``corpus``, split by
    documents exactly as ``build_datasets`` splits the preprocessed corpus (used by the quality anchors
    and by SFT replay)."""
    out = {}
    for name, _w in corpus_weights(corpus):
        docs = load_corpus(name)
        ids = split_documents(len(docs), split, seed)
        out[name] = {s: [docs[i] for i in ids[s]] for s in SPLITS}
    return out

def eval_sequences(dataset: Dataset, context: int = 0) -> list[torch.Tensor] | list[tuple[torch.Tensor, int]]:
    """Every target token of a split exactly once, for evaluation: the pieces of :meth:`GPTDataset.whole`
    (``context``: see there), for a blend those of each part with a positive weight in turn (no
    weighting, no wrap-around)."""
    if isinstance(dataset, BlendedDataset):
        return [s for d, w in zip(dataset.datasets, dataset.weights) if w > 0 for s in eval_sequences(d, context)]
    if isinstance(dataset, GPTDataset):
        return dataset.whole(context)
    raise DataError(f"cannot evaluate a {type(dataset).__name__}; expected a GPTDataset or a BlendedDataset")


def pad_sequences(seqs: list[torch.Tensor], length: int, pad_id: int = 0,
                  skips: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of shape ``[len(seqs), length - 1]``: short pieces padded with ``pad_id`` in the
    inputs and -100 (ignored by the loss) in the labels; ``skips[i]``: piece i's first targets that are
    context only, -100 too."""
    x = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :s.numel()] = s
        skip = skips[i] if skips else 0
        y[i, 1 + skip:s.numel()] = s[1 + skip:]
    return x[:, :-1], y[:, 1:]


class BlendedDataset(Dataset):
    """Several datasets mixed by weight: item ``i`` comes from dataset ``dataset_index[i]``.

    The k-th sample of dataset j is placed at time (k + 0.5) / w_j and all are merged by time, so
    every prefix of the blend holds each dataset within about one sample of its share. A dataset
    that runs out of samples starts over (weights win over sizes, as in Megatron).
    """

    def __init__(self, datasets: list[Dataset], weights: list[float], size: int | None = None):
        w = np.asarray(weights, dtype=np.float64)
        if len(datasets) != w.size or w.size == 0 or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"blend weights {list(weights)} must be non-negative, one per dataset, not all zero")
        w = w / w.sum()
        empty = [j for j, d in enumerate(datasets) if len(d) == 0 and w[j] > 0]
        if empty:
            raise DataError(f"blended dataset #{empty[0]} has no samples but weight {w[empty[0]]:.3f}")
        self.datasets, self.weights = datasets, w
        self.size = int(sum(len(d) for d in datasets)) if size is None else int(size)
        times, ids, within = [], [], []
        for j, wj in enumerate(w):
            if wj == 0:
                continue
            n = int(np.ceil(self.size * wj)) + 1
            times.append((np.arange(n) + 0.5) / wj)
            ids.append(np.full(n, j, np.int32))
            within.append(np.arange(n, dtype=np.int64) % len(datasets[j]))
        order = np.argsort(np.concatenate(times), kind="stable")[:self.size]
        self.dataset_index = np.concatenate(ids)[order]
        self.sample_index = np.concatenate(within)[order]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.window(i, 1)

    def window(self, i: int, span: int) -> torch.Tensor:
        """Item ``i``'s sample and the ``span - 1`` that follow it in its dataset, as one sequence."""
        return self.datasets[int(self.dataset_index[i])].window(int(self.sample_index[i]), span)


def parse_paths(paths: list[Any]) -> list[tuple[float | None, str]]:
    """``[0.7, "a", 0.3, "b"]`` -> ``[(0.7, "a"), (0.3, "b")]``; ``["a", "b"]`` -> ``[(None, "a"), (None, "b")]``."""
    if not paths:
        raise ConfigError("data.paths is empty")
    if all(isinstance(p, str) for p in paths):
        return [(None, p) for p in paths]
    if len(paths) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(p, str)
                                 for w, p in zip(paths[::2], paths[1::2])):
        raise ConfigError(f"data.paths={paths} must be prefixes [a, b] or weight/prefix pairs [0.7, a, 0.3, b]")
    if any(w < 0 for w in paths[::2]) or sum(paths[::2]) <= 0:
        raise ConfigError(f"data.paths={paths}: weights must be non-negative and not all zero")
    return [(float(w), p) for w, p in zip(paths[::2], paths[1::2])]


def build_datasets(cfg, tokenizer: Tokenizer) -> dict[str, Dataset]:
    """``{"train", "valid", "test"}`` datasets of ``train.seq_len + 1``-token samples.

    From ``data.paths`` (preprocessed prefixes, blended by weight; unweighted prefixes are mixed in
    proportion to their sizes) or, when it is empty, from the built-in ``data.corpus`` (one name or
    a weighted blend such as ``"poems:0.3,zh:0.7"``) tokenized on the fly into the cache. Each prefix is split by documents with ``data.split`` and
    ``data.seed``; a split with weight 0 is an empty dataset. Small corpora still give every other
    split at least one sample (short valid/test splits wrap around and repeat their documents).
    """
    d, seq_len = cfg.data, cfg.train.seq_len
    if d.paths:
        entries = parse_paths(d.paths)
    else:
        entries = [(w, str(corpus_prefix(name, tokenizer))) for name, w in corpus_weights(d.corpus)]
    indexed = []
    for _, prefix in entries:
        ds = IndexedDataset(prefix)
        seconds = ds.verify()  # a flipped bit or a foreign token id stops the run here, naming the file
        log.info("verified %s (%.1f MB) in %.2f s", ds.bin_path, ds.num_tokens * ds.dtype.itemsize / 1e6, seconds)
        if ds.vocab_size != tokenizer.vocab_size:
            raise DataError(f"{ds.idx_path} was tokenized with a {ds.vocab_size}-token vocabulary but the tokenizer "
                            f"has {tokenizer.vocab_size}; set --data.tokenizer to the one used by `mtnlg preprocess`")
        indexed.append(ds)
    splits = [split_documents(len(ds), d.split, d.seed) for ds in indexed]
    out: dict[str, Dataset] = {}
    for name in SPLITS:
        parts = [GPTDataset(ds, sp[name], seq_len, name) for ds, sp in zip(indexed, splits)]
        if len(parts) == 1:
            out[name] = parts[0]
        elif sum(len(p) for p in parts) == 0:
            out[name] = parts[0]
        else:
            weights = [w if w is not None else len(p) for (w, _), p in zip(entries, parts)]
            out[name] = BlendedDataset(parts, weights)
    for name, ds in out.items():
        log.info("%s split: %d samples of %d tokens", name, len(ds), seq_len + 1)
    return out


# ----------------------------------------------------------------------------------------------- sampler

class BatchSampler:
    """Deterministic, shuffled, resumable: indices of each global batch, sliced for one data-parallel rank.

    Epoch ``e`` visits the samples in the order of a permutation seeded by ``(seed, e)``; a batch that
    crosses the end of an epoch continues into the next. Rank ``r`` of ``dp_size`` receives the r-th
    contiguous ``global_batch_size // dp_size`` slice, so ranks are disjoint and their union is exactly
    the single-process batch. The state (epoch, position) is independent of the layout, so a run may
    resume on a different number of ranks; ``global_batch_size`` may change between calls (ramp-up).
    """

    VERSION = 1

    def __init__(self, num_samples: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
        if num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.seed, self.dp_rank, self.dp_size = int(num_samples), int(seed), dp_rank, dp_size
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out
        self.consumed = 0  # samples' worth of tokens handed out in total, all ranks (a packed sequence: span)
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return self._perm[1]

    def next_batch(self, global_batch_size: int, span: int = 1) -> list[int]:
        """The next global batch's indices for this rank (``global_batch_size // dp_size`` of them).

        ``span > 1`` (a long step of training): ``global_batch_size // span`` indices, each the first of ``span``
        samples read as one sequence (:meth:`GPTDataset.window`); ``consumed`` still grows by
        ``global_batch_size``, so that it counts samples' worth of tokens on every step."""
        count, rem = divmod(global_batch_size, span)
        if count < 1 or rem or count % self.dp_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} must be a positive multiple of "
                              f"{span} (sequences packed into one) x the data-parallel size {self.dp_size}")
        if self.num_samples == 0:
            raise DataError("the dataset has no samples; add data or lower train.seq_len")
        batch, filled = np.empty(count, np.int64), 0
        while filled < count:
            perm = self._permutation(self.epoch)
            take = min(count - filled, self.num_samples - self.position)
            batch[filled:filled + take] = perm[self.position:self.position + take]
            filled += take
            self.position += take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        self.consumed += global_batch_size
        per = count // self.dp_size
        return batch[self.dp_rank * per:(self.dp_rank + 1) * per].tolist()

    def state_dict(self) -> dict:
        return {"version": self.VERSION, "num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != self.VERSION:
            raise DataError(f"sampler state has version {state.get('version')}; expected {self.VERSION}")
        for key in ("num_samples", "seed"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"sampler state was saved with {key}={state[key]} but this run has "
                                f"{getattr(self, key)}; the data or data.seed changed since the checkpoint")
        self.epoch, self.position, self.consumed = int(state["epoch"]), int(state["position"]), int(state["consumed"])
