"""Draw a simulated pipeline schedule (:mod:`mtnlg.plan.schedule`) as a PNG: ranks against time.

Forward ops are blue, backward (full or input-gradient) orange, weight-gradient (zero bubble) green,
a rank's later virtual stages (interleaved, ZB-V) lighter, labels are microbatch indices, and idle
time is hatched grey; the title states the measured bubble fraction next to the closed form.
"""

from __future__ import annotations

from pathlib import Path

from mtnlg.errors import ConfigError
from mtnlg.plan.schedule import Timeline, bubble_fraction, simulate

COLOURS = {"F": "#4C72B0", "B": "#DD8452", "I": "#DD8452", "W": "#55A868"}
TITLES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved 1F1B", "zb": "zero bubble (ZB-V)"}


def closed_form_label(schedule: str, pp: int, microbatches: int, vpp: int) -> str:
    if schedule in ("gpipe", "1f1b"):
        return f"(p-1)/(m+p-1) = {bubble_fraction(schedule, pp, microbatches, vpp):.4f}"
    if schedule == "interleaved":
        return f"((p-1)/v)/(m+(p-1)/v) = {bubble_fraction(schedule, pp, microbatches, vpp):.4f}"
    return "no closed form"


def draw(timeline: Timeline, output: str | Path) -> Path:
    """Write ``timeline`` to ``output`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tl = timeline
    width = min(40.0, max(8.0, 0.25 * tl.makespan + 2))
    fig, ax = plt.subplots(figsize=(width, 0.6 * tl.pp + 1.8))
    px_per_unit = (width - 2) * 100 / tl.makespan  # roughly: the axes span the figure less ~2 inches
    for op in tl.ops:
        chunk = op.stage // tl.pp  # virtual stage of this rank: 0 or 1.. (lighter shades)
        ax.barh(op.rank, op.end - op.start, left=op.start, height=0.8, color=COLOURS[op.kind],
                alpha=1.0 if chunk == 0 else 0.6, edgecolor="black", linewidth=0.4)
        if (op.end - op.start) * px_per_unit >= 8 * len(str(op.microbatch)) + 2:
            ax.text((op.start + op.end) / 2, op.rank, str(op.microbatch), ha="center", va="center", fontsize=6,
                    color="white")
    for rank, gaps in tl.idle_intervals().items():
        for start, end in gaps:
            ax.barh(rank, end - start, left=start, height=0.8, color="#DDDDDD", hatch="//", edgecolor="#999999",
                    linewidth=0.3)
    ax.set_yticks(range(tl.pp), [f"rank {r}" for r in range(tl.pp)])
    ax.invert_yaxis()
    ax.set_xlim(0, tl.makespan)
    ax.set_xlabel("time (forward pass of one stage = 1)")
    kinds = {op.kind for op in tl.ops}
    handles = [Patch(color=COLOURS["F"], label="forward")]
    handles.append(Patch(color=COLOURS["B"], label="backward (input grad)" if "I" in kinds else "backward"))
    if "W" in kinds:
        handles.append(Patch(color=COLOURS["W"], label="backward (weight grad)"))
    if any(op.stage >= tl.pp for op in tl.ops):
        handles.append(Patch(color=COLOURS["F"], alpha=0.6, label="lighter: later virtual stage"))
    handles.append(Patch(facecolor="#DDDDDD", hatch="//", edgecolor="#999999", label="bubble (idle)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(handles), fontsize=8)
    v = f", v={tl.vpp}" if tl.schedule == "interleaved" else ""
    ax.set_title(f"{TITLES[tl.schedule]}: p={tl.pp}, m={tl.microbatches}{v} — bubble {tl.bubble_fraction:.4f} "
                 f"measured, {closed_form_label(tl.schedule, tl.pp, tl.microbatches, tl.vpp)}")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


MAX_DRAWN = 8192  # pipeline operations in one picture


def draw_schedule(schedule: str, pp: int, microbatches: int, vpp: int, output: str | Path) -> Timeline:
    """Simulate ``schedule`` and draw it; returns the simulated timeline."""
    if pp * microbatches * vpp > MAX_DRAWN:  # matplotlib draws ~400 boxes a second, and more are unreadable
        raise ConfigError(f"--pp x --microbatches x --vpp = {pp * microbatches * vpp} is more than the {MAX_DRAWN} "
                          f"operations one picture draws; lower --microbatches (the bubble fraction's closed "
                          f"form holds for any m)")
    tl = simulate(schedule, pp, microbatches, vpp)
    draw(tl, output)
    return tl
