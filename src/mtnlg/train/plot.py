"""PNG plots of a run's ``metrics.jsonl``: ``loss.png`` (train / valid loss) and ``throughput.png``
(tokens/s and MFU, each on its own axes). Uses matplotlib's non-interactive Agg backend, so it works without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtnlg.errors import MtnlgError
from mtnlg.train.metrics import read_metrics


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    latest: dict[int, float] = {}
    for r in records:  # a resumed run may log a step twice; the later record wins
        if r.get("split", "train") == split and isinstance(r.get(key), (int, float)):
            latest[int(r["step"])] = float(r[key])
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``loss.png`` and ``throughput.png`` for ``run_dir`` (into ``out_dir``, default the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise MtnlgError(f"{path} does not exist; is {run} a run directory written by `mtnlg train`?")
    records = read_metrics(path)
    if not records:
        raise MtnlgError(f"{path} holds no metrics yet")
    out = Path(out_dir) if out_dir else run
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        steps, values = _series(records, split, "loss")
        if steps:
            ax.plot(steps, values, style, label=split, markersize=3)
    steps, values = _series(records, "test", "loss")
    if steps:
        ax.axhline(values[-1], color="gray", linestyle="--", label=f"test {values[-1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{run.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out / "loss.png")

    # tokens/s and MFU each on its own axes (one above the other, same steps), never drawn over each other
    msteps, mfu = _series(records, "train", "mfu")
    rows = 2 if msteps else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    ax = axes[0][0]
    steps, values = _series(records, "train", "tokens_per_s")
    ax.plot(steps, values, color="tab:blue")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{run.name}: throughput")
    ax.grid(alpha=0.3)
    if msteps:
        ax2 = axes[1][0]
        ax2.plot(msteps, [100 * m for m in mfu], color="tab:orange")
        ax2.set_ylabel("MFU (%)")
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out / "throughput.png")
    return written
