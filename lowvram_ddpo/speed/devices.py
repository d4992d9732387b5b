"""The dense fp16/bf16 tensor-core rate of common GPUs, for model FLOPs utilisation.

Data-centre cards: vendor datasheet figures, without sparsity. GeForce cards (the
hobbyist's RTX 20 to 50 series): their rate with fp32 accumulation (what PyTorch's
fp16/bf16 matmuls use; GeForce tensor cores run it at half their fp16-accumulate rate)
computed from the card's SM count and listed boost clock, at 512 FLOPs per SM per clock,
the rule the datasheet figures follow (RTX 3090: 82 SMs at 1.695 GHz, 71.2 against 71
listed; RTX 4090: 128 at 2.52 GHz, 165.2 against 165.2; a test holds both). A laptop GPU
(its clock set by the laptop's power limit) or a card not listed gets no MFU unless
``--peak-tflops`` gives its rate, and the time model measures its matmul rate instead.
"""

from __future__ import annotations

import re

DENSE_FP16_TFLOPS: tuple[tuple[str, float], ...] = (
    # (a substring of torch.cuda.get_device_name(), TFLOP/s)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("T4", 65.0),
)

GEFORCE_FLOPS_PER_SM_CLOCK = 512
"""Dense fp16 tensor FLOPs per SM per clock with fp32 accumulation on GeForce cards from
Turing to Blackwell."""

GEFORCE_SMS_AND_BOOST_MHZ: tuple[tuple[str, int, int], ...] = (
    # (a substring of the device name, SMs, reference boost clock in MHz)
    ("RTX 2060 SUPER", 34, 1650),
    ("RTX 2060", 30, 1680),
    ("RTX 2070 SUPER", 40, 1770),
    ("RTX 2070", 36, 1620),
    ("RTX 2080 SUPER", 48, 1815),
    ("RTX 2080 Ti", 68, 1545),
    ("RTX 2080", 46, 1710),
    ("RTX 3060 Ti", 38, 1665),
    ("RTX 3060", 28, 1777),
    ("RTX 3070 Ti", 48, 1770),
    ("RTX 3070", 46, 1725),
    ("RTX 3080 Ti", 80, 1665),
    ("RTX 3080", 68, 1710),  # the 10 GB card's (the 12 GB one has 70 SMs: 3% more)
    ("RTX 3090 Ti", 84, 1860),
    ("RTX 4060 Ti", 34, 2535),
    ("RTX 4060", 24, 2460),
    ("RTX 4070 Ti SUPER", 66, 2610),
    ("RTX 4070 Ti", 60, 2610),
    ("RTX 4070 SUPER", 56, 2475),
    ("RTX 4070", 46, 2475),
    ("RTX 4080 SUPER", 80, 2550),
    ("RTX 4080", 76, 2505),
    ("RTX 5060 Ti", 36, 2572),
    ("RTX 5060", 30, 2497),
    ("RTX 5070 Ti", 70, 2452),
    ("RTX 5070", 48, 2512),
    ("RTX 5080", 84, 2617),
    ("RTX 5090", 170, 2407),
)


def geforce_tflops(sms: int, boost_mhz: int) -> float:
    """A GeForce card's dense fp16 rate with fp32 accumulation, TFLOP/s."""
    return sms * boost_mhz * 1e6 * GEFORCE_FLOPS_PER_SM_CLOCK / 1e12


KNOWN_RATES: dict[str, float] = {
    **{name: geforce_tflops(sms, mhz) for name, sms, mhz in GEFORCE_SMS_AND_BOOST_MHZ},
    **dict(DENSE_FP16_TFLOPS),  # a datasheet's own figure over the computed one
}
"""Every listed card's rate by its name's substring."""


def dense_fp16_tflops(device_name: str) -> float | None:
    """The listed rate of the GPU named ``device_name``, or None when it is not listed or
    is a laptop's. The longest name it contains wins ("RTX 4070 Ti SUPER" over "RTX 4070")."""
    found = named_card(device_name)
    return found[1] if found else None


LAPTOP_MARKS = ("laptop", "max-q", "mobile")
"""Words in a device's name that make it a laptop's GPU, clocked by the laptop's power."""

VARIANT_WORDS = ("ti", "super", "d")
"""Words after a card's name that make it another card ("RTX 4090 D": fewer SMs than the
RTX 4090's): a variant not listed gets no rate rather than its sibling's."""


def named_card(query: str) -> tuple[str, float] | None:
    """The listed card named in ``query`` (a device's name, or one a user gives to
    ``--card`` in any case: "rtx 3060", "GeForce RTX 3060") and its rate; None when no
    listed name is in it, or it is a laptop's. The longest name it contains wins ("RTX
    4070 Ti SUPER" over "RTX 4070"); a name counts as whole words only ("A100" is not in
    "RTX A1000", "T4" not in "T400") and not when a variant word follows it."""
    text = query.lower()
    if any(mark in text for mark in LAPTOP_MARKS):
        return None
    variant = "|".join(VARIANT_WORDS)
    matches = [
        name
        for name in KNOWN_RATES
        if re.search(
            rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])(?!\s+(?:{variant})\b)", text
        )
    ]
    if not matches:
        return None
    name = max(matches, key=len)
    return name, KNOWN_RATES[name]
