"""Built-in corpora that need no download: Chinese poems, a larger Chinese collection, Python source.

``poems`` and ``zh`` come from the Debian package ``fortunes-zh`` (installed by ``bash setup.sh``):
fortune files whose entries are separated by lines holding a single ``%`` and whose titles and
authors are coloured with ANSI escapes. We strip the escapes and keep one entry per document,
stored as clean text a model should learn to write:

* ``poems``: the body first, then one attribution line (``——李白《静夜思》``), so a model learns
  to open with verse, not with a title or an author line (the raw entries start with both);
* ``zh``: the Chinese entries only (those where under a tenth of the non-space characters are
  Chinese, such as box-drawn tables and command listings, are dropped), with indentation,
  non-breaking spaces and runs of blank lines normalized.

``python`` is the standard library's own source, present on every machine, as a fallback when the
package is missing. ``corpus_weights`` parses the blend syntax of ``data.corpus``
(``"poems:0.3,zh:0.7"``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from mtnlg.errors import DataError, did_you_mean

# Where Debian installs fortune files (MTNLG_FORTUNES_DIR overrides, e.g. for tests).
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes", "/usr/local/share/games/fortunes")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    files: tuple[str, ...] = ()  # fortune files; empty = the Python standard library
    clean: str = ""  # "poem" | "zh" | "" (as parsed)


CORPORA: dict[str, CorpusSpec] = {
    "poems": CorpusSpec("poems", "Tang 300 + Song 100 poems (Debian fortunes-zh), one poem per document: "
                        "body, then ——author《title》", ("tang300", "song100"), "poem"),
    "zh": CorpusSpec("zh", "Chinese classics, sayings and notes (fortunes-zh 'chinese'), one entry per document",
                     ("chinese",), "zh"),
    "python": CorpusSpec("python", "the Python standard library's source files, one file per document"),
}


@dataclass(frozen=True)
class CorpusInfo:
    """One row of ``mtnlg data list``; ``documents``/``characters`` are None when unavailable."""

    name: str
    description: str
    documents: int | None
    characters: int | None
    available: bool
    error: str | None = None


def fortunes_dir() -> Path | None:
    """The directory holding the fortunes-zh files, or None when the package is not installed."""
    candidates = [os.environ["MTNLG_FORTUNES_DIR"]] if os.environ.get("MTNLG_FORTUNES_DIR") else list(FORTUNE_DIRS)
    for d in candidates:
        if (Path(d) / "tang300").is_file():
            return Path(d)
    return None


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file on ``%`` lines, strip ANSI colour escapes and surrounding blank space."""
    text = _ANSI.sub("", text).replace("\r\n", "\n")
    docs, lines = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            docs.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line.rstrip())
    docs.append("\n".join(lines).strip())
    return [d for d in docs if d]


_HEADER = re.compile(r"^(?:题目[:：])?\s*(?P<title>《[^\n]*?》[^\n]*)\n作者[:：]\s*(?P<author>[^\n]*)\n")
_SUBTITLE = re.compile(r"^\s*[（(]?其[一二三四五六七八九十]+[)）]?\s*$")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def clean_poem(entry: str) -> str:
    """``《title》\\n作者：author\\nbody`` -> ``body\\n——author《title》`` (sub-heading lines such as
    ``其一`` dropped, indentation and blank lines removed). Entries without that header are kept as
    their non-blank lines."""
    m = _HEADER.match(entry)
    body = entry[m.end():] if m else entry
    lines = [ln.strip() for ln in body.split("\n")]
    lines = [ln for ln in lines if ln and not _SUBTITLE.match(ln)]
    if m:
        author = re.sub(r"[（(][０-９0-9－\-—？?\s]*[）)]", "", m.group("author")).strip()
        title = m.group("title").strip()
        lines.append(f"——{author}{title}" if author else f"——{title}")
    return "\n".join(lines)


def chinese_share(text: str) -> float:
    """Fraction of the non-space characters of ``text`` that are Chinese (CJK ideographs)."""
    chars = [c for c in text if not c.isspace()]
    return sum(1 for c in chars if _CJK.match(c)) / len(chars) if chars else 0.0


def clean_zh(entry: str) -> str:
    """Indentation, non-breaking spaces and runs of spaces / blank lines normalized."""
    lines = [re.sub(r"[ \t\u00a0\u3000]+", " ", ln).strip() for ln in entry.replace("\u00a0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _clean(spec: CorpusSpec, docs: list[str]) -> list[str]:
    if spec.clean == "poem":
        docs = [clean_poem(d) for d in docs]
    elif spec.clean == "zh":
        docs = [clean_zh(d) for d in docs if chinese_share(d) >= 0.1]
    return [d for d in docs if d]


def _load_fortunes(spec: CorpusSpec) -> list[str]:
    d = fortunes_dir()
    if d is None:
        raise DataError(f"corpus '{spec.name}' needs the Debian package fortunes-zh, which is not installed; "
                        f"run `bash setup.sh` (or `apt-get install fortunes-zh`), or use --data.corpus=python")
    docs: list[str] = []
    for fname in spec.files:
        path = d / fname
        try:
            docs += parse_fortunes(path.read_bytes().decode("utf-8", errors="strict"))
        except FileNotFoundError:
            raise DataError(f"{path} is missing (fortunes-zh looks incomplete); run `bash setup.sh`") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not valid UTF-8 at byte {e.start}; reinstall fortunes-zh") from None
    return _clean(spec, docs)


def _python_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _load_python() -> list[str]:
    docs = []
    for p in _python_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test fixtures are deliberately not UTF-8
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"no Python source found under {sysconfig.get_paths()['stdlib']}")
    return docs


def _load(name: str) -> tuple[str, ...]:
    spec = CORPORA[name]
    return _load_cached(name, str(fortunes_dir()) if spec.files else "")


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, where: str) -> tuple[str, ...]:  # keyed by location: a changed dir reloads
    spec = CORPORA[name]
    return tuple(_load_fortunes(spec) if spec.files else _load_python())


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise DataError(f"unknown corpus '{name}'; built-in corpora are {list(CORPORA)}" + did_you_mean(name, CORPORA))


def corpus_weights(spec: str) -> list[tuple[str, float | None]]:
    """``"poems:0.3,zh:0.7"`` -> ``[("poems", 0.3), ("zh", 0.7)]``; ``"poems"`` -> ``[("poems", None)]``.

    A name without a weight is mixed in proportion to its size; every name must be built in."""
    out: list[tuple[str, float | None]] = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        _check_name(name)
        if not weight:
            out.append((name, None))
            continue
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not (w >= 0 and w != float("inf")):
            raise DataError(f"data.corpus='{spec}': the weight of '{name}' must be a non-negative number, e.g. "
                            f"poems:0.3,zh:0.7")
        out.append((name, w))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise DataError(f"data.corpus='{spec}' names a corpus twice")
    if any(w is not None for _, w in out) and (any(w is None for _, w in out) or sum(w for _, w in out) <= 0):
        raise DataError(f"data.corpus='{spec}': give every corpus a weight (not all zero), or none")
    return out


def load_corpus(name: str) -> list[str]:
    """The documents of built-in corpus ``name`` ("poems", "zh" or "python"), one string per document."""
    _check_name(name)
    return list(_load(name))


def corpus_fingerprint(name: str) -> str:
    """A hex digest of the corpus content (changes when the package is upgraded)."""
    _check_name(name)
    return documents_fingerprint(_load(name))


def documents_fingerprint(docs) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def list_corpora() -> list[CorpusInfo]:
    """Every built-in corpus with its document and character counts (or why it is unavailable)."""
    rows = []
    for spec in CORPORA.values():
        try:
            docs = _load(spec.name)
        except DataError as e:
            rows.append(CorpusInfo(spec.name, spec.description, None, None, False, str(e)))
            continue
        rows.append(CorpusInfo(spec.name, spec.description, len(docs), sum(map(len, docs)), True))
    return rows
