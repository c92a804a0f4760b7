"""Devices: cuda, xpu, hpu (Intel Gaudi) or cpu, and what each needs around a tuning step.

Gaudi support is optional: `habana_frameworks.torch` is imported only when it is importable, and
only when an HPU is asked for or auto-detected. In lazy mode Gaudi builds a graph until
`habana_frameworks.torch.core.mark_step()`; `Accelerator.after_step` calls it after every
optimizer step (tune_block's `after_step`) and after every evaluation batch.

What is verified here without a Gaudi: with a stand-in `habana_frameworks.torch.core` module,
device selection returns `hpu`, autocast is bf16, and mark_step is called once per tuning step
(tests/test_device.py). What is NOT verified: real HPU kernels, lazy-mode graph sizes and
recompilation, HPU memory statistics, numerical parity with CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch


def _habana_core() -> Any:
    """`habana_frameworks.torch.core` if it can be imported, else None (never a hard dependency)."""
    try:
        if "habana_frameworks" not in sys.modules and importlib.util.find_spec("habana_frameworks") is None:
            return None
        return importlib.import_module("habana_frameworks.torch.core")
    except ImportError:
        return None


def hpu_available() -> bool:
    core = _habana_core()
    if core is None:
        return False
    try:
        hpu = importlib.import_module("habana_frameworks.torch.hpu")
        return bool(hpu.is_available())
    except (ImportError, AttributeError):
        return True


def default_device() -> torch.device:
    """The first available of cuda, xpu, hpu, cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if hpu_available():
        return torch.device("hpu")
    return torch.device("cpu")


#: elements per slice of `all_finite`: torch.isfinite builds 5 (bf16) to 7 (fp32) bytes of temporaries
#: per element (x == x, |x|, |x| != inf): 5 GiB over one 128 × 2048 × 4096 set of cached activations
FINITE_SLICE = 1 << 22


def all_finite(t: torch.Tensor) -> bool:
    """`bool(torch.isfinite(t).all())` (True for integer tensors), checked FINITE_SLICE elements at a
    time along the first dimension so its temporaries stay a few tens of MiB; one host sync."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.dim() == 0 or t.numel() <= FINITE_SLICE:
        return bool(torch.isfinite(t).all())
    step = max(1, FINITE_SLICE // max(1, t.numel() // t.shape[0]))
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for start in range(0, t.shape[0], step):
        ok &= torch.isfinite(t[start:start + step]).all()
    return bool(ok)


@attrs.frozen
class Accelerator:
    """Where tuning runs and what goes with it.

    device: compute device. store_device: where cached block inputs/targets live; on CUDA the
    host by default, in pinned memory, with each step's rows copied ahead of use on a side stream
    (see `CACHE_PLACES`). autocast_dtype: bf16 on accelerators with amp, None (fp32) on the CPU.
    cache_dtype: dtype of cached hidden states. after_step: called at every step boundary (HPU
    mark_step), or None. cache_dir: the cache lives in memory-mapped files in this directory
    (placement "disk"; store_device is then the CPU), or None.
    """

    device: torch.device
    store_device: torch.device
    autocast_dtype: Optional[torch.dtype] = None
    cache_dtype: Optional[torch.dtype] = None
    after_step: Optional[Callable[[], None]] = None
    cache_dir: Optional[Path] = None

    @property
    def is_accelerator(self) -> bool:
        return self.device.type != "cpu"

    @property
    def pinned_cache(self) -> bool:
        """The cache lives in page-locked host memory, so rows reach the GPU by asynchronous DMA."""
        return self.store_device.type == "cpu" and self.device.type == "cuda" and self.cache_dir is None

    def empty_cache(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised cache tensor where the cache lives (pinned when on the host for CUDA,
        memory-mapped from a file with a disk cache)."""
        if self.cache_dir is not None:
            return mapped_empty(shape, dtype, self.cache_dir)
        return torch.empty(shape, dtype=dtype, device=self.store_device, pin_memory=self.pinned_cache)


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype, directory: Path) -> torch.Tensor:
    """An uninitialised CPU tensor backed by a new file in `directory` (a shared mapping: its pages
    are the kernel's page cache, written back to the file under memory pressure rather than held as
    process memory). The file is unlinked at once, so its space returns when the tensor is freed,
    whatever way the process ends."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="signround-cache-", suffix=".bin", dir=directory)
    os.close(fd)
    try:
        raw = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        os.unlink(name)
    return raw.view(dtype).view(shape)


#: where the activation cache may live: "auto" (the host for CUDA, where pinned rows stream to the
#: GPU ahead of use at little cost; the device elsewhere), "device", "host", "disk" (memory-mapped
#: files, for caches larger than RAM; rows are read from the page cache or the disk at each step)
CACHE_PLACES = ("auto", "device", "host", "disk")


def resolve(device: torch.device | str | None = None, *, amp: bool = True,
            low_gpu_mem_usage: bool = False, cache: str = "auto",
            cache_dir: str | os.PathLike | None = None) -> Accelerator:
    """An Accelerator for `device` ("cuda", "cuda:1", "xpu", "hpu", "cpu", or None = auto).

    cache: see `CACHE_PLACES`; low_gpu_mem_usage=True means "host". cache_dir: where a "disk"
    cache's files go (default: the system's temporary directory)."""
    if cache not in CACHE_PLACES:
        raise ValueError(f"cache placement must be one of {CACHE_PLACES}, got {cache!r}")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "hpu" and _habana_core() is None:
        raise RuntimeError("device 'hpu' needs habana_frameworks.torch (Intel Gaudi software stack), "
                           "which is not importable here")
    accel = dev.type != "cpu"
    after_step = None
    if dev.type == "hpu":
        core = _habana_core()
        after_step = core.mark_step
    dtype = torch.bfloat16 if (accel and amp) else None
    disk = cache == "disk"
    host = disk or low_gpu_mem_usage or cache == "host" or (cache == "auto" and dev.type == "cuda")
    store = torch.device("cpu") if host else dev
    folder = Path(cache_dir if cache_dir is not None else tempfile.gettempdir()) if disk else None
    return Accelerator(device=dev, store_device=store, autocast_dtype=dtype, cache_dtype=dtype, after_step=after_step,
                       cache_dir=folder)


def release_host_memory() -> None:
    """Give freed heap memory back to the system (glibc's `malloc_trim`; nothing elsewhere). glibc
    keeps freed blocks of up to 32 MiB in its heap for reuse, so a streamed run that frees a block
    would otherwise hold on to the memory of the largest blocks it has seen."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError where it is not glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
#: glibc's mallopt parameters and the values a streamed run sets (see `bound_host_heap`)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 256 * 2**10


def bound_host_heap() -> None:
    """For a run whose RAM must stay near what it holds (streaming from disk): allocations of
    `HEAP_MMAP_THRESHOLD` and more get pages of their own that go back to the system when freed.
    glibc otherwise raises that threshold to the largest block freed so far (up to 32 MiB) and keeps
    what is freed below it, which on the CPU held twice the tuning's live memory (spec/performance.md).
    Process-wide and kept after the run; nothing outside glibc."""
    release_host_memory()
    if _LIBC:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 4 * HEAP_MMAP_THRESHOLD)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes, what was measured): device allocator peak on cuda/xpu/hpu, process peak RSS on cpu."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    if device.type == "xpu":
        return int(torch.xpu.max_memory_allocated(device)), "xpu max_memory_allocated"
    if device.type == "hpu":
        try:
            hpu = importlib.import_module("habana_frameworks.torch.hpu")
            return int(hpu.max_memory_allocated()), "hpu max_memory_allocated"
        except (ImportError, AttributeError):
            return None, "hpu (unavailable)"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"
