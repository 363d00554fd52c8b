"""Local SGD (``sync_every > 1``, sync and ``outer_async``) stops and resumes exactly: 2 gloo ranks as 2
replicas, a tiny GPT, N steps straight vs k steps + checkpoint + a fresh engine resumed to N.

Bit-exact (``==`` on the loss floats): the resumed run does the same float operations in the same order
on the same values (the in-flight async average is waited for at save time; its value, not its timing,
is what the next sync point applies)."""

from __future__ import annotations

from tests.parallel.harness import spawn, tiny_config
from tests.parallel.layouts import train_local_sgd

N = 7


def _cases(root: str) -> dict[str, list[list[float]]]:
    from pathlib import Path

    out = {}
    for every, overlap, k in ((2, False, 3), (3, False, 4), (2, True, 4), (3, True, 5)):
        cfg = tiny_config(dp_replicate=2, dp_shard=1, sync_every=every, outer_async=overlap,
                          outer_lr=0.7, outer_momentum=0.9)
        d = Path(root) / f"{every}-{overlap}"
        straight = train_local_sgd(cfg, range(N), d, save_at=k, resume=False)
        resumed = train_local_sgd(cfg, range(k, N), d, save_at=None, resume=True)
        out[f"{every}-{overlap}-{k}"] = [straight, resumed]
    return out


def test_local_sgd_resume_continues_the_loss_curve_exactly(tmp_path):
    out = spawn(2, _cases, str(tmp_path))
    for case, (straight, resumed) in out[0].items():
        k = int(case.rsplit("-", 1)[1])
        assert resumed == straight[k:], case  # bit-exact
    assert out[0] == out[1]  # losses are global: every rank reports the same
