"""The Slurm example is at least valid bash and launches torchrun the way docs/cluster.md describes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train.sbatch"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_sbatch_script_parses_with_bash_n():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_script_uses_c10d_rendezvous_and_restarts():
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/bash")
    assert "#SBATCH --ntasks-per-node=1" in text  # one torchrun per node
    for needle in ("--rdzv-backend c10d", "--rdzv-endpoint", "--max-restarts", "-m mtnlg train",
                   "--checkpoint.resume=auto", "NCCL_SOCKET_IFNAME", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert needle in text, needle
