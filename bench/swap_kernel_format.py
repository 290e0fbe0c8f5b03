"""Can a swap commit skip vLLM's weight processing on this build? (issue 19, "beyond")

vLLM's CPU build processes every unquantized linear weight after loading
(`dispatch_cpu_unquantized_gemm`): oneDNN packs it into a handle the GEMM then reads. If the
handle read the parameter's memory, a commit could `copy_` merged values into the parameters
(vLLM's own `reload_weights(is_checkpoint_format=False)` path) at memory speed. This prints whether
it does, and what building handles costs next to a copy of the same bytes, for SmolLM2-135M's
linear shapes (30 layers). Run: .venv/bin/python bench/swap_kernel_format.py
"""

from __future__ import annotations

import statistics
import time

import torch

# SmolLM2-135M: qkv (576 -> 576 + 2·192), o (576 -> 576), gate_up (576 -> 2·1536), down (1536 -> 576)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30


def median_seconds(step, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}; oneDNN in this vLLM build: {ops._supports_onednn}")
    weight, x = torch.randn(960, 576), torch.randn(4, 576)
    handle = ops.create_onednn_mm(weight.t(), 32)
    before = ops.onednn_mm(handle, x, None)
    weight.copy_(torch.randn(960, 576))
    after = ops.onednn_mm(handle, x, None)
    fresh = ops.onednn_mm(ops.create_onednn_mm(weight.t(), 32), x, None)
    print(f"copy_ into the weight changes the handle's answer: {not torch.equal(before, after)}")
    print(
        f"a handle built from the new weight answers differently from the old handle: "
        f"{not torch.equal(after, fresh)}"
    )

    weights = [torch.randn(n, k) for _ in range(LAYERS) for n, k in SHAPES]
    targets = [torch.empty_like(w) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    pack = median_seconds(lambda: [ops.create_onednn_mm(w.t(), 32) for w in weights])
    copy = median_seconds(lambda: [t.copy_(w) for t, w in zip(targets, weights, strict=True)])
    print(f"linear weights: {len(weights)} tensors, {nbytes / 1e6:.0f} MB")
    print(
        f"build oneDNN handles: {pack:.3f} s; copy_ of the same bytes: {copy:.3f} s; ratio {pack / copy:.1f}x"
    )


if __name__ == "__main__":
    main()
