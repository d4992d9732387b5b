"""Which model sits on the accelerator in each phase of an epoch.

With offloading on, the text encoder and the VAE live on the CPU and visit the GPU
only for their own phase (encoding prompts not met before, decoding a batch's images),
so the training pass never shares the card with them. Moving the VAE costs ~0.2 GB of
PCIe traffic per sampling batch, small beside the denoising steps; the text encoders
move only while new prompts arrive (``text_encoding.PromptCache``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Offloader:
    device: torch.device
    enabled: bool = True
    resident: set[str] = field(default_factory=set)
    """Names of the modules this offloader has put on ``device`` (for reports and tests)."""
    _modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    _on_cpu: set[str] = field(default_factory=set)

    def register(
        self, name: str, module: torch.nn.Module, stays: bool = False, on_cpu: bool = False
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

    @contextmanager
    def loaded(self, name: str) -> Iterator[torch.nn.Module]:
        """The module on the device for the duration of the block (a no-op if it stays)."""
        module = self._modules[name]
        if name in self.resident or name in self._on_cpu:
            yield module
            return
        module.to(self.device)
        self.resident.add(name)
        try:
            yield module
        finally:
            module.to("cpu")
            self.resident.discard(name)
