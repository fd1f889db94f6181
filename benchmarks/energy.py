"""Energy per result on NVIDIA GPUs: NVML's total-energy counter integrated over a timed window.

The counter (millijoules since driver load) updates every ~20-100 ms, so windows must last seconds, not
steps; power readings (nvidia-smi) sample only part of the time on H100s and are not used. Elsewhere the meter
says why it measured nothing instead of guessing.
"""

from __future__ import annotations

import time


class EnergyMeter:
    def __init__(self, device_index: int = 0):
        self.joules = None
        self.seconds = None
        self.flops_per_sample = None
        self.reason = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._nvml = pynvml
        except Exception as err:  # noqa: BLE001 - no library, no driver, no GPU or no counter: all "not measured"
            self._handle = None
            self.reason = f"energy not measured: no NVIDIA energy counter here ({type(err).__name__}: {err})"

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if self.available:
            self._e0 = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.available:
            self.joules = (self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) - self._e0) / 1000
            self.seconds = time.perf_counter() - self._t0

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds else None
