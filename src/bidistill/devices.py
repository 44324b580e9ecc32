"""Where and in which precision torch runs: one resolver for extraction, training and inference."""

from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: a GPU, else Apple's MPS, else the CPU; anything else as torch reads it.

    Under torchrun (``LOCAL_RANK`` set) a GPU without an index is this process's own GPU, so
    that the processes of one machine do not all work on the first one.
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that have it, else float16 on a GPU (and MPS); float32 on the
    CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, precision: torch.dtype):
    """Mixed precision for ``precision`` other than float32 (a no-op context otherwise)."""
    if precision == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)
