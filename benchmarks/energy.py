"""Energy per result on NVIDIA GPUs: NVML's total-energy counter over a timed window.

The counter (millijoules since driver load) updates every ~20-100 ms, so windows must last seconds, not
steps; power readings (nvidia-smi) sample only part of the time on H100s and are not used. Elsewhere the meter
says why it measured nothing instead of guessing.
"""

from __future__ import annotations

import time


class NvmlEnergyWindow:
    """Joules of one GPU over a timed window (start/stop), from the library's NVML counter (the one training runs use for their energy)."""

    def __init__(self, device_index: int = 0):
        self.joules = None
        self.seconds = None
        self.flops_per_sample = None
        self.reason = None
        self._counter = None
        from aifactory_train.records.energy import NvmlCounter, cuda_uuid, nvml_available

        try:
            if (missing := nvml_available()) is not None:
                raise RuntimeError(missing)
            self._counter = NvmlCounter(cuda_uuid(device_index))
        except Exception as err:  # noqa: BLE001 - no library, no driver, no GPU or no counter: all "not measured"
            self.reason = f"energy not measured: {err}"

    @property
    def available(self) -> bool:
        return self._counter is not None

    def start(self) -> None:
        if self.available:
            self._e0 = self._counter.read()
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.available:
            self.joules = self._counter.read() - self._e0
            self.seconds = time.perf_counter() - self._t0

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds else None
