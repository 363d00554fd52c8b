"""A decode-time int8 matmul that reads weights at the memory's pace: ``y = (x @ q.T) * scales + bias``.

At batch 1 a weight-only int8 layer is a matrix-vector product bound by how fast the int8 weights
stream from memory. PyTorch's ``_weight_int8pack_mm`` (bf16 activations) reads them at 0.73-0.80 of
an fp32 buffer sum's bandwidth here: its inner loop widens each int8 to fp32 on one accumulator chain
per row, so a core computes slower than memory delivers, and at batch 2-32 it widens every weight
again for each row of activations. This kernel takes four weight rows at a time, each on its own
accumulators (two chains a row at batch 1), widens each weight vector once for up to four activation
rows, prefetches ahead, keeps the activations in fp32 (no bf16 rounding of ``x``) and hands the rows
to PyTorch's own OpenMP threads as they free up (a core slowed by a neighbour takes fewer). AVX-512,
AVX2+FMA, or a plain loop the compiler vectorizes. Measured on this 2-core VM: the spec's 6B layers
at 0.85-0.93 of the sum's bandwidth, 1.02-1.15x PyTorch's tokens/s on the whole 6B decode, 1.3-1.8x
its speed at 2-32 rows (``benchmarks/quantized_6b.py`` times both paths, alternating).

PyTorch ships no such kernel for the CPU, so this module compiles ~150 lines of C with the system C
compiler on first use (``-O3 -march=native -fopenmp``, well under a second) into the mtnlg cache
(``$MTNLG_CACHE/kernels``, keyed by the source, the flags and the CPU), and loads it with ``ctypes``.
The OpenMP runtime it links is the one PyTorch has already loaded (same ``libgomp.so.1``), so the
two share one thread pool. Without a compiler (or with ``MTNLG_INT8_KERNEL=0``) :func:`available`
is False and :class:`~mtnlg.model.quantize.Int8Linear` keeps PyTorch's kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 32  # activation rows (batch x tokens) it takes: measured faster than PyTorch's up to 32, even at 64+

SOURCE = r"""
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#define AHEAD 1024 /* bytes of each row prefetched ahead of the loads */

/* dot products of 4 int8 weight rows with one fp32 vector: two accumulator chains per row */
static void dot4(const int8_t *r0, const int8_t *r1, const int8_t *r2, const int8_t *r3,
                 const float *x, int64_t K, float out[4]) {
    int64_t k = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#if defined(__AVX512F__)
#define W16(r, o) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((r) + k + (o)))))
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (; k + 32 <= K; k += 32) {
        if ((k & 63) == 0) {
            _mm_prefetch((const char *)(r0 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r2 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r3 + k + AHEAD), _MM_HINT_T0);
        }
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        a0 = _mm512_fmadd_ps(W16(r0, 0), x0, a0); c0 = _mm512_fmadd_ps(W16(r0, 16), x1, c0);
        a1 = _mm512_fmadd_ps(W16(r1, 0), x0, a1); c1 = _mm512_fmadd_ps(W16(r1, 16), x1, c1);
        a2 = _mm512_fmadd_ps(W16(r2, 0), x0, a2); c2 = _mm512_fmadd_ps(W16(r2, 16), x1, c2);
        a3 = _mm512_fmadd_ps(W16(r3, 0), x0, a3); c3 = _mm512_fmadd_ps(W16(r3, 16), x1, c3);
    }
    for (; k + 16 <= K; k += 16) {
        __m512 x0 = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(W16(r0, 0), x0, a0); a1 = _mm512_fmadd_ps(W16(r1, 0), x0, a1);
        a2 = _mm512_fmadd_ps(W16(r2, 0), x0, a2); a3 = _mm512_fmadd_ps(W16(r3, 0), x0, a3);
    }
    s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, c0)); s1 = _mm512_reduce_add_ps(_mm512_add_ps(a1, c1));
    s2 = _mm512_reduce_add_ps(_mm512_add_ps(a2, c2)); s3 = _mm512_reduce_add_ps(_mm512_add_ps(a3, c3));
#elif defined(__AVX2__) && defined(__FMA__)
#define W8(r, o) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((r) + k + (o)))))
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (; k + 16 <= K; k += 16) {
        if ((k & 63) == 0) {
            _mm_prefetch((const char *)(r0 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r2 + k + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r3 + k + AHEAD), _MM_HINT_T0);
        }
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(W8(r0, 0), x0, a0); c0 = _mm256_fmadd_ps(W8(r0, 8), x1, c0);
        a1 = _mm256_fmadd_ps(W8(r1, 0), x0, a1); c1 = _mm256_fmadd_ps(W8(r1, 8), x1, c1);
        a2 = _mm256_fmadd_ps(W8(r2, 0), x0, a2); c2 = _mm256_fmadd_ps(W8(r2, 8), x1, c2);
        a3 = _mm256_fmadd_ps(W8(r3, 0), x0, a3); c3 = _mm256_fmadd_ps(W8(r3, 8), x1, c3);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(a0, c0)); for (int i = 0; i < 8; ++i) s0 += t[i];
    _mm256_storeu_ps(t, _mm256_add_ps(a1, c1)); for (int i = 0; i < 8; ++i) s1 += t[i];
    _mm256_storeu_ps(t, _mm256_add_ps(a2, c2)); for (int i = 0; i < 8; ++i) s2 += t[i];
    _mm256_storeu_ps(t, _mm256_add_ps(a3, c3)); for (int i = 0; i < 8; ++i) s3 += t[i];
#endif
    for (; k < K; ++k) {
        float xv = x[k];
        s0 += r0[k] * xv; s1 += r1[k] * xv; s2 += r2[k] * xv; s3 += r3[k] * xv;
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* the same for mm (1-4) activation rows at once: each weight vector is widened once for all of them */
static inline __attribute__((always_inline)) void dot4xm(const int8_t *const r[4], const float *x, int64_t K,
                                                        const int mm, float out[4][4]) {
    int64_t k = 0;
    for (int i = 0; i < 4; ++i) for (int j = 0; j < 4; ++j) out[i][j] = 0.f;
#if defined(__AVX512F__)
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < mm; ++j) acc[i][j] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 w[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) w[i] = W16(r[i], 0);
#pragma GCC unroll 4
        for (int j = 0; j < mm; ++j) {
            __m512 xv = _mm512_loadu_ps(x + j * K + k);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], xv, acc[i][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < mm; ++j) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < mm; ++j) acc[i][j] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 w[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) w[i] = W8(r[i], 0);
#pragma GCC unroll 4
        for (int j = 0; j < mm; ++j) {
            __m256 xv = _mm256_loadu_ps(x + j * K + k);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) acc[i][j] = _mm256_fmadd_ps(w[i], xv, acc[i][j]);
        }
    }
    float t[8];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < mm; ++j) {
            _mm256_storeu_ps(t, acc[i][j]);
            for (int l = 0; l < 8; ++l) out[i][j] += t[l];
        }
#endif
    for (; k < K; ++k)
        for (int j = 0; j < mm; ++j) {
            float xv = x[j * K + k];
            for (int i = 0; i < 4; ++i) out[i][j] += r[i][k] * xv;
        }
}

/* y[m, n] = (sum_k q[n, k] x[m, k]) * scale[n] + bias[n]. Blocks of 4 rows of q are handed to the
   threads 16 at a time as they finish (dynamic: a core slowed by a neighbour takes fewer). */
void mtnlg_int8_gemv(const int8_t *q, const float *scale, const float *x, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 16) if (threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t n = 4 * b;
        const int8_t *r[4];
        for (int i = 0; i < 4; ++i) r[i] = q + (n + i < N ? n + i : n) * K;
        if (M == 1) {
            float out[4];
            dot4(r[0], r[1], r[2], r[3], x, K, out);
            for (int i = 0; i < 4 && n + i < N; ++i) y[n + i] = out[i] * scale[n + i] + (bias ? bias[n + i] : 0.f);
            continue;
        }
        for (int64_t m = 0; m < M; m += 4) {
            float out[4][4];
            int mm = M - m < 4 ? (int)(M - m) : 4;
            switch (mm) {  /* constant row counts, so the accumulators stay in registers */
                case 1: dot4xm(r, x + m * K, K, 1, out); break;
                case 2: dot4xm(r, x + m * K, K, 2, out); break;
                case 3: dot4xm(r, x + m * K, K, 3, out); break;
                default: dot4xm(r, x + m * K, K, 4, out); break;
            }
            for (int j = 0; j < mm; ++j)
                for (int i = 0; i < 4 && n + i < N; ++i)
                    y[(m + j) * N + n + i] = out[i][j] * scale[n + i] + (bias ? bias[n + i] : 0.f);
        }
    }
}
"""

_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("MTNLG_CACHE") or Path.home() / ".cache" / "mtnlg") / "kernels"


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags (a shared home directory may
    be read by machines of several kinds)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compile(cc: str) -> Path | None:
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), _cpu_key(), cc]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"int8_gemv-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "int8_gemv.c", Path(tmp) / "int8_gemv.so"
            src.write_text(SOURCE)
            try:
                proc = subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(out)],
                                      capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                log.info("int8 kernel: %s %s failed (%s)", cc, " ".join(flags), e)
                continue
            if proc.returncode != 0:
                log.info("int8 kernel: %s %s failed: %s", cc, " ".join(flags), proc.stderr.strip()[-300:])
                continue
            os.replace(out, target)  # atomic: a concurrent process loads a whole file or compiles its own
        return target
    return None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MTNLG_INT8_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("int8 kernel: no C compiler on PATH; int8 layers use PyTorch's _weight_int8pack_mm")
        return None
    try:
        path = _compile(cc)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.info("int8 kernel: could not build or load (%s); int8 layers use PyTorch's kernel", e)
        return None
    fn = lib.mtnlg_int8_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernel is built and switched on (:func:`set_enabled`)."""
    return bool(_state.get("enabled", True)) and _lib() is not None


def set_enabled(flag: bool) -> bool:
    """Switch the kernel on or off for this process (benchmarks compare both paths); returns the old value."""
    old = bool(_state.get("enabled", True))
    _state["enabled"] = flag
    return old


def applies(x: torch.Tensor, rows: int) -> bool:
    """Whether :func:`int8_gemv` takes these activations: fp32 on the CPU, at most :data:`MAX_ROWS` rows,
    outside autograd and torch.compile tracing (an opaque C call neither can see through)."""
    return (rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and available())


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] fp32 -> [M, N]``: ``(x @ qweight.T) * scales + bias`` (per-output-channel scales)."""
    lib = _lib()
    assert lib is not None, "int8_gemv called without the kernel; check applies() first"
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.mtnlg_int8_gemv(qweight.data_ptr(), scales.data_ptr(), x.data_ptr(),
                        None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k,
                        torch.get_num_threads())
    return y
