"""Run the three attention kinds of an ASA model on one random batch and compare their cost.

Local (MLA sliding window), global (GLA compression + selection) and dense causal
attention on the same query heads: wall time here, and the query-key pairs each computes.
Uses the Triton kernels on a GPU, the plain-PyTorch reference otherwise.

    python examples/quickstart.py [--seq-length 4096]
"""

from __future__ import annotations

import argparse
import time

import nsa_kernels
import torch
from nsa_kernels import flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--latent-heads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    T, H, hc = args.seq_length, args.heads, args.latent_heads
    dk, dv, l, s, lp, n = 64 + 32, 64, 32, 16, 64, 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(1, *shape, device=device, dtype=dtype)

    q, k, v = rand(T, H, dk), rand(T, H, dk), rand(T, H, dv)
    k_cmp = nsa_kernels.compress_mean(k, l, s)
    v_cmp = nsa_kernels.compress_mean(v, l, s)
    gates = torch.sigmoid(rand(T, H, 2)).unbind(-1)

    def dense() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )

    runs = {
        "local (window)": (
            lambda: nsa_kernels.sliding_window_attention(q, k, v, args.window),
            flops.window_pairs(T, args.window),
        ),
        "global (cmp+slc)": (
            lambda: nsa_kernels.nsa_attention(
                q, k, v, k_cmp, v_cmp, *gates, block_size=l, stride=s,
                select_block_size=lp, top_n=n, num_selection_heads=hc,
            ),
            flops.compressed_pairs(T, l, s) + flops.selected_pairs(T, lp, n),
        ),
        "dense (causal)": (dense, flops.causal_pairs(T)),
    }
    print(f"T={T}, heads={H}, qk dim={dk}, v dim={dv}, device={device}, dtype={dtype}")
    print(f"{'attention':<18}{'time (ms)':>12}{'q-k pairs':>16}{'vs dense':>10}")
    dense_pairs = flops.causal_pairs(T)
    for name, (fn, pairs) in runs.items():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        print(f"{name:<18}{ms:>12.1f}{pairs:>16,}{pairs / dense_pairs:>10.3f}")


if __name__ == "__main__":
    main()
