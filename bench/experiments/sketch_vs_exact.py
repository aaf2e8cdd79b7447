"""LoRA-One gradient SVD: streaming sketches (method="sketch") against exact accumulation, on a small transformer.

No weights can be downloaded here, so the "real small model" is made real by training: a 2-layer GPT-style
transformer (d=128, 4 heads, MLP 512, vocab 64) is pretrained on a synthetic language (token t+1 = (a·t + b) mod 64
with per-sequence a, b), then every nn.Linear (q, k, v, o, up, down) is wrapped in FusedLoRALinear (r = 8) and the
one-step gradient is taken on a shifted task (a different modulus rule), as in fine-tuning.  For each layer we
report the largest principal-angle sine between the sketch's and the exact top-r left and right subspaces, and
the energy of G that the sketch's rank-r approximation captures relative to the optimal [−G]_r, the mean cos² of
the principal angles, and the largest principal-angle sine (harsh when the spectrum has small gaps), for sketch
sizes k = 2r+1 and 4r+1; then the fine-tuning loss right after a LoRA-One init with each method.

  python bench/experiments/sketch_vs_exact.py      # prints a markdown table (recorded in docs/inits.md)
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(os.path.dirname(_HERE))]  # helpers; lora_kernels from this checkout
from lora_kernels import FusedLoRALinear, lora_one_init  # noqa: E402
from lora_kernels.init.collect import collect_gradients, sketch_svd  # noqa: E402
from lora_kernels.ops.rsvd import principal_sine  # noqa: E402

V, D, H, L, T = 64, 128, 4, 2, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        h = self.ln1(x)
        b, t, _ = h.shape
        q, k, v = (f(h).view(b, t, H, D // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def sequences(n, gen, shift=0):
    a = torch.randint(1, 8, (n, 1), generator=gen)
    b = torch.randint(0, V, (n, 1), generator=gen)
    x0 = torch.randint(0, V, (n, 1), generator=gen)
    steps = torch.arange(T + 1)
    seq = (x0 * (a ** 0) + steps * (a + shift) + b * (steps > 0)) % V  # a simple, learnable affine-walk language
    return seq[:, :-1], seq[:, 1:]


def lm_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def main(pretrain_steps: int = 300, r: int = 8, num_batches: int = 8):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(pretrain_steps):
        loss = lm_loss(model, sequences(64, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pretrained {pretrain_steps} steps: loss {loss.item():.3f}")
    for blk in model.blocks:  # wrap every linear of the blocks (the head stays frozen, as PEFT's all-linear)
        for name in ("q", "k", "v", "o", "up", "down"):
            setattr(blk, name, FusedLoRALinear.from_linear(getattr(blk, name), r=r, lora_alpha=r, use_rslora=True))
    model.requires_grad_(False)
    fgen = torch.Generator().manual_seed(1)
    batches = [sequences(64, fgen, shift=3) for _ in range(num_batches)]
    print(f"fine-tuning task loss before: {sum(lm_loss(model, b).item() for b in batches) / len(batches):.3f}")
    exact = collect_gradients(model, batches, lm_loss, method="exact", progress=False)
    sketches = {mult: collect_gradients(model, batches, lm_loss, method="sketch", progress=False, seed=1,
                                        sketch_rank={n: mult * r + 1 for n in exact.grads})
                for mult in (2, 4)}
    rows = ["| layer | shape | energy of [−G]_r | k=2r+1: captured / optimal | mean cos² | max sinΘ | "
            "k=4r+1: captured / optimal | mean cos² | max sinΘ | memory / G (2r+1, 4r+1) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {2: [], 4: []}
    for name, g in exact.grads.items():
        G = -g.double()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        optimal = float(S[:r].pow(2).sum())
        cells = []
        mems = []
        for mult, coll in sketches.items():
            Us, _, Vs = sketch_svd(coll.sketches[name], r)
            Us, Vs = -Us.double(), Vs.double()
            Uq, Vq = torch.linalg.qr(Us)[0], torch.linalg.qr(Vs)[0]
            captured = float((Uq.mT @ G @ Vq).pow(2).sum()) / optimal  # energy of G in the sketch's subspaces
            cos2 = 0.5 * (float((Uq.mT @ U[:, :r]).pow(2).sum()) + float((Vq.mT @ Vh[:r].mT).pow(2).sum())) / r
            sin = max(float(principal_sine(Us, U[:, :r])), float(principal_sine(Vs, Vh[:r].mT)))
            summary[mult].append(captured)
            cells += [f"{captured:.3f}", f"{cos2:.3f}", f"{sin:.2f}"]
            sk = coll.sketches[name]
            mems.append(f"{(sk.Y.numel() + sk.W.numel()) / g.numel():.2f}")
        energy = optimal / float(S.pow(2).sum())
        rows.append(f"| {name} | {g.shape[0]}×{g.shape[1]} | {energy:.3f} | " + " | ".join(cells) + f" | {', '.join(mems)} |")
    table = "\n".join(rows)
    print(table)
    for mult, caps in summary.items():
        print(f"k={mult}r+1: captured/optimal energy min {min(caps):.3f}, mean {sum(caps) / len(caps):.3f}")
    # and the end-to-end effect: one LoRA-One init with each method, loss on the fine-tuning task afterwards
    for method, size in (("exact", None), ("sketch", 2), ("sketch", 4)):
        m = copy.deepcopy(model)
        lora_one_init(m, batches, lm_loss, method=method, step_size=2.0, progress=False,
                      **({"sketch_size": size * r + 1} if size else {}))
        with torch.no_grad():
            after = sum(lm_loss(m, b).item() for b in batches) / len(batches)
        print(f"loss after LoRA-One init (step_size=2.0, {method}{f', k={size}r+1' if size else ''}): {after:.3f}")
    return table


if __name__ == "__main__":
    main()
