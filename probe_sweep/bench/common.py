"""What every section shares: the table row, progress lines, timing, the machine, the job's
typed config and disk space. Real jobs in their own process: ``runs.py``."""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
STARTED = time.perf_counter()


@dataclass
class Row:
    section: str
    measure: str
    ours: str
    reference: str
    ratio: str
    target: str
    verdict: str


def ok(passed: bool) -> str:
    return "meets" if passed else "MISSES"


def progress(message: str) -> None:
    """One line on stderr as the bench goes (the table comes at the end)."""
    print(f"[bench {time.perf_counter() - STARTED:7.0f} s] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matmul on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the embedding tables, plus the
    output head when the model has one (it runs in every forward pass, even when tied)."""
    embedded = {
        id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    total = sum(p.numel() for p in module.parameters() if id(p) not in embedded)
    head = module.get_output_embeddings()
    if head is not None and id(head.weight) in embedded:
        total += head.weight.numel()
    return total


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    blas = "?"
    try:
        from threadpoolctl import threadpool_info

        kernels = {
            f"{i['internal_api']} {i.get('architecture') or ''}".strip()
            for i in threadpool_info()
            if i["user_api"] == "blas"
        }
        blas = ", ".join(sorted(kernels))
    except ImportError:
        pass
    core = os.environ.get("OPENBLAS_CORETYPE")
    load = "?"
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min, at the end)"
    except OSError:
        pass
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {mem}",
        "gpu": gpu,
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "numpy BLAS": blas + (f" (OPENBLAS_CORETYPE={core} forced)" if core else ""),
        "load average": load,
    }


def disk_bytes(path: Path) -> int:
    """Bytes a file or directory tree takes on disk (allocated blocks, not apparent sizes)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
