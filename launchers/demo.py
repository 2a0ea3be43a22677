"""Kernel demo: run the local kernels on a small problem and compare them with the fp64 references.

    python -m launchers.demo
"""
from __future__ import annotations

import torch

from dist_attn.kernels.flash_attn import flash_attn
from dist_attn.kernels.flash_attn.naive import attention_ref
from dist_attn.kernels.lightning_attn import lightning_attn
from dist_attn.kernels.lightning_attn.naive import linear_attn_recurrent


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 256, 4, 64) for _ in range(3))
    out, lse = flash_attn(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=True)
    print(f"flash_attn     causal [2,256,4,64]: max |out - fp64 ref| = {(out.double() - ref).abs().max():.2e}, "
          f"max |lse - ref| = {(lse.double() - ref_lse).abs().max():.2e}")
    decay = -torch.rand(4)
    out, state = lightning_attn(q, k, v, decay=decay, output_final_state=True)
    ref, ref_state = linear_attn_recurrent(q.double(), k.double(), v.double(), decay=decay.double())
    print(f"lightning_attn decay  [2,256,4,64]: max |out - fp64 ref| = {(out.double() - ref).abs().max():.2e}, "
          f"max |state - ref| = {(state.double() - ref_state).abs().max():.2e}")


if __name__ == "__main__":
    main()
