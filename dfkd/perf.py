"""Fast paths (config `perf`) and the per-phase timer `dfkd bench` reads."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dfkd.config import PerfConfig
from dfkd.errors import DfkdError


def check_perf(cfg: PerfConfig, device: torch.device) -> None:
    if cfg.autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DfkdError(
            f"perf.autocast=bf16: {torch.cuda.get_device_name(device)} has no bfloat16; "
            "use perf.autocast=none"
        )


def speed_up(model: nn.Module, cfg: PerfConfig) -> nn.Module:
    """Apply the layout and compile switches to one network, in place (state_dict keys unchanged)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile()
    return model


def autocast(cfg: PerfConfig, device: torch.device) -> AbstractContextManager:
    """The context forward passes run in: bf16 autocast when asked (on GPUs, and on CPUs with AMX or
    AVX512-BF16, where it is fast; elsewhere it runs, slowly), else nothing."""
    if cfg.autocast == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class PhaseTimer:
    """Seconds spent per named phase of an iteration. Off (a shared no-op context) while training;
    `dfkd bench` switches it on, and then it synchronizes CUDA around each phase so the times are
    the phases' own rather than their kernel launches'."""

    def __init__(self, device: torch.device):
        self.enabled = False
        self.count_flops = False  # also count each phase's floating-point operations (slow; bench only)
        self.totals: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._off = nullcontext()

    def __call__(self, name: str) -> AbstractContextManager:
        return self._timed(name) if self.enabled else self._off

    @contextmanager
    def _timed(self, name: str):
        counter = FlopCounterMode(display=False) if self.count_flops else nullcontext()
        self._sync()
        start = time.perf_counter()
        try:
            with counter:
                yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start
            if self.count_flops:
                self.flops[name] += counter.get_total_flops()

    def reset(self) -> None:
        self.totals.clear()
        self.flops.clear()


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5
) -> float:
    """FLOP/s of a large square matmul on `device`: what this machine does at best, measured here."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2]
