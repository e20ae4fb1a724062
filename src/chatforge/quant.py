"""Weight-only int4 matrices for CPU decoding, on torch's own int4 kernel (no extra dependency).

A weight (N out, K in) is cut along K into groups of 32 values; each group keeps a bf16 scale s and zero z
and 4-bit codes q in 0..15, with w ~ (q - 8) * s + z: the layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`
(checked in tests/test_engine_quant.py). A GGUF Q4_1 block (w = d * q + m over 32 values along K) is the same
grid with s = d and z = m + 8 d; min/max quantization finds that grid again, so for a Q4_1 model the only loss
is the scales' rounding to bf16 (the kernel takes them in the activations' dtype) and the activations' bf16.
Measured on this repository's CPUs (AMD EPYC, avx512_bf16): the 30 SmolLM2-135M layers' projections take
~8 ms per token in int4 against ~26 ms in fp32 (one thread), bandwidth being the limit (1/6 of the bytes).
The kernel's fp32-activation path is a slow reference loop (20 ms for a 576 x 49152 head): bf16 is used.
"""
from __future__ import annotations

import torch

GROUP = 32


def int4_available() -> bool:
    """True when this torch has the CPU int4 kernels."""
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


class Int4Weight:
    """One int4 matrix: `self(x)` is x @ w.T for x (M, K) bf16 -> (M, N) bf16; K a multiple of 32."""

    def __init__(self, w: torch.Tensor):
        if w.dim() != 2 or w.shape[1] % GROUP:
            raise ValueError(f"int4 weights need (out, in) with `in` a multiple of {GROUP}, got {tuple(w.shape)}")
        w = w.detach().float().cpu()
        n, k = w.shape
        self.out_features = n
        pad = -n % 16  # the packing wants N in multiples of 16: extra zero rows, cut from the output
        if pad:
            w = torch.cat([w, w.new_zeros(pad, k)])
        g = w.view(w.shape[0], k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).bfloat16()
        zero = (lo + 8 * scale.float()).bfloat16()  # q = 0 is the group's minimum
        s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        # codes for the scale and zero as stored (bf16): the nearest grid point to each weight
        q = torch.where(s > 0, torch.round((g - z) / s.clamp(min=torch.finfo(torch.float32).tiny)) + 8,
                        torch.full_like(g, 8.0))
        q = q.clamp_(0, 15).to(torch.int32).view(w.shape[0], k)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (K / 32, N, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2
