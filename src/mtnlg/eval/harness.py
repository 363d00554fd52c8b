"""``mtnlg eval --harness ...``: lm-evaluation-harness's own CLI with the ``mtnlg`` model and mtnlg's local tasks.

::

    mtnlg eval --checkpoint RUN --harness --tasks mtnlg_poem_cloze,mtnlg_lambada_poems --limit 50
      == lm_eval --model mtnlg --model_args checkpoint=RUN --include_path <mtnlg>/eval/tasks --tasks ...

Everything after ``--harness`` is passed to lm-eval unchanged; ``--model mtnlg``,
``--model_args checkpoint=...`` (from ``--checkpoint``) and ``--include_path`` (mtnlg's tasks) are
added when absent. The local tasks need no download (see :mod:`mtnlg.eval.tasks`).
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _has(argv: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def harness_argv(argv: list[str], checkpoint: str | None = None) -> list[str]:
    """lm-eval's argv with mtnlg's defaults filled in."""
    out = list(argv)
    if not _has(out, "--model", "-M"):
        out = ["--model", "mtnlg", *out]
    if checkpoint and not _has(out, "--model_args", "-a"):
        out += ["--model_args", f"checkpoint={checkpoint}"]
    if not _has(out, "--include_path"):
        out += ["--include_path", str(TASKS_DIR)]
    return out


def run_harness(argv: list[str], checkpoint: str | None = None) -> int:
    """Run lm-eval's CLI in this process after registering the ``mtnlg`` model; returns its exit status."""
    import mtnlg.eval.lm_eval_adapter  # noqa: F401  (registers "mtnlg")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *harness_argv(argv, checkpoint)]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse errors and lm-eval's own exits
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def evaluate_tasks(checkpoint: str, tasks: list[str], limit: int | float | None = None, batch_size: int = 8,
                   device: str | None = None, include_defaults: bool = False, **kwargs) -> dict:
    """lm-eval's ``simple_evaluate`` on ``checkpoint`` with mtnlg's local tasks; returns its results dict.

    ``include_defaults=False`` indexes only mtnlg's tasks (lm-eval's ~14k built-in task files take
    most of a CLI run's start-up); set it to True to mix in lm-eval's own (downloadable) tasks.
    """
    import mtnlg.eval.lm_eval_adapter  # noqa: F401  (registers "mtnlg")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return simple_evaluate(model="mtnlg", model_args={"checkpoint": str(checkpoint)}, tasks=list(tasks),
                           limit=limit, batch_size=batch_size, device=device, task_manager=manager, **kwargs)
