"""End-to-end training step: PEFT against lora_kernels on a LLaMA-architecture model built from a config.

Default (GPU): 8 layers at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads), random weights, bf16, LoRA r = 16 on
every linear layer except lm_head, sequence 2048, batch ``--batch`` (4).  Modes AB and B-only, LoRA dropout 0 and
0.05, with and without gradient checkpointing.  Per configuration: median training-step time (forward, backward,
AdamW step) over ``--steps`` steps after warm-up, tokens/s, and peak memory; the ratios PEFT / ours are the targets
(≥ 1.25× throughput, ≥ 25% lower peak memory at dropout 0.05).

  python bench/bench_e2e.py            # GPU
  python bench/bench_e2e.py --smoke    # tiny CPU run exercising the script (no performance claim)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
import warnings
from typing import List

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # helpers; lora_kernels from this checkout
from utils import Budget, environment, markdown_table, plot_ratios, write_csv  # noqa: E402

from lora_kernels import inject_lora  # noqa: E402


def build_base(smoke: bool, device, dtype, layers: int = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=layers or 2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 8,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def adapt(base, provider: str, mode: str, p: float, r: int):
    model = copy.deepcopy(base)
    if provider == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=p, target_modules="all-linear"))
        if mode == "B":
            for n, prm in model.named_parameters():
                if "lora_A" in n:
                    prm.requires_grad_(False)
    else:
        inject_lora(model, "all-linear", r=r, lora_alpha=r, lora_dropout=p, mode=mode)
    with torch.no_grad():  # never time on zeros: a non-zero B like a model in training
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(std=1e-3)
    return model


def run_config(base, provider, mode, p, ckpt, r, batch, seq, steps, device) -> dict:
    model = adapt(base, provider, mode, p, r)
    model.train()
    if ckpt:
        with warnings.catch_warnings():  # renamed in transformers 5.x; the old name works on every version we run
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if provider == "peft":
            model.enable_input_require_grads()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = device == "cuda"
    for _ in range(2):  # warm-up: autotuning, allocator
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if cuda else 0.0
    ms = statistics.median(times)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return dict(provider=provider, mode=mode, dropout=p, ckpt=ckpt, ms=ms, tokens_per_s=batch * seq / ms * 1e3,
                peak_gib=peak, loss=float(loss.detach()), speedup_vs_peft="", memory_saving_vs_peft="", error="")


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new configuration after this many seconds (0: no limit); skipped ones are listed")
    args = ap.parse_args(argv)
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:  # checked before any model is built: the PEFT provider and the LLaMA config both need them
        raise SystemExit(f"bench_e2e.py needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    if args.smoke:
        device, dtype, batch, seq, steps = "cpu", torch.float32, 2, 16, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e needs a CUDA GPU (use --smoke for a CPU run of the script)")
        device, dtype, batch, seq, steps = "cuda", torch.bfloat16, args.batch, args.seq, args.steps
    print(f"# bench_e2e  {environment()}  batch {batch} seq {seq} r {args.r}")
    budget = Budget(args.budget_s)  # started before the model is built: building it counts too
    base = build_base(args.smoke, device, dtype)
    tag = "smoke" if args.smoke else "h100"
    csv_path = os.path.join(args.out, f"e2e_{tag}.csv")
    rows = []
    # The targets are at dropout 0.05: those configurations first, then dropout 0.
    for p in (0.05, 0.0):
        for ckpt in (False, True):
            for mode in ("AB", "B"):
                if not budget.allows(f"{mode} p={p} ckpt={ckpt}"):
                    continue
                pair = {}
                for provider in ("peft", "lora_kernels"):
                    try:
                        pair[provider] = run_config(base, provider, mode, p, ckpt, args.r, batch, seq, steps, device)
                    except torch.cuda.OutOfMemoryError as exc:  # record it and go on: the other rows still count
                        print(f"{provider} {mode} p={p} ckpt={ckpt}: out of memory ({str(exc)[:120]})", flush=True)
                        pair[provider] = dict(provider=provider, mode=mode, dropout=p, ckpt=ckpt, ms=float("nan"),
                                              tokens_per_s=float("nan"), peak_gib=float("nan"), loss=float("nan"),
                                              speedup_vs_peft="", memory_saving_vs_peft="", error="out of memory")
                        torch.cuda.empty_cache()
                speed = pair["peft"]["ms"] / pair["lora_kernels"]["ms"]
                mem = 1 - pair["lora_kernels"]["peak_gib"] / pair["peft"]["peak_gib"] if pair["peft"]["peak_gib"] else 0.0
                pair["lora_kernels"].update(speedup_vs_peft=speed, memory_saving_vs_peft=mem)
                rows += [pair["peft"], pair["lora_kernels"]]
                write_csv(csv_path, [pair["peft"], pair["lora_kernels"]])
                print(f"{mode} p={p} ckpt={ckpt}: PEFT {pair['peft']['ms']:.1f} ms {pair['peft']['peak_gib']:.2f} GiB, "
                      f"ours {pair['lora_kernels']['ms']:.1f} ms {pair['lora_kernels']['peak_gib']:.2f} GiB "
                      f"(speed-up {speed:.3f}x, memory saving {mem:.1%})", flush=True)
    cols = ["provider", "mode", "dropout", "ckpt", "ms", "tokens_per_s", "peak_gib", "speedup_vs_peft",
            "memory_saving_vs_peft", "loss"]
    print(markdown_table(rows, cols))
    print(f"# {budget.summary()}")
    plot_rows = [dict(x, case=f"{x['mode']} p{x['dropout']} {'ckpt' if x['ckpt'] else 'no-ckpt'}") for x in rows]
    plot_ratios(os.path.join(args.out, f"e2e_{tag}.png"), plot_rows, "case", "provider", "tokens_per_s",
                "training tokens/s (higher is better)")
    return rows


if __name__ == "__main__":
    main()
