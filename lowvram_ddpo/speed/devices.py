"""The dense fp16/bf16 tensor-core rate of common GPUs, for model FLOPs utilisation.

Vendor datasheet figures, without sparsity, fp32 accumulation where the card has two
rates (GeForce cards run fp16 with fp32 accumulation at half their fp16-accumulate
rate; PyTorch accumulates in fp32). A card not listed gets no MFU unless
``--peak-tflops`` gives its rate.
"""

from __future__ import annotations

DENSE_FP16_TFLOPS: tuple[tuple[str, float], ...] = (
    # (a substring of torch.cuda.get_device_name(), TFLOP/s); more specific names first
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


def dense_fp16_tflops(device_name: str) -> float | None:
    """The listed rate of the GPU named ``device_name``, or None when it is not listed."""
    for key, rate in DENSE_FP16_TFLOPS:
        if key in device_name:
            return rate
    return None
