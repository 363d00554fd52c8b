"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``), with special and chat-role tokens.

Every tokenizer here is byte-level, so any UTF-8 text (Chinese included) round-trips exactly.
``byte_tokenizer()`` has no merges (256 byte tokens + specials) and is what the spec's API uses when
no tokenizer is given; ``train_bpe`` learns merges from a corpus. Saved as ``tokenizer.json``.
"""

from __future__ import annotations

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
        tok = self.hf.id_to_token(idx)
        if tok is None:
            return b""
        if tok in SPECIAL_TOKENS or self.hf.get_added_tokens_decoder().get(idx) is not None:
            return tok.encode()
        return bytes(_UNICODE_TO_BYTE[c] for c in tok)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
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


def train_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Learn a byte-level BPE of exactly ``vocab_size`` tokens (or fewer if the corpus is too small)."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {min_size} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    hf = _finish(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
