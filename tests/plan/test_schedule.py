"""Pipeline schedules: torch's op orders, their simulated bubble, and the timeline PNG."""

from __future__ import annotations

import struct
from collections import Counter

import matplotlib.image as mpimg
import pytest

from mtnlg.errors import ConfigError
from mtnlg.plan.schedule import bubble_fraction, pipeline_order, simulate
from mtnlg.plan.timeline import draw_schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule,pp,m,vpp", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 3, 3, 1),
                                               ("interleaved", 4, 8, 2), ("zb", 4, 8, 2)])
def test_every_op_once(schedule, pp, m, vpp):
    order = pipeline_order(schedule, pp, m, vpp)
    chunks = 2 if schedule == "zb" else vpp
    ops = Counter(op for rank_ops in order.values() for op in rank_ops)
    kinds = ("F", "I", "W") if schedule == "zb" else ("F", "B")
    expected = {(stage, kind, mb) for stage in range(pp * chunks) for kind in kinds for mb in range(m)}
    assert set(ops) == expected and set(ops.values()) == {1}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp,m", [(2, 2), (4, 4), (4, 8), (8, 8), (8, 32), (3, 7)])
def test_bubble_equals_closed_form(schedule, pp, m):
    tl = simulate(schedule, pp, m)
    assert tl.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert tl.makespan == pytest.approx(3 * (m + pp - 1))  # F = 1, B = 2
    assert bubble_fraction(schedule, pp, m) == pytest.approx(tl.bubble_fraction)


@pytest.mark.parametrize("pp,m,vpp", [(4, 8, 2), (4, 16, 4), (2, 4, 3), (8, 16, 2)])
def test_interleaved_bubble(pp, m, vpp):
    tl = simulate("interleaved", pp, m, vpp)
    closed = ((pp - 1) / vpp) / (m + (pp - 1) / vpp)
    assert tl.bubble_fraction == pytest.approx(closed, abs=1e-9)
    assert tl.bubble_fraction < simulate("1f1b", pp, m).bubble_fraction


def test_zero_bubble_is_smaller_and_shrinks():
    small, large = simulate("zb", 4, 8, 2).bubble_fraction, simulate("zb", 4, 32, 2).bubble_fraction
    assert 0 <= large < small < bubble_fraction("1f1b", 4, 8)
    assert bubble_fraction("zb", 4, 32) == pytest.approx(large)


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="vpp"):
        pipeline_order("interleaved", 4, 8, 1)
    with pytest.raises(ConfigError, match="microbatches"):
        pipeline_order("1f1b", 4, 2, 1)
    with pytest.raises(ConfigError, match="schedule"):
        pipeline_order("pipedream", 4, 8, 1)


@pytest.mark.parametrize("schedule,pp,m", [("gpipe", 4, 6), ("1f1b", 4, 8)])
def test_timeline_png(tmp_path, schedule, pp, m):
    out = tmp_path / f"{schedule}.png"
    tl = draw_schedule(schedule, pp, m, 1, out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    image = mpimg.imread(out)
    assert image.shape[:2] == (height, width) and width > 400 and height > 150
    assert tl.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    # the idle intervals drawn are exactly the bubble
    idle = sum(end - start for gaps in tl.idle_intervals().values() for start, end in gaps)
    assert idle / (pp * tl.makespan) == pytest.approx(tl.bubble_fraction, abs=1e-12)
