"""The swap's merge path on a GPU at 8B scale, with plain torch (no vLLM needed): how close to the
memory floors, and whether the device merge gives the host's bits.

    python bench/swap_device.py                 # CUDA, Llama-3-8B shapes, bf16 (under 5 minutes)
    python bench/swap_device.py --tiny --device cpu   # the same code on a tiny model, seconds

Random bf16 tensors shaped like Llama-3-8B (32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab
128256, untied lm_head) stand in for the base; two deltas of it are encoded on the device with the
project's codecs: `exact` (the dense codec: bf16 values + fp32 corrections, bit-exact post) and
`int4` (group 128). For each delta the merge — decode on the device, then base + Δ in fp32 chunks
cast to bf16 (deltas.mix.merge_tensor, what the engine worker runs) — writes into preallocated
device tensors, from
- a device-resident base (DELTAGATE_SWAP_RESIDENCY=device), and
- a base in pinned host memory (the default on GPU engines: each tensor copied host -> device first),
against floors measured in the same run: a device copy_ and an add of the same bytes (HBM), and a
pinned host -> device copy of the base (PCIe). Then a sample of tensors is merged again on the
host from the same payloads, and compared bit for bit with the device's result.

Last, the prepared commit's two forms on this device (loaders/prepared.py), from the staged (merged)
tensors into the live weights, as nn.Parameters:
- copy: `live.data.copy_(staged)` per tensor, what loaders/prepared.PreparedCommit.commit runs. On the
  CUDA build the unquantized linear method has no post-load processing, so the staged tensor *is* the
  kernel's input; a copy keeps every pointer a CUDA graph captured valid. Costs the HBM copy floor.
- pointer swap: `live.data = staged` per tensor: no bytes move, but a CUDA graph captured the old
  addresses and would go on reading them: safe only for an engine run eagerly (--enforce-eager), and
  the staged memory becomes the live one (no second copy freed). Not what the engine does; measured
  to show what the copy costs beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltas import merge_tensor  # noqa: E402
from deltas.codecs import TensorSource  # noqa: E402
from deltas.codecs.dense import DenseCodec  # noqa: E402
from deltas.codecs.quant import Int4Codec, Int4Params  # noqa: E402

LLAMA3_8B = {"layers": 32, "hidden": 4096, "mlp": 14336, "kv": 1024, "vocab": 128256}
TINY = {"layers": 2, "hidden": 256, "mlp": 512, "kv": 64, "vocab": 1024}


def shapes(c: dict) -> dict[str, list[int]]:
    """Checkpoint tensor names and shapes of a Llama with these dimensions."""
    h, out = c["hidden"], {"model.embed_tokens.weight": [c["vocab"], c["hidden"]]}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
            p + "self_attn.q_proj.weight": [h, h],
            p + "self_attn.k_proj.weight": [c["kv"], h],
            p + "self_attn.v_proj.weight": [c["kv"], h],
            p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [c["mlp"], h],
            p + "mlp.up_proj.weight": [c["mlp"], h],
            p + "mlp.down_proj.weight": [h, c["mlp"]],
        }
    return out | {"model.norm.weight": [h], "lm_head.weight": [c["vocab"], h]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, repeats: int = 2) -> float:
    """Best of `repeats` wall-clock seconds of fn(), synchronised."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of Llama-3-8B's shapes")
    parser.add_argument("--sample", type=int, default=6, help="tensors compared bit for bit with the host")
    args = parser.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    layout = shapes(TINY if args.tiny else LLAMA3_8B)
    g = torch.Generator(device=device).manual_seed(0)
    params = sum(torch.Size(s).numel() for s in layout.values())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device
    print(f"device: {gpu}; {params / 1e9:.3f}B parameters, bf16", flush=True)

    base = {n: (torch.randn(s, generator=g, device=device) * 0.02).bfloat16() for n, s in layout.items()}
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    payloads: dict[str, dict] = {"exact": {}, "int4": {}}
    codecs = {"exact": DenseCodec(), "int4": Int4Codec(Int4Params(group=128))}
    for name, b in base.items():
        post = (b.float() + torch.randn(b.shape, generator=g, device=device) * 1e-3).bfloat16()
        delta = (post.double() - b.double()).float()
        payloads["exact"][name] = codecs["exact"].encode(TensorSource(name, delta, b, post)).payload
        payloads["int4"][name] = codecs["int4"].encode(TensorSource(name, delta)).payload
        del post, delta
    took = time.perf_counter() - t0
    print(f"base {nbytes / 1e9:.2f} GB and two deltas encoded on {device} in {took:.0f} s", flush=True)

    out = {n: torch.empty_like(t) for n, t in base.items()}  # the engine's weights, preallocated
    pinned = {
        n: (t.cpu().pin_memory() if device.type == "cuda" else t.cpu().clone()) for n, t in base.items()
    }

    def merge_all(kind: str, from_host: bool) -> None:
        codec = codecs[kind]
        for name, b in (pinned if from_host else base).items():
            src = b.to(device, non_blocking=True) if from_host else b
            delta = codec.decode(payloads[kind][name], layout[name])
            merge_tensor(src, [(delta, 1.0)], torch.bfloat16, out=out[name])

    def upload() -> None:
        for n, t in pinned.items():
            out[n].copy_(t, non_blocking=True)

    floors = {
        "HBM copy": timed(device, lambda: [out[n].copy_(t) for n, t in base.items()]),
        "HBM add": timed(device, lambda: [torch.add(t, t, out=out[n]) for n, t in base.items()]),
        "host->device copy": timed(device, upload),
    }
    print("\n| what | seconds | GB/s of the base's bytes | x floor |")
    print("|---|---:|---:|---:|")
    for what, seconds in floors.items():
        print(f"| floor: {what} | {seconds:.4f} | {nbytes / seconds / 1e9:.0f} | |")
    for kind in ("exact", "int4"):
        for from_host in (False, True):
            seconds = timed(device, lambda kind=kind, from_host=from_host: merge_all(kind, from_host))
            floor = floors["host->device copy"] if from_host else floors["HBM copy"]
            where = "pinned host" if from_host else "device"
            print(
                f"| merge {kind} delta, base on {where} | {seconds:.4f} | {nbytes / seconds / 1e9:.0f} | "
                f"{seconds / floor:.1f}x {'H2D' if from_host else 'HBM copy'} |",
                flush=True,
            )

    live = {n: torch.nn.Parameter(torch.empty_like(t), requires_grad=False) for n, t in out.items()}
    commits = {
        "commit by copy_ (CUDA graph safe)": lambda: [live[n].data.copy_(t) for n, t in out.items()],
        "commit by pointer swap (eager only)": lambda: [setattr(live[n], "data", t) for n, t in out.items()],
    }
    for what, commit in commits.items():
        seconds = timed(device, commit)
        print(
            f"| {what} | {seconds:.4f} | {nbytes / seconds / 1e9:.0f} | "
            f"{seconds / floors['HBM copy']:.2f}x HBM copy |",
            flush=True,
        )

    names = list(base)
    step = max(1, len(names) // args.sample)
    sample = names[::step][: args.sample] + ["lm_head.weight"]
    same = 0
    for kind in ("exact", "int4"):
        merge_all(kind, from_host=False)
        sync(device)
        for name in sample:
            host_payload = {k: v.cpu() for k, v in payloads[kind][name].items()}
            host = merge_tensor(
                base[name].cpu(), [(codecs[kind].decode(host_payload, layout[name]), 1.0)], torch.bfloat16
            )
            equal = torch.equal(host, out[name].cpu())
            same += equal
            if not equal:
                diff = (host != out[name].cpu()).sum().item()
                print(f"DIFFERS: {kind} {name}: {diff} elements")
    total = 2 * len(sample)
    print(f"\nbit-identical to the host merge: {same}/{total} sampled tensors (exact and int4)")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    sys.exit(0 if same == total else 1)


if __name__ == "__main__":
    main()
