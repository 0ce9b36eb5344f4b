"""One device and precision policy for training, scoring and benchmarks.

``device``: ``auto`` (CUDA when present, else CPU) | ``cpu`` | ``cuda[:N]``.
``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on CPU) | ``fp32`` | ``bf16``.
On CUDA, models and inputs use the channels-last memory format (faster convolutions).
"""

from __future__ import annotations

import contextlib
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


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA, ``fp32`` elsewhere; anything but the three names is an error."""
    if name not in PRECISIONS:
        raise InvalidInputError(f"precision must be auto, fp32 or bf16, got {name!r}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


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
