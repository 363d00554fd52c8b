"""The accelerator table the planner prices layouts with: peak dense FLOP/s, memory and link bandwidths.

Numbers are the vendors' data-sheet values (dense, no sparsity) for the SXM parts in DGX/HGX nodes:
NVLink bandwidth is per GPU and per direction (A100: 600 GB/s bidirectional -> 300 GB/s); InfiniBand is
per GPU and per direction for a node with one NIC per GPU (DGX A100: 8 x HDR 200 Gb/s -> 25 GB/s;
DGX H100/H200: 8 x NDR 400 Gb/s -> 50 GB/s). Memory is what ``nvidia-smi`` reports (MiB).
``cpu`` is a placeholder (fp32 training, a modest peak); pass the measured peak for real estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtnlg.errors import ConfigError, did_you_mean

GB = 1e9
MiB = 2**20


@dataclass(frozen=True)
class GPU:
    """One accelerator type."""

    name: str
    peak_flops: float  # dense FLOP/s in the training dtype (bf16 on GPUs, fp32 on CPU)
    memory_bytes: float
    nvlink_bw: float  # bytes/s per GPU per direction inside a node
    ib_bw: float  # bytes/s per GPU per direction between nodes
    hbm_bw: float = 2039 * GB  # memory bandwidth, bytes/s (data sheet)
    dtype_bytes: int = 2  # bytes of a weight / activation in the compute dtype
    mixed_precision: bool = True  # True: bf16 weights + fp32 master copy in the optimizer


GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 312e12, 40960 * MiB, 300 * GB, 25 * GB, 1555 * GB),
    "a100-80gb": GPU("a100-80gb", 312e12, 81920 * MiB, 300 * GB, 25 * GB, 2039 * GB),
    "h100-80gb": GPU("h100-80gb", 989e12, 81559 * MiB, 450 * GB, 50 * GB, 3350 * GB),
    "h200": GPU("h200", 989e12, 143771 * MiB, 450 * GB, 50 * GB, 4800 * GB),
    # fp32 on CPU: "NVLink" stands for shared memory, "IB" for a 10 Gb/s-class network.
    "cpu": GPU("cpu", 1e11, 64 * 2**30, 10 * GB, 1.25 * GB, 20 * GB, dtype_bytes=4, mixed_precision=False),
}


def get_gpu(name: str, peak_tflops: float | None = None, memory_gb: float | None = None) -> GPU:
    """The table entry for ``name``, optionally with the peak (TFLOP/s) or memory (GB) overridden."""
    if name not in GPUS:
        raise ConfigError(f"--gpu '{name}' is not known; use one of {list(GPUS)}" + did_you_mean(name, GPUS))
    gpu = GPUS[name]
    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {peak_tflops}")
        gpu = replace(gpu, peak_flops=peak_tflops * 1e12)
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ConfigError(f"--memory-gb must be > 0, got {memory_gb}")
        gpu = replace(gpu, memory_bytes=memory_gb * GB)
    return gpu
