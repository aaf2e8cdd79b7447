"""Main job: fine-tune a small model with FusedLoRALinear, save and reload the adapter, then benchmark (GPU).

1. A frozen random 3-layer MLP "base model" and a "fine-tuned" teacher that differs from it by a rank-4 change in
   every linear layer.  Inputs lie near a low-dimensional subspace (anisotropic, as real features do); that is
   the regime where a frozen random A loses little (with isotropic inputs B-only can only fit the part of ΔW
   inside A's row space).  Every nn.Linear of a copy of the base is replaced by ``FusedLoRALinear.from_linear`` (the
   base weights are shared, not copied) and trained to match the teacher in B-only mode (frozen Haar-orthogonal A,
   Zhu et al. 2024) and in AB mode, with LoRA dropout 0.05.  The loss is printed as it goes.
2. The adapter (only ``lora_A`` / ``lora_B``) is saved with ``torch.save`` and loaded back with
   ``torch.load(weights_only=True)`` into a freshly wrapped base model; outputs must match exactly.
3. With a CUDA GPU: ``bench/bench_lora_linear.py`` (the full sweep, or ``--quick``) and ``bench/bench_rsvd.py``
   (skipped with ``--quick``), results under bench/results/.

    python bench/demo.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear

HERE = os.path.dirname(os.path.abspath(__file__))


def make_base(d: int, hidden: int, device, dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d)).to(device=device, dtype=dtype).requires_grad_(False)


def make_teacher(base: nn.Sequential, rank: int) -> nn.Sequential:
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    for m in teacher:
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
            delta *= 0.5 * m.weight.float().std().item() / delta.std().item()
            m.weight.add_(delta.to(m.weight))
    return teacher


def wrap(base: nn.Sequential, mode: str, r: int) -> nn.Sequential:
    model = copy.deepcopy(base)  # its own copy of the base weights; from_linear then shares them
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            model[i] = FusedLoRALinear.from_linear(m, r=r, lora_alpha=2 * r, lora_dropout=0.05, mode=mode,
                                                   init_A="orthogonal")
    return model


def train(model, teacher, steps: int, d: int, device, dtype, label: str):
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"[{label}] trainable {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)")
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(2)
    latent = max(4, d // 8)
    embed = torch.linalg.qr(torch.randn(d, latent, generator=gen))[0].t() * (d / latent) ** 0.5

    def inputs(n):  # a latent-dim signal plus small isotropic noise
        z = torch.randn(n, latent, generator=gen) @ embed + 0.05 * torch.randn(n, d, generator=gen)
        return z.to(device=device, dtype=dtype)

    x_eval = inputs(1024)
    with torch.no_grad():
        y_eval = teacher(x_eval)
    first = None
    t0 = time.perf_counter()
    for step in range(steps + 1):
        model.train()
        x = inputs(512)
        with torch.no_grad():
            y = teacher(x)
        loss = (model(x).float() - y.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0:
            model.eval()
            with torch.no_grad():
                ev = (model(x_eval).float() - y_eval.float()).pow(2).mean().item()
            first = ev if first is None else first
            print(f"[{label}] step {step:4d}  train {loss.item():.5f}  eval {ev:.5f}")
    print(f"[{label}] eval loss {first:.5f} -> {ev:.5f} ({ev / first:.3f}x) in {time.perf_counter() - t0:.1f}s")
    return ev / first


def save_and_reload(model, base, mode: str, r: int, device, dtype) -> None:
    adapter = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.pt")
        torch.save(adapter, path)
        loaded = torch.load(path, weights_only=True)
    fresh = wrap(base, mode, r)
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing), (missing, unexpected)
    model.eval()
    fresh.eval()
    x = torch.randn(64, base[0].in_features, device=device, dtype=dtype)
    with torch.no_grad():
        same = torch.equal(model(x), fresh(x))
    print(f"[{mode}] adapter saved ({len(adapter)} tensors, "
          f"{sum(v.numel() * v.element_size() for v in adapter.values()) / 1024:.1f} KiB), reloaded: "
          f"outputs {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit("reloaded adapter gives different outputs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="GPU: benchmark only the target configuration")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    path = "Triton kernels" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "pure-PyTorch path (no GPU)"
    print(f"device {device}, dtype {dtype}, LoRA layer runs on: {path}")
    d, hidden, r = (1024, 4096, 8) if cuda else (64, 256, 8)
    base = make_base(d, hidden, device, dtype)
    teacher = make_teacher(base, rank=4)
    for mode in ("B", "AB"):
        torch.manual_seed(3)
        model = wrap(base, mode, r)
        ratio = train(model, teacher, args.steps, d, device, dtype, mode)
        if ratio > 0.5:
            raise SystemExit(f"[{mode}] training did not reduce the eval loss enough ({ratio:.3f}x)")
        save_and_reload(model, base, mode, r, device, dtype)
    if cuda and not args.no_bench:
        sys.path.insert(0, HERE)
        import bench_lora_linear
        import bench_rsvd

        bench_lora_linear.main(["--quick"] if args.quick else [])
        if not args.quick:
            bench_rsvd.main([])
    elif not cuda:
        print("no CUDA GPU: benchmarks skipped (bench/bench_lora_linear.py needs one)")


if __name__ == "__main__":
    main()
