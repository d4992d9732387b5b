"""Host-to-GPU copies that do not stall the loop.

A plain ``tensor.to("cuda")`` from ordinary (pageable) memory makes the host wait until
the GPU has finished everything queued before the copy: in a launch-bound loop that
wait empties the GPU's queue once per copy. A copy from pinned memory with
``non_blocking=True`` is queued like a kernel instead. PyTorch's pinned-memory cache
keeps the source alive until the copy has run, so the caller may drop it at once.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to CUDA through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
