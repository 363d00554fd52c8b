"""Built-in corpora that need no download: Chinese poems, a larger Chinese collection, Python source.

``poems`` and ``zh`` come from the Debian package ``fortunes-zh`` (installed by ``bash setup.sh``):
fortune files whose entries are separated by lines holding a single ``%`` and whose titles and
authors are coloured with ANSI escapes. We strip the escapes and keep one entry per document
(title and author lines included). ``python`` is the standard library's own source, present on
every machine, as a fallback when the package is missing.
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


CORPORA: dict[str, CorpusSpec] = {
    "poems": CorpusSpec("poems", "Tang 300 + Song 100 poems (Debian fortunes-zh), one poem per document",
                        ("tang300", "song100")),
    "zh": CorpusSpec("zh", "Chinese classics and sayings (fortunes-zh 'chinese'), one entry per document",
                     ("chinese",)),
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
    return docs


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
