"""Token files: ``PREFIX.bin`` (all tokens, back to back) and ``PREFIX.idx`` (header + per-document index).

The design follows Megatron's ``MMapIndexedDataset`` (a flat token file plus an index of document
offsets and lengths, both memory-mapped) with its own, versioned and checked layout::

    PREFIX.idx (little endian)
    +------------------+----------------------------------------------------------+
    | magic   8 bytes  | b"MTNLGIDX"                                              |
    | version u32      | 1                                                        |
    | dtype   u8 + 3x0 | 1 = uint16 (vocab < 65536), 2 = uint32                    |
    | vocab   u32      | tokenizer vocabulary size                                |
    | eod     i32      | end-of-document token id appended to every doc (-1: none)|
    | docs    u64      | number of documents N                                    |
    | tokens  u64      | number of tokens T (EODs included)                       |
    | bin_crc u32      | CRC-32 of PREFIX.bin (checked by ``verify()``)           |
    | idx_crc u32      | CRC-32 of the two arrays below (checked on open)         |
    +------------------+----------------------------------------------------------+
    | offsets i64[N]   | first token of each document                             |
    | lengths u32[N]   | tokens of each document (its EOD included)               |
    +------------------+----------------------------------------------------------+
    PREFIX.bin: T tokens of the header's dtype

Opening checks the magic, version, dtype, sizes of both files and the index checksum, so a
corrupt or truncated file raises :class:`~mtnlg.errors.DataError` naming it; ``verify()`` also
reads the whole ``.bin`` (checksum and token range). Documents are zero-copy ``numpy`` views of
the memory map. Files are written to temporary names and renamed, so a crash never leaves a
half-written prefix behind.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np

from mtnlg.errors import DataError

MAGIC = b"MTNLGIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIB3xIiQQII")  # magic, version, dtype, vocab, eod, docs, tokens, bin_crc, idx_crc
HEADER_SIZE = _HEADER.size
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_CODES = {v: k for k, v in DTYPES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    return DTYPES[1] if vocab_size < 65536 else DTYPES[2]


def paths_for(prefix: str | Path) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``; a prefix given with either suffix is accepted."""
    p = str(prefix)
    if p.endswith((".bin", ".idx")):
        p = p[:-4]
    return Path(p + ".bin"), Path(p + ".idx")


def tokenizer_path(prefix: str | Path) -> Path:
    """``PREFIX.tokenizer.json``: the copy of the tokenizer that ``mtnlg preprocess`` keeps next to its output."""
    return Path(str(paths_for(prefix)[0])[:-4] + ".tokenizer.json")


def exists(prefix: str | Path) -> bool:
    b, i = paths_for(prefix)
    return b.is_file() and i.is_file()


def _crc32(data: np.ndarray, step: int = 1 << 24) -> int:
    """CRC-32 of a (memory-mapped) byte array, read in 16 MiB pieces."""
    crc = 0
    for s in range(0, data.size, step):
        crc = zlib.crc32(data[s:s + step], crc)
    return crc & 0xFFFFFFFF


class IndexedWriter:
    """Append documents (token arrays) and finish with ``close()``; use as a context manager.

    Tokens are written as they come (constant memory); the index is kept in memory (12 bytes per
    document). On an exception inside ``with`` the temporary files are removed.
    """

    def __init__(self, prefix: str | Path, vocab_size: int, eod_id: int | None = None):
        self.bin_path, self.idx_path = paths_for(prefix)
        for p in (self.bin_path, self.idx_path):
            if p.is_dir():
                raise DataError(f"{p} is a directory; choose another --output prefix (or remove that directory)")
        if self.bin_path.parent.exists() and not self.bin_path.parent.is_dir():
            raise DataError(f"--output {prefix}: {self.bin_path.parent} is a file, not a directory")
        try:
            self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"--output {prefix}: cannot create {self.bin_path.parent} ({e.strerror or e})") from None
        self.vocab_size = int(vocab_size)
        self.eod_id = -1 if eod_id is None else int(eod_id)
        self.dtype = dtype_for_vocab(vocab_size)
        self._tmp_bin = self.bin_path.with_name(f".{self.bin_path.name}.{os.getpid()}.tmp")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._crc = 0
        self.num_tokens = 0
        self.num_docs = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        data = tokens.tobytes()
        self._f.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._lengths.append(lengths.astype(np.uint32))
        self.num_tokens += tokens.size
        self.num_docs += lengths.size

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size]))

    def close(self) -> None:
        """Write the index and atomically move both files into place."""
        self._f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.uint32)
        offsets = np.zeros(lengths.size, np.int64)
        if lengths.size:
            np.cumsum(lengths[:-1], dtype=np.int64, out=offsets[1:])
        body = offsets.astype("<i8").tobytes() + lengths.astype("<u4").tobytes()
        header = _HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], self.vocab_size, self.eod_id, self.num_docs,
                              self.num_tokens, self._crc & 0xFFFFFFFF, zlib.crc32(body) & 0xFFFFFFFF)
        try:
            with open(self._tmp_idx, "wb") as f:
                f.write(header)
                f.write(body)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
        except OSError as e:
            self.abort()
            raise DataError(f"cannot write {self.bin_path} / {self.idx_path}: {e.strerror or e}") from None

    def abort(self) -> None:
        """Close and remove the temporary files (nothing under the final names is touched)."""
        self._f.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped documents of a prefix: ``ds[i]`` is a zero-copy view of document i."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = paths_for(prefix)
        self.prefix = str(self.bin_path)[:-4]
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"{p} does not exist; create it with `mtnlg preprocess --output {self.prefix}`")
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(f"{self.idx_path} is truncated ({idx_size} bytes, header needs {HEADER_SIZE}); "
                            f"re-run `mtnlg preprocess`")
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")  # the index is mapped too, never copied
        magic, version, code, vocab, eod, docs, tokens, bin_crc, idx_crc = _HEADER.unpack(bytes(raw[:HEADER_SIZE]))
        if magic != MAGIC:
            raise DataError(f"{self.idx_path} is not an mtnlg index (bad magic {magic!r}); re-run `mtnlg preprocess`")
        if version != VERSION:
            raise DataError(f"{self.idx_path} has format version {version}; this mtnlg reads version {VERSION}")
        if code not in DTYPES:
            raise DataError(f"{self.idx_path} is corrupt (unknown dtype code {code}); re-run `mtnlg preprocess`")
        want = HEADER_SIZE + docs * 12
        if idx_size != want:
            raise DataError(f"{self.idx_path} is {'truncated' if idx_size < want else 'corrupt'}: {idx_size} bytes, "
                            f"expected {want} for {docs} documents; re-run `mtnlg preprocess`")
        if _crc32(raw[HEADER_SIZE:]) != idx_crc:
            raise DataError(f"{self.idx_path} is corrupt (index checksum mismatch); re-run `mtnlg preprocess`")
        self.dtype = DTYPES[code]
        self.vocab_size: int = vocab
        self.eod_id: int | None = None if eod < 0 else eod
        self.num_tokens: int = tokens
        self._bin_crc = bin_crc
        self.offsets = raw[HEADER_SIZE:HEADER_SIZE + 8 * docs].view("<i8")
        self.lengths = raw[HEADER_SIZE + 8 * docs:].view("<u4")
        if docs and (int(self.offsets[-1]) + int(self.lengths[-1]) != tokens or self.offsets[0] != 0):
            raise DataError(f"{self.idx_path} is corrupt (document offsets do not add up to {tokens} tokens)")
        size = self.bin_path.stat().st_size
        if size != tokens * self.dtype.itemsize:
            raise DataError(f"{self.bin_path} is {'truncated' if size < tokens * self.dtype.itemsize else 'corrupt'}: "
                            f"{size} bytes, its index expects {tokens} {self.dtype.name} tokens "
                            f"({tokens * self.dtype.itemsize} bytes); re-run `mtnlg preprocess`")
        if tokens:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(tokens,))
        else:
            self.tokens = np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self.lengths.size

    def __getitem__(self, i: int) -> np.ndarray:
        """Document ``i`` (with its trailing EOD), a view into the memory map."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} ({len(self)} documents)")
        off = int(self.offsets[i])
        return self.tokens[off:off + int(self.lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """``length`` tokens of document ``i`` starting at ``offset`` (a view)."""
        doc = self[i]
        return doc[offset:] if length is None else doc[offset:offset + length]

    def verify(self) -> float:
        """Read the whole ``.bin``: check its CRC-32 and that every token is below the vocabulary size.

        Training and evaluation call it when they start (about a second per GB); returns the seconds."""
        t0 = time.perf_counter()
        if _crc32(np.asarray(self.tokens).view(np.uint8)) != self._bin_crc:
            raise DataError(f"{self.bin_path} is corrupt (checksum mismatch with {self.idx_path.name}); re-run "
                            f"`mtnlg preprocess`")
        if self.num_tokens and int(self.tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.bin_path} has token id {int(self.tokens.max())}, outside its {self.vocab_size}-token "
                            f"vocabulary; re-run `mtnlg preprocess` with the model's tokenizer")
        return time.perf_counter() - t0

    def summary(self) -> dict:
        """Counts and types, as ``mtnlg data inspect`` prints them."""
        return {"prefix": self.prefix, "documents": len(self), "tokens": self.num_tokens, "dtype": self.dtype.name,
                "vocab_size": self.vocab_size, "eod_id": self.eod_id, "format_version": VERSION,
                "bin_bytes": self.num_tokens * self.dtype.itemsize}
