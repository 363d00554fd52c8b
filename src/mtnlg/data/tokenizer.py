"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``), with special and chat-role tokens.

Every tokenizer here is byte-level, so any UTF-8 text (Chinese included) round-trips exactly.
``byte_tokenizer()`` has no merges (256 byte tokens + specials) and is what the spec's API uses when
no tokenizer is given; ``train_bpe`` learns merges from a corpus. Saved as ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mtnlg.errors import ConfigError, DataError

EOD = "<|endoftext|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [EOD, PAD, *ROLE_TOKENS.values(), END_OF_TURN]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE: every byte and the special tokens
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """A thin, typed wrapper over a ``tokenizers.Tokenizer`` with mtnlg's special tokens."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        if hf.token_to_id(EOD) is None:
            raise DataError(f"tokenizer lacks the special token {EOD}; retrain it with `mtnlg tokenizer train`")
        self.eod_id: int = hf.token_to_id(EOD)
        # Without its own pad token (GPT-2's tokenizer) padding reuses end-of-text, as in Hugging Face:
        # padded positions are masked, so the id only has to exist.
        pad = hf.token_to_id(PAD)
        self.pad_id: int = pad if pad is not None else self.eod_id
        self._bytes: dict[int, bytes] = {}  # token_bytes, filled as tokens are met (every decode step asks)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.hf.id_to_token(idx)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, idx: int) -> bytes:
        """The raw bytes of one token (byte-level tokens map 1:1 onto bytes; specials onto their UTF-8)."""
        b = self._bytes.get(idx)
        if b is None:
            tok = self.hf.id_to_token(idx)
            if tok is None:
                b = b""
            elif tok in SPECIAL_TOKENS or self.hf.get_added_tokens_decoder().get(idx) is not None:
                b = tok.encode()
            else:
                b = bytes(_UNICODE_TO_BYTE[c] for c in tok)
            self._bytes[idx] = b
        return b

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise DataError(f"--output {d} is an existing file; the tokenizer is saved into a directory")
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / TOKENIZER_FILE))
        return d / TOKENIZER_FILE

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise DataError(f"no tokenizer at {p}; train one with `mtnlg tokenizer train --corpus poems --output DIR`")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"{p} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet ByteLevel uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


def _finish(hf: HFTokenizer) -> HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return hf


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (ids 0-255 in byte order) followed by the special tokens. Needs no training."""
    vocab = {_BYTE_TO_UNICODE[b]: b for b in range(256)}
    hf = _finish(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def train_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int | None = None,
              min_frequency: int | None = None) -> Tokenizer:
    """A byte-level BPE whose tokens cover the corpus's characters first, then its frequent strings.

    ::

        bytes (256) + specials ──► one token per character, most frequent first (each character's
        UTF-8 bytes merged into one token: 春 = e6 98 a5 -> (e6 98) -> (e6 98 a5))
                               ──► merges of whole-character tokens, most frequent pair first

    So a model never has to spell a character of its corpus out of byte pieces (which lets sampling
    emit half characters and characters the corpus never had). ``vocab_size=None`` sizes the
    vocabulary from the corpus: every character, plus merges of pairs seen at least
    ``min_frequency`` times (default: once per 2,000 characters of text, at least 2). A given
    ``vocab_size`` is met exactly (or fewer tokens when the corpus has too little to merge); when it
    is smaller than full coverage, the most frequent characters get tokens and the rest stay bytes.
    """
    docs = [t for t in texts if t]
    counts: Counter[str] = Counter()
    for d in docs:
        counts.update(d)
    total = sum(counts.values())
    if vocab_size is not None and vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if min_frequency is not None and min_frequency < 1:
        raise ConfigError(f"--min-frequency must be >= 1 (the times a pair must occur to be merged), got {min_frequency}")
    if not docs:
        raise ConfigError("the tokenizer's training text is empty; give files that hold some text")
    if min_frequency is None:
        min_frequency = max(2, total // 2000) if vocab_size is None else 2
    budget = vocab_size if vocab_size is not None else 1 << 31
    # the special tokens first (ids 0-5, as a BPE trainer lays them out, so vocab.json holds them), then bytes
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({_BYTE_TO_UNICODE[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    merges: list[tuple[str, str]] = []

    def add(a: str, b: str) -> None:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))

    # 1. character coverage, most frequent first (ties: code point, so the result is deterministic)
    for ch, _n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces = [_BYTE_TO_UNICODE[b] for b in ch.encode("utf-8", errors="surrogatepass")]
        prefixes = ["".join(pieces[:k]) for k in range(2, len(pieces) + 1)]
        if len(vocab) + sum(p not in vocab for p in prefixes) > budget:
            break
        for k in range(1, len(pieces)):
            add("".join(pieces[:k]), pieces[k])
    # 2. merges of whole-character tokens, in the order a standard BPE trainer learns them
    if len(vocab) < budget and docs:
        trained = _finish(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=min(budget, 1 << 20),
                                      min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        trained.train_from_iterator(docs, trainer=trainer)
        for a, b in json.loads(trained.to_str())["model"]["merges"]:
            if len(vocab) >= budget:
                break
            if a in vocab and b in vocab and _whole(a) and _whole(b):
                add(a, b)
    hf = _finish(HFTokenizer(models.BPE(vocab=vocab, merges=merges)))
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(hf)


def _whole(token: str) -> bool:
    """True when a byte-level token string is a sequence of whole UTF-8 characters."""
    try:
        bytes(_UNICODE_TO_BYTE[c] for c in token).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def uncovered_characters(tokenizer: Tokenizer, texts: Iterable[str]) -> set[str]:
    """The characters of ``texts`` that have no token of their own (they are spelled in byte pieces)."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    out = set()
    for ch in chars:
        tok = "".join(_BYTE_TO_UNICODE[b] for b in ch.encode("utf-8", errors="surrogatepass"))
        if tokenizer.hf.token_to_id(tok) is None:
            out.add(ch)
    return out
