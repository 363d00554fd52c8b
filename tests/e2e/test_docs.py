"""Every shell and Python example in README.md and docs/*.md runs, as a user would type it.

The blocks of all pages run in order in one scratch directory (so a later page may use the
``runs/tiny`` an earlier one trained), with ``examples/`` and ``src/`` linked in. Sizes are shrunk
in one place only: every ``mtnlg train`` gets ``--config examples/tiny.yaml`` when it names no
config, and ``--train.steps=4`` when it names no step count. A block that cannot run on one machine
(a Slurm submission, a cluster's hostnames) is preceded by ``<!-- not run: REASON -->``, and the
reason must name the test that exercises the same thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*not run:(?P<reason>.*?)-->\s*\n)?^```(?P<lang>[A-Za-z]*)[^\n]*\n(?P<code>.*?)^```",
                   re.S | re.M)
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, not-run reason) of each fenced example block of ``page``."""
    out = []
    for m in BLOCK.finditer(page.read_text()):
        lang = RUNNABLE.get(m["lang"].lower())
        if lang:
            out.append((lang, m["code"], m["reason"].strip() if m["reason"] else None))
    return out


def shrink(code: str) -> str:
    """Make every ``mtnlg train`` in a shell block tiny (see the module docstring)."""
    logical = code.replace("\\\n", " ")
    lines = []
    for line in logical.splitlines():
        if re.search(r"(^|\s)(mtnlg|-m mtnlg) train(\s|$)", line) and "--help" not in line:
            if "--config" not in line:
                line = re.sub(r"mtnlg train", "mtnlg train --config examples/tiny.yaml", line, count=1)
            if "--train.steps" not in line:
                line = line.rstrip().rstrip("&").rstrip() + " --train.steps=4" + (" &" if line.rstrip().endswith("&")
                                                                                  else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    for name in ("examples", "src"):
        (d / name).symlink_to(ROOT / name)
    return d


def test_every_page_has_runnable_examples():
    for page in PAGES:
        assert page.name == "cluster.md" or any(r is None for _, _, r in blocks(page)), page


def test_not_run_blocks_name_the_test_that_covers_them():
    for page in PAGES:
        for _, code, reason in blocks(page):
            if reason is not None:
                assert re.search(r"tests/\S+\.py", reason), f"{page.name}: '{reason}' names no test"
                assert (ROOT / re.search(r"tests/\S+\.py", reason)[0]).is_file(), reason


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page: Path, workdir: Path):
    env = dict(os.environ, MTNLG_CACHE=str(workdir / ".cache"), OMP_NUM_THREADS="1", MTNLG_LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT / "src"))
    for i, (lang, code, reason) in enumerate(blocks(page)):
        if reason is not None:
            continue
        if lang == "bash":
            argv = ["bash", "-euo", "pipefail", "-c", shrink(code)]
        else:
            script = workdir / f"_{page.stem}_{i}.py"
            script.write_text(code)
            argv = [sys.executable, str(script)]
        r = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=420,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (f"{page.name} block {i} ({lang}) failed with {r.returncode}:\n{code}\n"
                                   f"--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}")
