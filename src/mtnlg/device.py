"""The one place that decides device, dtype and distributed backend (cuda+nccl or cpu+gloo)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtnlg.errors import ConfigError


def pick_device(preference: str = "auto", option: str = "train.device") -> torch.device:
    """``auto`` -> the local CUDA device when there is one (LOCAL_RANK-aware), else CPU.

    ``option`` is where the user set ``preference``, named in errors: a config key (``train.device``,
    fixed with ``--train.device=cpu``) or a command-line option (``--device``, fixed with ``--device cpu``)."""
    flag = option.startswith("--")
    given = f"{option} {preference}" if flag else f"{option}='{preference}'"
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            fix = f"{option} cpu" if flag else f"--{option}=cpu"
            raise ConfigError(f"{given} but no CUDA device is visible; use {fix}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference != "auto":
        raise ConfigError(f"{given} is not one of ['auto', 'cpu', 'cuda']")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 compute on CUDA (fp32 master weights), fp32 on CPU where bf16 matmul is ~100x slower."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"train.precision='{precision}' is not one of ['auto', 'fp32', 'bf16']")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def inference_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels for inference, whose shapes change every call (each decode step's key
    length, each prompt's length). On CUDA this leaves out cuDNN's SDPA: it builds an execution plan
    per new shape, measured on an H200 (torch 2.11) at ~40 ms per new key length, which held batch-1
    decoding of a 1.1B model to 22 tokens/s, against 220 with flash / memory-efficient attention (their
    per-call cost is ~20-30 us at any length). Training (one shape) keeps torch's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# below this many elements ATen's own CPU GELU beats oneDNN's (see :func:`gelu`)
ONEDNN_GELU_MIN_ELEMENTS = 32768


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU on the faster CPU kernel for the tensor's size. PyTorch sends every fp32/bf16 CPU
    GELU to oneDNN, whose call costs ~10 us of set-up: at decode sizes (one row of the FFN, a few
    thousand elements) that is 4x ATen's own vectorized kernel (measured, AVX-512, 1,152 elements:
    13.4 vs 3.3 us; 33 us a call inside a decode step), a tenth of a small model's token, while on
    training-size tensors oneDNN is up to 2x faster (3.1M elements: 0.73 vs 1.73 ms). The two agree
    to ~1e-6. Small CPU tensors therefore run with oneDNN switched off for the one call (a global flag,
    read by the op as it dispatches); compiled code keeps its own fused GELU."""
    if (x.device.type != "cpu" or x.numel() >= ONEDNN_GELU_MIN_ELEMENTS or torch.compiler.is_compiling()
            or not torch.backends.mkldnn.enabled):
        return F.gelu(x)
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(x)
    finally:
        torch.backends.mkldnn.enabled = True


# glibc's allocator (see :func:`reuse_freed_memory`): blocks up to MMAP_THRESHOLD come from the heap,
# and up to TRIM_THRESHOLD of freed memory at its top stays with the process
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 512 << 20


def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` reuse freed blocks of up to 64 MiB instead of returning them to the
    kernel, for the rest of the process (``mallopt``; the role jemalloc or tcmalloc play in Intel's
    PyTorch CPU tuning guide). By default a block over 128 KiB (raised on the fly to at most 32 MiB) is
    mapped fresh and unmapped when freed, so every step of a CPU training run faults its logits,
    softmax and gradient buffers in again, page by page, each page zeroed by the kernel: measured on
    the default job (4 x 96, vocabulary 6,750, 1,024 tokens a step) 8,380 page faults a step, and its
    tokens/s went from 9,800-10,800 to 15,300-17,100 with them gone. The cost is that up to 512 MiB of
    freed memory stays with the process. A no-op (False) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only: musl has no such function
        if not libc.gnu_get_libc_version():
            return False
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold,
                                                                                       TRIM_THRESHOLD))


def flush_denormals() -> bool:
    """Flush denormal floats to zero on the CPU (FTZ/DAZ), as TensorFlow's thread pools and XLA's CPU
    code do by default. Training makes them: once an attention head saturates, the gradients that
    flow back through its softmax fall below 1.2e-38 (measured on the 6 x 384 benchmark model after
    ~15 steps: 300-400K of the 2.4M entries of one layer's QKV gradient), and every x86 matmul that
    reads them takes a microcode assist per value; that step took 1.5-1.9 s instead of 0.8. Values that
    small never change an fp32 result that matters (bf16 on GPUs has no denormals in practice).

    The flag is per thread and a thread inherits it when it is created, so it pays most set before the
    first parallel CPU operation of the process (then every intra-op thread has it); set later it covers
    the calling thread and threads created afterwards (measured: 1.1-1.4 s a step instead of 0.8).
    For a whole process (scripts); :func:`denormals_flushed` scopes it. Returns whether the CPU supports it."""
    return bool(torch.set_flush_denormal(True))


def _flushing() -> bool:
    """Whether this thread flushes denormals now (a denormal operand then counts as zero)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 2.0) == 0.0


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """:func:`flush_denormals` for the duration of a command or a training run (``mtnlg``'s command line
    and :func:`mtnlg.train.loop.train`), then the calling thread's previous mode again, so that code run
    after it in the same process (a test suite, a notebook) sees IEEE subnormals as before. Intra-op
    threads started inside keep flushing (the flag cannot be reset from here; harmless)."""
    before = _flushing()
    flush_denormals()
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)


SMALL_DECODE_BYTES = 16 << 20  # weights below this: a CPU decode step is per-operator overhead, not bandwidth


def decode_threads(model: torch.nn.Module) -> int:
    """Set (and return) the intra-op threads for decoding ``model`` in this process: one on the CPU for a
    model under :data:`SMALL_DECODE_BYTES`. Its decode step is hundreds of tiny operators, as fast on one
    thread as on two (the default job's 4 x 96 model: 0.33 ms a token either way), but with two, every
    parallel operator waits for both threads, and when another process keeps a core busy that wait is a
    scheduler slice: measured 48 ms a token instead of 0.4 beside a training job. Larger models keep the
    threads they have (a 10M-parameter model decodes 1.5x faster on two)."""
    params = list(model.parameters())
    small = sum(p.numel() * p.element_size() for p in params) < SMALL_DECODE_BYTES
    if params and params[0].device.type == "cpu" and small:
        torch.set_num_threads(1)
    return torch.get_num_threads()
