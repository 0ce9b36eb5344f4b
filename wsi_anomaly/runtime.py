"""One device and precision policy for training, scoring and benchmarks.

``device``: ``auto`` (CUDA when present, else CPU) | ``cpu`` | ``cuda[:N]``.
``precision``: ``auto`` | ``fp32`` | ``bf16``. ``auto`` is bf16 autocast on CUDA and on a CPU
with native bf16 arithmetic (AMX-BF16 or AVX512-BF16, see :func:`cpu_has_native_bf16`), fp32 on
other CPUs, where bf16 is emulated and slower than fp32. Under bf16 autocast tile scores rank as
in fp32 (Spearman ≥ 0.999, ≤ 0.5 % of "Anomalous" calls differing; ``tests/test_precision.py``),
so the precision is recorded next to results but is not part of their identity.
On CUDA, models and inputs use the channels-last memory format (faster convolutions).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DeviceUnavailableError, InvalidInputError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device {name} was requested but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InvalidInputError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


#: ``/proc/cpuinfo`` flags of x86 CPUs that compute in bf16 natively (oneDNN uses them).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The flags of the first processor listed in ``path`` (empty where there is no such file)."""
    with contextlib.suppress(OSError):
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively: AMX-BF16 or AVX512-BF16 by its cpuinfo flags,
    or, where there is no ``/proc/cpuinfo``, oneDNN's own bf16 check (Arm's BF16 extension,
    for one). Tests replace this function to pretend either kind of CPU."""
    flags = _cpuinfo_flags()
    if flags:
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    with contextlib.suppress(Exception):
        return bool(mkldnn_bf16()) if mkldnn_bf16 is not None else False
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA and on CPUs with native bf16 (:func:`cpu_has_native_bf16`),
    ``fp32`` elsewhere; anything but the three names is an error."""
    if name not in PRECISIONS:
        raise InvalidInputError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return name


#: glibc's ``mallopt`` parameter ``M_MMAP_THRESHOLD`` (``malloc.h``).
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own memory mapping while training on the CPU.
TRAINING_MMAP_THRESHOLD = 128 * 1024


def return_freed_tensors_to_the_os(threshold_bytes: int = TRAINING_MMAP_THRESHOLD) -> bool:
    """glibc: serve every allocation of ``threshold_bytes`` or more with its own memory mapping,
    unmapped when freed, for the rest of the process (what ``MALLOC_MMAP_THRESHOLD_`` does).

    glibc starts at 128 KiB but raises the threshold, up to 32 MiB, each time such a block is
    freed; a training step's activations (a few MiB to a few tens of MiB each) then come from
    the heap, whose freed space stays in the process and adds to the next step's peak — on the
    fast preset about a third of the peak RSS. With the threshold fixed, the peak is what the
    step holds. Returns False where the C library has no ``mallopt`` (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs: a device and a precision (``fp32`` or ``bf16``)."""

    device: torch.device
    precision: str

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        dev = resolve_device(device)
        return cls(dev, resolve_precision(precision, dev))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast when the precision is bf16; a no-op context for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` on the device (channels-last on CUDA)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.is_cuda else model

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Copy a batch to the device: pinned and asynchronous on CUDA."""
        if self.is_cuda and x.device.type == "cpu":
            if not x.is_pinned():
                x = x.pin_memory()
            return x.to(self.device, non_blocking=True)
        return x.to(self.device)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A ``B×C×H×W`` input in the memory format the model expects (channels-last on CUDA)."""
        return (
            x.contiguous(memory_format=torch.channels_last) if self.is_cuda and x.ndim == 4 else x
        )
