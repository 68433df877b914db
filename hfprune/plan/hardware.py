"""The machine a plan is made for: accelerator memory and peak throughput, host memory, process count.

`hfprune.plan.estimate` estimates each stage's memory and time against a `Hardware`; `detect_hardware()` reads
this machine (torch.cuda when there is an accelerator, /proc/meminfo for the host), and
`reference_hardware(name)` gives a named machine for planning elsewhere (`h100-80gb`: the one 80 GB
accelerator the Llama-3.1-8B recipes are written for). Throughput is a dense peak from the vendor's
data sheet (no sparsity), or on a CPU a matmul timed here: the plan applies its own utilisation factor.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import torch


GIB = 2**30

# Dense peak FLOP/s per accelerator (bf16/fp16 tensor cores, and plain fp32 since torch does not use
# TF32 for float32 matmuls by default), from the vendors' data sheets. Matched by substring, in order.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("RTX 4090", 165e12, 82.6e12),
)
UNKNOWN_GPU = ("unknown accelerator (A100 figures assumed)", 312e12, 19.5e12)


@dataclass(frozen=True)
class Hardware:
    """One machine: `devices` accelerators of `device_memory` bytes each (None: CPU only).

    `host_memory` is what a run may use (MemAvailable when detected; None: not known, not checked).
    `peak_flops` is per device (or for the whole CPU), by compute dtype name.
    """

    name: str
    devices: int
    device_memory: int | None
    host_memory: int | None
    peak_flops: dict[str, float]
    source: str

    @property
    def has_device(self) -> bool:
        return self.device_memory is not None

    def peak(self, dtype: str) -> float:
        return self.peak_flops["float32" if dtype == "float32" else "bfloat16"]

    def with_devices(self, devices: int) -> Hardware:
        return replace(self, devices=devices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def detect_hardware() -> Hardware:
    """This machine: its CUDA devices when torch sees any, else its CPU (throughput measured once per
    process: preflight and the dry run of every sweep cell ask again)."""
    import torch  # here, not at the top: a plan for a stated machine needs no torch

    host = host_memory_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        label, bf16, fp32 = gpu_peaks(props.name)
        return Hardware(
            name=props.name,
            devices=torch.cuda.device_count(),
            device_memory=props.total_memory,
            host_memory=host,
            peak_flops={"bfloat16": bf16, "float32": fp32},
            source=f"detected with torch.cuda; peak FLOP/s of {label} from its data sheet",
        )
    threads = torch.get_num_threads()
    fp32, bf16 = measure_cpu_flops(torch.float32, size=512), measure_cpu_flops(torch.bfloat16)
    return Hardware(
        name=f"CPU ({threads} threads)",
        devices=1,
        device_memory=None,
        host_memory=host,
        peak_flops={"bfloat16": bf16, "float32": fp32},
        source=f"detected; CPU matmul throughput measured now: {fp32 / 1e9:.1f} GFLOP/s float32, "
        f"{bf16 / 1e9:.1f} GFLOP/s bfloat16",
    )


def reference_hardware(name: str = "h100-80gb", devices: int = 1) -> Hardware:
    """A named machine to plan for when the run happens elsewhere; host memory is not checked."""
    machines = {
        "h100-80gb": ("NVIDIA H100 80GB HBM3", 80 * 10**9),
        "a100-80gb": ("NVIDIA A100-SXM4-80GB", 80 * 10**9),
        "h200": ("NVIDIA H200", 141 * 10**9),
    }
    if name not in machines:
        raise ValueError(f"unknown reference hardware {name!r}; known: {', '.join(machines)}")
    full_name, memory = machines[name]
    label, bf16, fp32 = gpu_peaks(full_name)
    return Hardware(
        name=full_name,
        devices=devices,
        device_memory=memory,
        host_memory=None,
        peak_flops={"bfloat16": bf16, "float32": fp32},
        source=f"reference machine {name!r}; peak FLOP/s of {label} from its data sheet",
    )


def gpu_peaks(device_name: str) -> tuple[str, float, float]:
    """(matched name, dense bf16 peak, fp32 peak) for a CUDA device name."""
    for key, bf16, fp32 in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return key, bf16, fp32
    return UNKNOWN_GPU


def host_memory_available() -> int | None:
    """What a run may use of the host's memory, in bytes: MemAvailable from /proc/meminfo plus what this
    process already holds (the plan counts the process itself in its baseline). None without /proc."""
    path = Path("/proc/meminfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 + _own_resident_bytes()
    return None


def _own_resident_bytes() -> int:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return 0
    import resource

    return int(statm.read_text().split()[1]) * resource.getpagesize()


def measure_cpu_flops(dtype: torch.dtype, size: int = 256, seconds: float = 0.05) -> float:
    """FLOP/s of square matmuls in `dtype` on this CPU, best of three short timings.

    Small matrices (`size`) keep this fast (CPUs without bf16 units run bf16 matmuls ~50x slower);
    they understate what large matmuls reach by up to about 2x, which a time class tolerates.
    """
    import torch  # here, not at the top: a plan for a stated machine needs no torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):
        start, count = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < seconds:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / elapsed)
    return best


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(text: str) -> int:
    """Bytes in '80GiB', '80 GB' (10^9), '512MiB' or a plain number of bytes; ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size: use a number with a unit, e.g. 80GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def stated_hardware(
    name: str | None = None,
    device_memory: int | None = None,
    host_memory: int | None = None,
    devices: int | None = None,
) -> Hardware:
    """The machine a plan is made for: `name` (a reference machine, or "detect" for this one) with the
    stated memories and device count replacing its own. Stating a device memory on a CPU-only machine
    plans for an accelerator of that size (with the throughput of an unknown one, A100 figures)."""
    import torch  # here, not at the top: a plan for a stated machine needs no torch

    if name in (None, "detect"):
        hardware = detect_hardware() if device_memory is None or torch.cuda.is_available() else _stated_gpu()
    else:
        hardware = reference_hardware(name)
    changes: dict[str, Any] = {}
    if device_memory is not None:
        changes["device_memory"] = device_memory
    if host_memory is not None:
        changes["host_memory"] = host_memory
    if devices is not None:
        changes["devices"] = devices
    if changes:
        stated = ", ".join(
            f"{k} {v / GIB:.1f} GiB" if k.endswith("memory") else f"{k} {v}" for k, v in changes.items()
        )
        changes["source"] = f"{hardware.source}; stated: {stated}"
    return replace(hardware, **changes)


def _stated_gpu() -> Hardware:
    label, bf16, fp32 = UNKNOWN_GPU
    return Hardware(
        name="accelerator (stated)",
        devices=1,
        device_memory=None,
        host_memory=host_memory_available(),
        peak_flops={"bfloat16": bf16, "float32": fp32},
        source=f"stated on the command line; peak FLOP/s of an {label}",
    )
