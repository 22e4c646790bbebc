"""Fast paths (config `perf`) and the per-phase timer `dfkd bench` reads."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dfkd.config import PerfConfig
from dfkd.errors import DfkdError


@dataclass(frozen=True)
class Capabilities:
    """What the fast defaults depend on: the kind of device, its name, and the hardware (if any) that
    makes bfloat16 arithmetic fast on it."""

    kind: str  # cpu | cuda | another torch device type
    name: str
    fast_bf16: str | None  # "AMX", "AVX512-BF16", "CUDA"; None: bf16 is emulated or absent


def probe(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        bf16 = "CUDA" if torch.cuda.is_bf16_supported() else None
        return Capabilities("cuda", torch.cuda.get_device_name(device), bf16)
    if device.type == "cpu":
        # (torch's own probes, private: a torch without them reports no native bf16)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return Capabilities("cpu", "CPU", "AMX" if amx else "AVX512-BF16" if avx512 else None)
    return Capabilities(device.type, device.type, None)


def fast_defaults(caps: Capabilities) -> dict[str, object]:
    """The perf settings a run gets where its config leaves them unset (measurements in
    runs/RESULTS.md, "Fast defaults"). channels_last and the fused optimizers on CPUs and GPUs; bf16
    autocast where the hardware does bf16 natively (without it, bf16 is emulated and slower than
    float32); compile nowhere: on the CPU it saved nothing on the demo after 38 s of compiling, and
    on a GPU it is still to be measured (runs/gpu_check.py times it)."""
    known = caps.kind in ("cpu", "cuda")
    return {
        "channels_last": known,
        "fused_optimizers": known,
        "autocast": "bf16" if known and caps.fast_bf16 else "none",
        "compile": False,
    }


def choose_perf(cfg: PerfConfig, caps: Capabilities) -> tuple[PerfConfig, str | None]:
    """`cfg` with its unset settings chosen for `caps`, and a line that says what was chosen and why
    (None where the config set everything)."""
    unset = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is None]
    if not unset:
        return cfg, None
    defaults = fast_defaults(caps)
    chosen = {name: defaults[name] for name in unset}
    shown = ", ".join(f"{k}={str(v).lower()}" for k, v in chosen.items())
    bf16 = f"native bf16 by {caps.fast_bf16}" if caps.fast_bf16 else "no native bf16"
    note = f"{shown} (chosen for this {caps.name}: {bf16}; perf.* overrides)"
    return dataclasses.replace(cfg, **chosen), note


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
    AVX512-BF16, where it is fast; elsewhere it runs, slowly), else nothing.

    Without autocast's weight cache: it keys a weight's bf16 copy by the tensor, not its version,
    so a forward after an optimizer step in the same region (the discriminator steps of GAN-KD)
    would run on the weights from before the step; and each region runs each network once, so the
    cache saves no cast, while clearing it costs each region's exit about 20 us."""
    if cfg.autocast == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


class PhaseTimer:
    """Seconds spent per named phase of an iteration. Off (a shared no-op context) while training;
    `dfkd bench` switches it on, and then it synchronizes CUDA around each phase so the times are
    the phases' own rather than their kernel launches'."""

    def __init__(self, device: torch.device):
        self.enabled = False
        self.count_flops = False  # count each phase's floating-point operations instead (slow; bench only)
        self.totals: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._off = nullcontext()

    def __call__(self, name: str) -> AbstractContextManager:
        if not self.enabled:
            return self._off
        return self._counted(name) if self.count_flops else _Timed(self, name)

    @contextmanager
    def _counted(self, name: str):
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                yield
        finally:
            self.flops[name] += counter.get_total_flops()

    def reset(self) -> None:
        self.totals.clear()
        self.flops.clear()


class _Timed:
    """One timed phase. What it does outside its two clock readings counts as framework overhead,
    so it does little: one call before the first reading, one addition after the second."""

    __slots__ = ("timer", "name", "start")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timer._sync()
        self.timer.totals[self.name] += time.perf_counter() - self.start


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
