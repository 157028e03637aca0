"""Choosing the torch device once, with one clear rule for "auto"; sizing torch's thread pools."""

from __future__ import annotations

import logging

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def set_torch_threads(num_threads: int) -> None:
    """``num_threads`` > 0: torch's intra- and inter-op thread pools; 0 leaves torch's defaults.

    On a robot the localizer shares the CPU with the rest of the stack (nav2, drivers):
    torch would otherwise take every core.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0 (0: the library default), got {num_threads!r}")
    if num_threads == 0:
        return
    torch.set_num_threads(num_threads)
    if torch.get_num_interop_threads() != num_threads:
        try:
            torch.set_num_interop_threads(num_threads)
        except RuntimeError as exc:  # only possible before the first inter-op work of the process
            logging.getLogger(__name__).warning("torch inter-op threads stay at %d: %s",
                                                torch.get_num_interop_threads(), exc)
