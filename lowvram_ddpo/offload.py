"""Which model sits on the accelerator in each phase of an epoch.

With offloading on, the text encoder and the VAE live on the CPU and visit the GPU
only for their own phase (encoding the prompts, decoding a batch's images),
so the training pass never shares the card with them; a reward network visits it to
score. The text encoders visit once, before the first epoch, to encode every prompt
(``text_encoding.PromptCache.warm``); the VAE every sampling batch.

A visit costs one copy in, none out. These modules are frozen, so their weights on the
host stay valid while they are on the card: the visit copies them in and the return
points the module back at the host copy (``HostWeights``), where ``module.to("cpu")``
would copy every weight back into fresh host memory, each copy a wait on the GPU. The host
copies are in pinned memory, up to ``PINNED_HOST_LIMIT`` in all, so the copy in is
queued behind the GPU's work instead of holding the host (see ``device_transfer``). On
an H200 offloading with round trips (the text encoders' too, as new prompts came) made
sampling 12% slower (SD 1.5, 8 images per batch, 2026-11-26, measured); the visits as
they are now are not measured yet (``benchmarks/offload_visit.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

PINNED_HOST_LIMIT = 4 * 2**30
"""Bytes of host memory an offloader pins, in all (per process: each GPU's process pins
its own). Pinned pages cannot be swapped out, so a 16 GB machine must not lose most of
its memory to them: SD 1.5's modules (0.6 GB of weights), SDXL's (1.8 GB, with an
aesthetic scorer 2.7) fit; a T5 or Qwen3 text encoder (8-10 GB) stays in ordinary memory
(its copy in then waits on the GPU, as before). Counted as PyTorch's pinned allocator
takes it: each tensor in a block of the next power of two (``pinned_size``)."""


@dataclass
class _Slot:
    owner: nn.Module
    name: str
    is_parameter: bool
    host: Tensor

    def point_at(self, tensor: Tensor) -> None:
        if self.is_parameter:  # the same Parameter object: optimisers and hooks keep it
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


class HostWeights:
    """A frozen module's weights and buffers kept on the host, each tensor once."""

    def __init__(self, module: nn.Module, pin: bool) -> None:
        self.slots: list[_Slot] = []
        seen: dict[int, Tensor] = {}  # a tensor tied into several modules is kept once
        for owner in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(owner, kind).items():
                    if tensor is None:
                        continue
                    if id(tensor) not in seen:
                        seen[id(tensor)] = _pinned(tensor.data) if pin else tensor.data
                    slot = _Slot(owner, name, kind == "_parameters", seen[id(tensor)])
                    slot.point_at(slot.host)
                    self.slots.append(slot)
        self.pinned_bytes = sum(pinned_size(t.nbytes) for t in seen.values() if t.is_pinned())

    @staticmethod
    def can_keep(module: nn.Module) -> bool:
        """Frozen plain tensors on the CPU only, none that a forward updates: a trainable
        weight must come back as it was trained, a quantised one (bitsandbytes) moves with
        its own state, and BatchNorm's running statistics in train mode change."""
        params = list(module.parameters())
        buffers = list(module.buffers())
        plain = all(type(p) is nn.Parameter for p in params) and all(
            type(b) is Tensor for b in buffers
        )
        frozen = not any(p.requires_grad for p in params)
        on_host = all(t.device.type == "cpu" for t in (*params, *buffers))
        updating = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()
        )
        return plain and frozen and on_host and not updating

    def copy_to(self, device: torch.device) -> None:
        copies: dict[int, Tensor] = {}  # a tied tensor: one copy on the device too
        for slot in self.slots:  # a copy even on the CPU, where the module would share it
            key = id(slot.host)
            if key not in copies:
                copies[key] = slot.host.to(device, non_blocking=True, copy=True)
            slot.point_at(copies[key])

    def restore(self) -> None:
        """Back to the host copy; the device's copy is freed (nothing is copied out)."""
        for slot in self.slots:
            slot.point_at(slot.host)


def pinned_size(nbytes: int) -> int:
    """Host memory PyTorch's pinned allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def _pinned(tensor: Tensor) -> Tensor:
    """A pinned copy, or the tensor itself where pinning fails (WSL limits pinned memory)."""
    try:
        return tensor.pin_memory()
    except RuntimeError:
        return tensor


@dataclass
class Offloader:
    device: torch.device
    enabled: bool = True
    resident: set[str] = field(default_factory=set)
    """Names of the modules this offloader has put on ``device`` (for reports and tests)."""
    pinned_bytes: int = 0
    """Host memory pinned for the modules' copies so far (at most ``PINNED_HOST_LIMIT``)."""
    _modules: dict[str, nn.Module] = field(default_factory=dict)
    _on_cpu: set[str] = field(default_factory=set)
    _host: dict[str, HostWeights] = field(default_factory=dict)

    def register(
        self, name: str, module: nn.Module, stays: bool = False, on_cpu: bool = False
    ) -> None:
        """Place a module: on the device when it ``stays`` or offloading is off, else CPU;
        ``on_cpu``: it runs on the CPU and never visits the device."""
        self._modules[name] = module
        if on_cpu:
            module.to("cpu")
            self._on_cpu.add(name)
        elif stays or not self.enabled:
            module.to(self.device)
            self.resident.add(name)
        else:
            module.to("cpu")
            if HostWeights.can_keep(module):
                host = HostWeights(module, pin=self._may_pin(module))
                self._host[name] = host
                self.pinned_bytes += host.pinned_bytes

    def _may_pin(self, module: nn.Module) -> bool:
        """Whether ``module``'s host copy may be pinned: for CUDA, within the limit."""
        tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
        size = sum(pinned_size(t.nbytes) for t in tensors.values())
        return self.device.type == "cuda" and size <= PINNED_HOST_LIMIT - self.pinned_bytes

    @contextmanager
    def loaded(self, name: str) -> Iterator[nn.Module]:
        """The module on the device for the duration of the block (a no-op if it stays)."""
        module = self._modules[name]
        if name in self.resident or name in self._on_cpu:
            yield module
            return
        host = self._host.get(name)
        self.resident.add(name)
        try:  # a copy in cut short (out of memory) goes back too
            if host is None:
                module.to(self.device)
            else:
                host.copy_to(self.device)
            yield module
        finally:
            if host is None:
                module.to("cpu")
            else:
                host.restore()
            self.resident.discard(name)
