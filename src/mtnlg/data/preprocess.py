"""Tokenize text into ``PREFIX.bin`` / ``PREFIX.idx`` (see :mod:`mtnlg.data.indexed`) with worker processes.

Inputs, in order (the output is identical for any number of workers):

* ``corpus:NAME`` - a built-in corpus (:mod:`mtnlg.data.corpora`);
* ``*.txt`` - one document per file, or, with ``separator``, documents separated by lines that
  consist of exactly that string (``""`` = blank lines); surrounding blank lines are stripped
  in separator mode, kept verbatim in whole-file mode;
* ``*.jsonl`` / ``*.jsonl.gz`` - one JSON object per line, the text under ``json_key``;
* a directory - every file of those kinds below it, sorted.

Every document ends with the tokenizer's EOD token. Special-token strings inside the text (a literal
``<|endoftext|>`` or ``<|user|>``) are tokenized as plain text, so data can never forge a document
boundary or a chat-role marker, and decoding still returns the text exactly. Invalid UTF-8, invalid JSON and lines without
a string ``json_key`` are *bad lines*: each is counted and the first few are reported as
``file:line: reason``; ``on_error="fail"`` stops at the first one (nothing is written),
``"skip"`` drops it (a ``.txt`` drops only the bad line, a ``.jsonl`` line is a whole document).
Nothing is dropped silently.

::

    main process: read 256 KiB chunks ──► pool of N workers: decode, parse, encode_batch ──► main: write in order
"""

from __future__ import annotations

import collections
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import gzip
import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtnlg.data.indexed import IndexedWriter, dtype_for_vocab, tokenizer_path
from mtnlg.data.tokenizer import Tokenizer
from mtnlg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # work unit handed to a worker (256 KiB: small enough to balance load)
MAX_REPORTED = 10  # bad lines reported individually
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class BadLine:
    """A skipped (or fatal) input line."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PreprocessStats:
    """What ``preprocess`` wrote and what it skipped."""

    prefix: str
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    bad_lines: int = 0
    errors: list[BadLine] = field(default_factory=list)  # the first MAX_REPORTED bad lines
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class _Task:
    kind: str  # "jsonl" | "txt" | "docs"
    source: str  # file path or corpus:NAME
    first: int  # first line number (1-based) or first document index
    payload: bytes | list[str]

    @property
    def nbytes(self) -> int:
        if isinstance(self.payload, bytes):
            return len(self.payload)
        return sum(len(d.encode("utf-8", errors="replace")) for d in self.payload)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Resolve directories into their ``.txt``/``.jsonl``/``.jsonl.gz`` files; check that every input exists."""
    if not inputs:
        raise ConfigError("--input needs at least one file, directory or corpus:NAME")
    out: list[str] = []
    for item in inputs:
        if item.startswith("corpus:"):
            from mtnlg.data.corpora import _check_name

            _check_name(item[len("corpus:"):])
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not files:
                raise DataError(f"--input {item}: directory holds no {'/'.join(SUFFIXES)} files")
            out += files
        elif p.is_file():
            if not item.endswith(SUFFIXES):
                raise DataError(f"--input {item}: unsupported file type; use {', '.join(SUFFIXES)} or corpus:NAME")
            out.append(item)
        else:
            raise DataError(f"--input {item}: no such file or directory")
    return out


def _read_blocks(path: str) -> Iterator[bytes]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                yield block
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def iter_tasks(inputs: list[str]) -> Iterator[_Task]:
    """Cut the inputs into work units of about ``CHUNK_BYTES``, on line/document boundaries."""
    for src in expand_inputs(inputs):
        if src.startswith("corpus:"):
            from mtnlg.data.corpora import load_corpus

            docs = load_corpus(src[len("corpus:"):])
            start, size = 0, 0
            for i, d in enumerate(docs):
                size += len(d) * 3
                if size >= CHUNK_BYTES or i == len(docs) - 1:
                    yield _Task("docs", src, start, docs[start:i + 1])
                    start, size = i + 1, 0
        elif src.endswith(".txt"):
            yield _Task("txt", src, 1, b"".join(_read_blocks(src)))
        else:
            line, rest = 1, b""
            for block in _read_blocks(src):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    rest = block
                    continue
                chunk, rest = block[:cut], block[cut:]
                yield _Task("jsonl", src, line, chunk)
                line += chunk.count(b"\n")
            if rest:
                yield _Task("jsonl", src, line, rest)


def parse_task(task: _Task, json_key: str = "text", separator: str | None = None) -> tuple[list[str], list[BadLine]]:
    """The documents in one work unit and the bad lines met on the way."""
    bad: list[BadLine] = []
    if task.kind == "docs":
        return list(task.payload), bad
    data: bytes = task.payload  # type: ignore[assignment]
    if task.kind == "txt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            good = []
            for i, raw in enumerate(data.split(b"\n")):
                try:
                    good.append(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    bad.append(BadLine(task.source, task.first + i, f"invalid UTF-8 at byte {e.start} of the line"))
            text = "\n".join(good)
        if separator is None:
            return ([text] if text else []), bad
        docs, cur = [], []
        for line in text.split("\n"):
            if line.rstrip("\r") == separator:
                docs.append("\n".join(cur).strip("\r\n"))
                cur = []
            else:
                cur.append(line)
        docs.append("\n".join(cur).strip("\r\n"))
        return [d for d in docs if d.strip()], bad
    try:  # decode the chunk once (fast); only a chunk with invalid UTF-8 is decoded line by line
        lines: list = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = data.split(b"\n")
    docs = []
    for i, line in enumerate(lines):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(BadLine(task.source, task.first + i, f"invalid UTF-8 at byte {e.start} of the line"))
                continue
        if not line.strip():
            continue  # blank line: no data, nothing dropped
        try:
            obj = json.loads(line)
        except ValueError as e:
            bad.append(BadLine(task.source, task.first + i, f"invalid JSON ({str(e).split(':')[0]})"))
            continue
        except RecursionError:
            bad.append(BadLine(task.source, task.first + i, "invalid JSON (nested too deeply)"))
            continue
        value = obj.get(json_key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            bad.append(BadLine(task.source, task.first + i, f"no string field '{json_key}'"))
            continue
        docs.append(value)
    return docs, bad


def iter_documents(inputs: list[str], json_key: str = "text", separator: str | None = None,
                   on_error: str = "skip", stats: PreprocessStats | None = None) -> Iterator[str]:
    """Every document of ``inputs`` as text (used to train tokenizers); bad lines as in ``preprocess``."""
    _check_on_error(on_error)
    stats = stats or PreprocessStats(prefix="")
    for task in iter_tasks(inputs):
        docs, bad = parse_task(task, json_key, separator)
        _record_bad(stats, bad, on_error)
        stats.input_bytes += task.nbytes
        stats.documents += len(docs)
        yield from docs


# ----------------------------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(tok: Tokenizer, json_key: str, separator: str | None, serial: bool) -> None:
    """Per-process state. A forked worker inherits ``tok`` for free; a spawned one unpickles it."""
    if serial:  # one process = one core: the pool, not Rayon, provides the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok.hf.encode_special_tokens = True  # "<|endoftext|>" in the data is text, not a boundary
    _W.update(tok=tok, json_key=json_key, separator=separator, dtype=dtype_for_vocab(tok.vocab_size))


PIECE_CHARS = 1 << 15  # a longer document is encoded in pieces of about this many characters
BATCH_CHARS = 1 << 20  # characters encoded in one encode_batch call (bounds the tokenizer's memory)


def split_document(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters whose encodings, concatenated, equal the
    encoding of ``text``: each cut falls right after a newline (or a space) that sits between two
    non-space characters, where the byte-level pre-tokenizer always starts a new word anyway. A stretch
    of ``2 * size`` characters without such a place is cut where it is (exactness yields to memory)."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + 2 * size
        cut = -1
        for sep in ("\n", " "):
            j = text.find(sep, start + size, hi)
            while j != -1 and not (j + 1 < len(text) and not text[j - 1].isspace() and not text[j + 1].isspace()):
                j = text.find(sep, j + 1, hi)
            if j == -1:
                j = text.rfind(sep, lo, start + size)
                while j != -1 and not (not text[j - 1].isspace() and not text[j + 1].isspace()):
                    j = text.rfind(sep, lo, j)
            if j != -1:
                cut = j + 1 if sep == "\n" else j  # after a newline; before a space (" word" is one word)
                break
        if cut <= start:
            cut = min(len(text), start + size)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _encode_task(task: _Task) -> tuple[np.ndarray, np.ndarray, list[BadLine], int]:
    """Parse and tokenize one work unit: (tokens with an EOD after each doc, doc lengths, bad lines, bytes).

    Memory stays proportional to the text, whatever one document's size: long documents are cut
    into pieces (:func:`split_document`) and at most ``BATCH_CHARS`` characters are encoded at once,
    their ids kept as compact arrays."""
    docs, bad = parse_task(task, _W["json_key"], _W["separator"])
    tok: Tokenizer = _W["tok"]
    dtype = _W["dtype"]
    eod = np.array([tok.eod_id], dtype=dtype)
    lengths = np.zeros(len(docs), np.int64)
    out: list[np.ndarray] = []
    pending: list[tuple[int, str | None]] = []  # (document, piece) in order; None = that document's EOD
    size = 0

    def flush() -> None:
        nonlocal size
        texts = [t for _, t in pending if t is not None]
        encs = iter(tok.hf.encode_batch(texts, add_special_tokens=False) if texts else [])
        for j, t in pending:
            ids = eod if t is None else np.array(next(encs).ids, dtype=dtype)
            out.append(ids)
            lengths[j] += ids.size
        pending.clear()
        size = 0

    for j, doc in enumerate(docs):
        for piece in split_document(doc):
            pending.append((j, piece))
            size += len(piece)
            if size >= BATCH_CHARS:
                flush()
        pending.append((j, None))
    flush()
    return (np.concatenate(out) if out else np.zeros(0, dtype)), lengths, bad, task.nbytes


def _mp_context():
    """fork (fast start-up) when this process runs no other Python thread, else spawn (always safe).

    Workers tokenize serially (TOKENIZERS_PARALLELISM=false), so a Rayon pool left in the parent is
    never touched in a forked child; other threads could hold locks across a fork, hence spawn then.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "fail"):
        raise ConfigError(f"--on-error {on_error!r} must be 'skip' or 'fail'")


def _record_bad(stats: PreprocessStats, bad: list[BadLine], on_error: str) -> None:
    if not bad:
        return
    if on_error == "fail":
        more = f" (and {len(bad) - 1} more in this chunk)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; fix the input or pass --on-error skip")
    stats.bad_lines += len(bad)
    stats.errors += bad[:max(0, MAX_REPORTED - len(stats.errors))]


def preprocess(inputs: list[str], tokenizer: Tokenizer, output: str | Path, *, json_key: str = "text",
               separator: str | None = None, workers: int = 1, on_error: str = "skip",
               progress: Callable[[int], None] | None = None) -> PreprocessStats:
    """Tokenize ``inputs`` into ``output.bin`` / ``output.idx``; returns counts and skipped lines.

    ``workers > 1`` uses a pool of that many processes (each tokenizing serially); ``workers == 1``
    runs in this process. ``progress(n)`` is called with the input bytes of each finished chunk.
    """
    _check_on_error(on_error)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    cpus = os.cpu_count() or 1
    if workers > 4 * cpus:  # each worker is a process: more than a few per CPU only swaps
        raise ConfigError(f"--workers {workers} is more than {4 * cpus} (4 per CPU of this machine's {cpus}); "
                          f"each worker is a process, and more than one per CPU rarely pays")
    expand_inputs(inputs)  # fail fast on a missing input, before any worker starts
    stats = PreprocessStats(prefix=str(output))
    t0 = time.perf_counter()

    def consume(result) -> None:
        tokens, lengths, bad, nbytes = result
        _record_bad(stats, bad, on_error)
        if lengths.size:
            writer.add_documents(tokens, lengths)
        stats.input_bytes += nbytes
        if progress is not None:
            progress(nbytes)

    with IndexedWriter(output, tokenizer.vocab_size, tokenizer.eod_id) as writer:
        if workers == 1:
            flag = tokenizer.hf.encode_special_tokens
            _init_worker(tokenizer, json_key, separator, serial=False)
            try:
                for task in iter_tasks(inputs):
                    consume(_encode_task(task))
            finally:
                tokenizer.hf.encode_special_tokens = flag  # the caller's tokenizer is left as it was
                _W.clear()
        else:
            # The executor (unlike multiprocessing.Pool) raises instead of hanging when a worker dies.
            with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                                     initargs=(tokenizer, json_key, separator, True)) as pool:
                window: collections.deque = collections.deque()
                try:
                    for task in iter_tasks(inputs):
                        window.append(pool.submit(_encode_task, task))
                        if len(window) >= 2 * workers + 1:  # bounded read-ahead keeps memory flat
                            consume(window.popleft().result())
                    while window:
                        consume(window.popleft().result())
                except BrokenProcessPool:
                    raise DataError(f"a preprocessing worker died, most likely killed by the system for lack of "
                                    f"memory (each of the {workers} workers holds one {CHUNK_BYTES >> 10} KiB chunk, or "
                                    f"one whole JSONL line, and its tokens); use fewer --workers or free some "
                                    f"memory") from None
                finally:
                    for fut in window:
                        fut.cancel()
        stats.documents, stats.tokens = writer.num_docs, writer.num_tokens
        if stats.documents == 0:  # raised inside `with`: nothing is written
            raise DataError(f"no documents found in {', '.join(map(str, inputs))}" +
                            (f" (all {stats.bad_lines} non-blank lines were bad)" if stats.bad_lines else ""))
    tokenizer.hf.save(str(tokenizer_path(output)))  # so `data inspect` and training find the matching tokenizer
    stats.seconds = time.perf_counter() - t0
    if stats.bad_lines:
        log.warning("skipped %d bad line(s): %s%s", stats.bad_lines, "; ".join(map(str, stats.errors[:3])),
                    " ..." if stats.bad_lines > 3 else "")
    return stats
