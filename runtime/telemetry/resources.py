"""Machine readings for the resource metrics: CPU (psutil), resident memory of this process,
and GPU memory through NVML when there is a GPU (nvidia-ml-py; without one, NVML fails to
initialize and the GPU series simply do not exist)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psutil
import structlog


@dataclass(frozen=True)
class GpuMemory:
    index: int
    used_bytes: int
    total_bytes: int


class ResourceReader:
    """Reads CPU, memory and GPU memory; cheap enough to call every few seconds."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._nvml: Any = None
        self._nvml_tried = False
        self._log = structlog.get_logger("tiffin.telemetry")
        psutil.cpu_percent(interval=None)  # primes the counter: the next call measures from here

    def cpu_percent(self) -> float:
        """Machine-wide CPU busy since the previous call, 0-100."""
        return float(psutil.cpu_percent(interval=None))

    def resident_memory_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def gpu_memory(self) -> list[GpuMemory]:
        """Per-GPU memory in use and in all; empty without NVML or a GPU."""
        nvml = self._load_nvml()
        if nvml is None:
            return []
        try:
            readings = []
            for index in range(nvml.nvmlDeviceGetCount()):
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
                readings.append(GpuMemory(index, int(info.used), int(info.total)))
            return readings
        except Exception as exc:  # a GPU that fell off the bus: report none rather than fail
            self._log.warning("reading GPU memory failed", error=str(exc))
            return []

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):  # already gone: nothing to release
                self._nvml.nvmlShutdown()
            self._nvml = None

    def _load_nvml(self) -> Any:
        if self._nvml_tried:
            return self._nvml
        self._nvml_tried = True
        try:
            import pynvml  # type: ignore[import-untyped]

            pynvml.nvmlInit()
        except Exception:  # no driver, no GPU, or the package is missing: no GPU series
            return None
        self._nvml = pynvml
        return self._nvml
