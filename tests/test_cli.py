import json
import subprocess
import sys

import torch

from mtnlg.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "mtnlg", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "config" in r.stdout and "usage: mtnlg" in r.stdout


def test_unknown_command_exits_2():
    r = run("cofnig")
    assert r.returncode == 2 and "did you mean 'config'" in r.stderr


def test_config_command_json_and_overrides(capsys):
    assert main(["config", "--json", "--model.num_layers=2", "--train.steps", "7"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["model"]["num_layers"] == 2 and data["config"]["train"]["steps"] == 7
    assert data["params"] > 0


def test_bad_override_is_one_line_exit_2():
    r = run("config", "--model.num_layer=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown key 'model.num_layer'" in r.stderr and "did you mean 'model.num_layers'" in r.stderr
    r = run("config", "--train.lr=fast")
    assert r.returncode == 2 and "train.lr: expected float" in r.stderr


def test_overrides_that_cannot_act_are_refused_in_one_line(capsys):
    """A dotted option on a command that reads no config was silently ignored (plan planned at seq 512
    after --seq.len=4096), and so were model.* overrides next to --checkpoint."""
    for argv, words in [(["plan", "--model", "seed-6b", "--gpus", "8", "--seq.len=4096"],
                         ["--seq.len", "no --section.key=value", "did you mean '--seq-len'"]),
                        (["tokenizer", "train", "--corpus", "poems", "--vocab.size=600", "--output", "x"],
                         ["did you mean '--vocab-size'"]),
                        (["generate", "--checkpoint", "nowhere", "--prompt", "a", "--model.num_layers=2"],
                         ["--model.num_layers", "architecture comes from --checkpoint"])]:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and all(w in err for w in words), err
    assert main(["config", "--json", "--model.num_layers=2"]) == 0  # where a config is read, they act


def test_denormals_are_flushed_for_every_intra_op_thread():
    """FTZ/DAZ set before the first parallel op reaches every intra-op thread: a denormal operand of a
    multi-threaded matmul counts as zero (mtnlg.device.flush_denormals). In a fresh process, as the
    command line runs."""
    code = ("import torch\nfrom mtnlg.device import flush_denormals\nassert flush_denormals()\n"
            "torch.set_num_threads(2)\n"
            "a = torch.full((256, 256), 1e-39)\nb = torch.full((256, 256), 1e30)\n"
            "print(float((a @ b).abs().max()), float((torch.tensor([1e-39]) * 1e30).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0.0", "0.0"]
    plain = subprocess.run([sys.executable, "-c", code.replace("assert flush_denormals()\n", "")],
                           capture_output=True, text=True, check=True).stdout.split()
    assert float(plain[1]) > 0  # without it the same product is not zero: the test can fail


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    """By default glibc hands large freed blocks back to the kernel, so every training step faulted its
    logits and gradient buffers in again page by page; after mtnlg.device.reuse_freed_memory (the
    command line and train() call it) a steady loop reuses them. In fresh processes: a loss step over
    1,024 tokens of 96 hidden units (the default job's) and 9,000 vocabulary entries, page faults counted
    after warm-up."""
    import platform

    import pytest

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = ("import resource, torch\nfrom mtnlg.device import reuse_freed_memory\n{setup}\n"
            "h = torch.randn(1024, 96, requires_grad=True)\nw = torch.randn(9000, 96, requires_grad=True)\n"
            "y = torch.randint(0, 9000, (1024,))\n"
            "def step():\n    torch.nn.functional.cross_entropy(h @ w.t(), y).backward()\n"
            "for _ in range(5):\n    step()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5):\n    step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")

    def faults(setup: str) -> int:
        return int(subprocess.run([sys.executable, "-c", code.format(setup=setup)], capture_output=True,
                                  text=True, check=True).stdout)

    reused, fresh = faults("assert reuse_freed_memory()"), faults("")
    # 36 MB buffers: over glibc's 32 MiB ceiling for heap blocks, so without it every step maps them fresh
    # (measured 180K faults in 5 steps, 0 reused with 2 threads and 18K with 1)
    assert fresh > 50_000
    assert reused < fresh / 4


def test_a_command_flushes_denormals_while_it_runs_and_restores_the_mode(capsys):
    """In-process (a notebook, a test suite): the command runs with denormals flushed, and afterwards the
    thread sees IEEE subnormals again (hypothesis, numpy and user code rely on them)."""
    from mtnlg.device import _flushing, denormals_flushed

    assert not _flushing()
    with denormals_flushed():
        assert _flushing()
    assert not _flushing()
    assert main(["config", "--model.num_layers=2"]) == 0
    capsys.readouterr()
    assert not _flushing() and float(torch.tensor([1e-39]) * 2.0) > 0
