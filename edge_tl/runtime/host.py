"""What this host is, as far as INT8 kernels care: CPU model and its integer instructions.

Torch-free. INT8 fidelity depends on the host's kernels (ONNX Runtime's u8s8 path saturates
on x86-64 CPUs with AVX2 but no VNNI), so reports and self-tests record where they ran.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
from pathlib import Path

__all__ = ["cpu_class", "host_info"]


@functools.cache
def host_info() -> dict[str, object]:
    """CPU model, architecture, INT8-relevant instruction sets, core count and engine versions."""
    model, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    isa = [
        name
        for name, flag in (
            ("avx2", "avx2"),
            ("avx512", "avx512f"),
            ("avx512_vnni", "avx512_vnni"),
            ("avx_vnni", "avx_vnni"),
            ("amx_int8", "amx_int8"),
            ("neon_dotprod", "asimddp"),
        )
        if flag in flags
    ]
    info: dict[str, object] = {
        "cpu": model or platform.processor() or "unknown",
        "machine": platform.machine(),
        "int8_isa": isa,
        "cpu_class": cpu_class(platform.machine(), isa),
        "cores": os.cpu_count(),
    }
    for dist in ("onnxruntime", "openvino"):  # versions without importing the engines
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    return info


def cpu_class(machine: str, isa: list[str]) -> str:
    """``x86-64-vnni`` / ``x86-64-avx2`` / ``arm64`` / the machine name: the INT8 kernel family."""
    if machine.lower() in ("x86_64", "amd64"):
        vnni = any(f in isa for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
        return "x86-64-vnni" if vnni else "x86-64-avx2"
    if machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    return machine.lower() or "unknown"
