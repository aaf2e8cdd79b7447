"""Main job: the whole path on whatever machine it lands on, then the benchmarks where a GPU exists.

1. A small LLaMA-architecture transformer built from a config (random weights, nothing downloaded) is pretrained
   briefly on a synthetic language (an affine walk over 64 tokens), then fine-tuned on a shifted rule.
2. ``inject_lora`` puts FusedLoRALinear adapters on every linear layer; ``lora_one_init`` initialises them from
   the one-step gradient; a short training run in B-only mode (frozen A) and in AB mode prints the loss.  Every
   loss printed is on one held-out eval set: the base model's, right after the init (step 0), during training.
3. ``save_adapter`` writes the adapter in PEFT's format; ``load_adapter`` reads it into a fresh copy of the base;
   the logits must match exactly (and so must PEFT's own ``PeftModel.from_pretrained`` when peft is installed).
4. QLoRA (skip with ``--no-qlora``): the same base quantized to 4-bit NF4 (``quantize_model``, bitsandbytes'
   layout, double quantization), LoRA-One init and B-only training on it, the same eval set and reload check.
5. With a CUDA GPU: ``bench/bench_lora_linear.py`` (full sweep, or ``--quick``), then ``bench/bench_rsvd.py`` and
   ``bench/bench_e2e.py`` (skipped with ``--quick``).

    python bench/demo.py [--quick] [--steps N] [--no-bench] [--no-qlora]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # helpers; lora_kernels from this checkout
from lora_kernels import (inject_lora, load_adapter, lora_one_init, quantize_model, save_adapter,  # noqa: E402
                          trainable_parameters)
from lora_kernels.optim import PreconditionedAdamW  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
V, T = 64, 32


def sequences(n, gen, shift=0, device="cpu"):
    a = torch.randint(1, 8, (n, 1), generator=gen)
    b = torch.randint(0, V, (n, 1), generator=gen)
    x0 = torch.randint(0, V, (n, 1), generator=gen)
    steps = torch.arange(T + 1)
    seq = (x0 + steps * (a + shift) + b * (steps > 0)) % V
    return seq.to(device)


def build_base(device, dtype, pretrain_steps):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=T + 1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(pretrain_steps):
        ids = sequences(64, gen, device=device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"base model: pretrained {pretrain_steps} steps on the synthetic language, loss {loss.item():.3f}")
    return model.to(dtype).eval()


def eval_loss(model, eval_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=eval_ids, labels=eval_ids).loss.item()


def finetune(base, mode, steps, device, batches_for_init, eval_ids, base_eval, tag=None):
    tag = tag or mode
    model = inject_lora(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16, lora_dropout=0.05, mode=mode,
                        use_rslora=True, init_A="orthogonal")
    mode = tag
    print(f"[{mode}] {trainable_parameters(model)}")
    report = lora_one_init(model, batches_for_init, lambda m, ids: m(input_ids=ids, labels=ids).loss,
                           progress=False)
    print(f"[{mode}] LoRA-One init from {report.num_batches} batches in "
          f"{report.seconds_collect + report.seconds_svd:.2f}s; captured gradient energy per layer "
          f"{min(lr.energy for lr in report.layers):.2f}-{max(lr.energy for lr in report.layers):.2f}")
    # Same eval set as the base model's loss printed before: step 0 is the loss right after the LoRA-One init.
    opt = PreconditionedAdamW.from_model(model, lr=2e-3)
    gen = torch.Generator().manual_seed(5)
    t0 = time.perf_counter()
    for step in range(steps + 1):
        if step % max(1, steps // 4) == 0:
            ev = eval_loss(model, eval_ids)
            what = f"  right after LoRA-One init (base model: {base_eval:.4f})" if step == 0 else ""
            print(f"[{mode}] step {step:4d}  eval loss {ev:.4f}{what}")
            model.train()
        if step == steps:
            break
        ids = sequences(32, gen, shift=3, device=device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"[{mode}] {steps} steps in {time.perf_counter() - t0:.1f}s")
    return model.eval()


def save_reload_check(model, base, mode, device, peft_check=True):
    ids = sequences(8, torch.Generator().manual_seed(9), shift=3, device=device)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, base_model_name_or_path="synthetic-llama")
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        fresh = load_adapter(copy.deepcopy(base), tmp).eval()
        with torch.no_grad():
            got = fresh(input_ids=ids).logits
        same = torch.equal(got, want)
        print(f"[{mode}] adapter saved in PEFT format ({size / 1024:.0f} KiB) and reloaded: logits "
              f"{'identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit("reloaded adapter gives different logits")
        if not peft_check:
            return
        try:
            import peft
        except ImportError:
            return
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        with torch.no_grad():
            diff = (theirs(input_ids=ids).logits - want).abs().max().item()
        print(f"[{mode}] the same adapter loaded by PEFT {peft.__version__}: max |Δlogit| {diff:.2e}")


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (a 4-bit base's codes and scales are buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def qlora_section(base, steps, device, init_batches, eval_ids, base_eval):
    """The QLoRA run: the base quantized to NF4 (double quantization, lm_head and embeddings kept), LoRA-One and
    B-only training on the 4-bit base; PEFT cannot load an adapter onto our NF4Linear layers, so only our reload."""
    q_base = quantize_model(copy.deepcopy(base))
    q_eval = eval_loss(q_base, eval_ids)
    print(f"[QLoRA] base quantized to NF4: {weight_bytes(base) / 2**20:.2f} → {weight_bytes(q_base) / 2**20:.2f} MiB "
          f"of weights (embeddings and lm_head stay {str(next(base.parameters()).dtype).replace('torch.', '')}); "
          f"eval loss {base_eval:.4f} → {q_eval:.4f} from quantization alone")
    model = finetune(q_base, "B", steps, device, init_batches, eval_ids, q_eval, tag="QLoRA B")
    save_reload_check(model, q_base, "QLoRA B", device, peft_check=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="GPU: benchmark only the target configuration")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-qlora", action="store_true", help="skip the QLoRA (4-bit NF4 base) run")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    path = "Triton kernels" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "pure-PyTorch path (no GPU)"
    print(f"device {device}, dtype {dtype}; the LoRA layers run on: {path}")
    base = build_base(device, dtype, args.pretrain_steps)
    init_batches = [sequences(32, torch.Generator().manual_seed(100 + i), shift=3, device=device) for i in range(4)]
    # One held-out eval set for every loss printed from here on (base model, after init, during training).
    eval_ids = sequences(128, torch.Generator().manual_seed(6), shift=3, device=device)
    base_eval = eval_loss(base, eval_ids)
    print(f"fine-tuning task (shifted rule), eval set of {eval_ids.shape[0]} sequences: base model eval loss "
          f"{base_eval:.4f}")
    for mode in ("B", "AB"):
        model = finetune(base, mode, args.steps, device, init_batches, eval_ids, base_eval)
        save_reload_check(model, base, mode, device)
    if not args.no_qlora:
        qlora_section(base, args.steps, device, init_batches, eval_ids, base_eval)
    if cuda and not args.no_bench:
        sys.path.insert(0, HERE)
        import bench_e2e
        import bench_lora_linear
        import bench_rsvd

        bench_lora_linear.main(["--quick"] if args.quick else [])
        if not args.quick:
            bench_rsvd.main([])
            bench_e2e.main([])
    elif not cuda:
        print("no CUDA GPU: GPU benchmarks skipped (bench_lora_linear.py, bench_rsvd.py, bench_e2e.py); the PyTorch "
              "path against nn.Linear and PEFT on this CPU: python3 bench/bench_lora_linear.py --device cpu")


if __name__ == "__main__":
    main()
