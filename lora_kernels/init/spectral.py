"""Spectral adapter initialisations: LoRA-One (one-step full gradient), LoRA-GA, PiSSA.

LoRA-One (Zhang, Liu, Chen 2025, arXiv 2502.01235), as in the authors' final code (the first arXiv version
differed: it scaled by a step size instead of normalising by σ₁; that plain one-step form is ``step_size=η``):
    G = mean over batches of ∇_W L(W₀);  −G = U S Vᵀ (top r)
    B₀ = U_r diag(√S_r) / √(σ₁ γ),   A₀ = diag(√S_r) V_rᵀ / √(σ₁ γ),   γ = 128
so that B₀A₀ = [−G]_r / (σ₁ γ); with the authors' rsLoRA scale s = α/√r, s·B₀A₀ = (α/(γ√r))·[−G]_r/σ₁, a
normalised rank-r gradient step.  W₀ is not modified.  (The layer's own ``scaling`` is used as s: build the layers
with ``use_rslora=True`` to match the authors exactly.)
    step_size=η:  s·B₀A₀ = η·[−G]_r  (B₀ = U_r diag(√S_r)·√(η/s), A₀ = diag(√S_r) V_rᵀ·√(η/s)).

LoRA-GA (Wang et al. 2024, arXiv 2407.05000, authors' code): SVD of +G with 2r triplets; A₀ = V[:, :r]ᵀ,
B₀ = U[:, r:2r], both times out^{1/4}/√γ (γ = 16), and W₀ ← W₀ − s·B₀A₀ so the initial output is unchanged.

PiSSA (Meng et al. 2024): top-r SVD of W itself; A₀ = diag(√S) V_rᵀ/√s, B₀ = U_r diag(√S)/√s (so s·B₀A₀ = [W]_r),
and W₀ ← W₀ − s·B₀A₀ (the residual).

On a 4-bit base (``FusedLoRALinear4bit``, QLoRA) the frozen W is NF4 codes:
  * LoRA-One works unchanged: the collection takes G from the layer's own backward (``collect``), and W₀ is not
    modified.
  * LoRA-GA and PiSSA both rewrite W₀ (W₀ − s·B₀A₀), which on 4-bit codes means re-quantizing it: that moves every
    entry by up to half a quantization step, more than s·B₀A₀ itself, so the point of the offset (an unchanged
    initial output; PiSSA's exact residual) would be lost, and it cannot be undone.  They refuse such a model with a
    ValueError naming its 4-bit layers, before collecting anything or touching the model.  PEFT refuses PiSSA on a
    4-bit base too and recommends what works here as well: run the init on the 16-bit model, then quantize the
    resulting (residual) base.

All three send layers of equal (out, in, rank) through one batched ``rsvd`` call.  Factors are computed and
checked for every layer before anything in the model is written, so a failure leaves the model untouched.
A rank above min(in, out) is clamped to it (with a warning) and the extra rows of A / columns of B are zero.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import math_dtype
from lora_kernels.init.collect import (Collected, adapted_layers, collect_gradients, is_quantized, layer_device,
                                       shared_seed, sketch_frobenius2, sketch_svd)
from lora_kernels.modules import FusedLoRALinear
from lora_kernels.ops.rsvd import rsvd


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]
    rank: int
    seconds: float
    energy: float  # ‖[G]_r‖_F² / ‖G‖_F² (estimated from the sketch with method="sketch")
    top_singular_values: List[float]
    clamped: bool = False


@dataclass
class InitReport:
    init: str
    method: str
    num_batches: int
    seconds_collect: float
    seconds_svd: float
    layers: List[LayerReport] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.init} init ({self.method}, {self.num_batches} batches): gradient {self.seconds_collect:.2f}s, "
                 f"SVD {self.seconds_svd:.2f}s"]
        for lr in self.layers:
            top = ", ".join(f"{v:.3g}" for v in lr.top_singular_values[:4])
            lines.append(f"  {lr.name:40s} {lr.shape[0]}x{lr.shape[1]} r={lr.rank}{' (clamped)' if lr.clamped else ''}"
                         f"  energy {lr.energy:.3f}  σ [{top}]  {1e3 * lr.seconds:.1f} ms")
        return "\n".join(lines)


def _rank_for(layer: FusedLoRALinear, want: int, name: str) -> Tuple[int, bool]:
    limit = min(layer.in_features, layer.out_features)
    if want > limit:
        warnings.warn(f"{name}: rank {want} exceeds min(in, out) = {limit}; clamped to {limit}, the remaining "
                      f"adapter rows/columns are set to zero", stacklevel=3)
        return limit, True
    return want, False


def _grouped_svd(mats: Dict[str, torch.Tensor], ranks: Dict[str, int], devices: Dict[str, torch.device], seed: int,
                 negate: bool, rsvd_kwargs: Optional[dict] = None
                 ) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], Dict[str, float]]:
    """rsvd of each matrix (negated if asked), batched over layers of equal shape and rank."""
    groups: Dict[Tuple, List[str]] = {}
    for name, m in mats.items():
        groups.setdefault((tuple(m.shape), ranks[name], str(devices[name])), []).append(name)
    out, secs = {}, {}
    for (shape, rank, dev), all_names in groups.items():
        # At most _SVD_CHUNK matrices on the device at once (the accumulators may live on the CPU).
        for c in range(0, len(all_names), _SVD_CHUNK):
            names = all_names[c:c + _SVD_CHUNK]
            t0 = time.perf_counter()
            stack = torch.stack([mats[n].to(dev) for n in names])
            if negate:
                stack = stack.neg_()
            gen = torch.Generator(device=dev).manual_seed(seed + c)
            U, S, V = rsvd(stack, rank, generator=gen, **(rsvd_kwargs or {}))
            if stack.is_cuda:
                torch.cuda.synchronize(stack.device)
            dt = (time.perf_counter() - t0) / len(names)
            for i, n in enumerate(names):
                out[n] = (U[i], S[i], V[i])
                secs[n] = dt
            del stack
    return out, secs


_SVD_CHUNK = 32


def _refuse_shared_weights(layers: Dict[str, FusedLoRALinear], init: str) -> None:
    seen: Dict[int, str] = {}
    for n, m in layers.items():
        if id(m.weight) in seen:
            raise ValueError(f"{init} modifies W, but layers {seen[id(m.weight)]!r} and {n!r} share one weight "
                             f"(tied weights): exclude one of them")
        seen[id(m.weight)] = n


def _refuse_quantized(layers: Dict[str, FusedLoRALinear], init: str) -> None:
    """``init`` rewrites W₀, which a 4-bit base cannot take without a lossy re-quantization (module docstring)."""
    names = [n for n, m in layers.items() if is_quantized(m)]
    if names:
        shown = ", ".join(repr(n) for n in names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
        which = f"layer {shown} has" if len(names) == 1 else f"layers {shown} have"
        raise ValueError(f"{init} rewrites the frozen base weight (W0 - s·B0A0), but {which} a 4-bit "
                         f"base: writing it would re-quantize W (each entry moves by up to half a quantization step, "
                         f"more than the offset itself) and cannot be undone.  Run {init} on the model with a 16-bit "
                         f"base and quantize the resulting base afterwards, or use lora_one_init, which leaves W "
                         f"unchanged; the model was not changed")


def _pad(factor_rows: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-pad along ``dim`` up to r (rank clamping)."""
    missing = r - factor_rows.shape[dim]
    if missing <= 0:
        return factor_rows
    shape = list(factor_rows.shape)
    shape[dim] = missing
    return torch.cat([factor_rows, factor_rows.new_zeros(shape)], dim=dim)


def _commit(layers: Dict[str, FusedLoRALinear], new_A: Dict[str, torch.Tensor], new_B: Dict[str, torch.Tensor],
            new_W: Optional[Dict[str, torch.Tensor]] = None, modified_by: str = "") -> None:
    for name, t in list(new_A.items()) + list(new_B.items()) + list((new_W or {}).items()):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"initialisation of layer {name!r} produced NaN/Inf; the model was not changed")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank computed the same factors from the same all-reduced statistics, but BLAS may round them
        # differently (seen: 1e-16 differences between two CPU processes); rank 0's result is made everyone's.
        for table in (new_A, new_B, new_W or {}):
            for name in sorted(table):
                t = table[name].contiguous()
                torch.distributed.broadcast(t, src=0)
                table[name] = t
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A.copy_(new_A[name].to(m.lora_A))
            m.lora_B.copy_(new_B[name].to(m.lora_B))
            if new_W is not None and name in new_W:
                m.out_in_weight.copy_(new_W[name].to(m.weight))  # a view of weight: Conv1D stores W transposed
                m.base_modified_by = modified_by  # save_adapter warns: the adapter needs this modified base


def _gradient_factors(collected: Collected, layers: Dict[str, FusedLoRALinear], ranks: Dict[str, int], seed: int,
                      negate: bool, rsvd_kwargs: Optional[dict] = None):
    """Top-rank SVD of ∓G per layer: (factors, seconds per layer, energy per layer)."""
    devices = {n: layer_device(m) for n, m in layers.items()}
    if collected.method == "exact":
        fac, secs = _grouped_svd(collected.grads, ranks, devices, seed, negate, rsvd_kwargs)
        energy = {n: float(fac[n][1].double().pow(2).sum() / collected.grads[n].double().pow(2).sum().clamp_min(1e-300))
                  for n in layers}
        return fac, secs, energy
    fac, secs, energy = {}, {}, {}
    for n in layers:
        t0 = time.perf_counter()
        U, S, V = sketch_svd(collected.sketches[n], ranks[n])
        if negate:
            U = -U
        fac[n] = (U.to(devices[n]), S.to(devices[n]), V.to(devices[n]))
        secs[n] = time.perf_counter() - t0
        energy[n] = min(1.0, float(S.double().pow(2).sum()) / max(sketch_frobenius2(collected.sketches[n]), 1e-300))
    return fac, secs, energy


@dataclass
class _GradientSVD:
    layers: Dict[str, FusedLoRALinear]
    ranks: Dict[str, int]
    clamped: Dict[str, bool]
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    seconds: Dict[str, float]
    energy: Dict[str, float]
    num_batches: int
    seconds_collect: float
    t_svd_start: float


def _gradient_svd(model, batches, loss_fn, *, svd_rank: Callable[[FusedLoRALinear, int], int], sketch_k: int,
                  negate: bool, num_batches, method, generator, progress, accumulate_on, oversample, niter,
                  sketch_size) -> _GradientSVD:
    """The shared engine of the gradient inits: clamp ranks, collect G, top-``svd_rank`` SVD of ∓G per layer."""
    layers = dict(adapted_layers(model))
    ranks, clamped = {}, {}
    for n, m in layers.items():
        r, clamped[n] = _rank_for(m, m.r, n)
        ranks[n] = svd_rank(m, r)
        if method == "sketch" and sketch_size is not None and sketch_size <= ranks[n]:
            raise ValueError(f"sketch_size={sketch_size} must exceed the {ranks[n]} singular triplets layer {n!r} "
                             f"needs (at least {ranks[n] + 1})")
    seed = shared_seed(generator)
    t0 = time.perf_counter()
    collected = collect_gradients(model, batches, loss_fn, num_batches=num_batches, method=method,
                                  sketch_rank={n: sketch_size or sketch_k * ranks[n] + 1 for n in layers},
                                  accumulate_on=accumulate_on, seed=seed, progress=progress)
    t1 = time.perf_counter()
    fac, secs, energy = _gradient_factors(collected, layers, ranks, seed, negate,
                                          rsvd_kwargs=dict(oversample=oversample, niter=niter))
    return _GradientSVD(layers, ranks, clamped, fac, secs, energy, collected.num_batches, t1 - t0, t1)


def _check_gamma(gamma) -> None:
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise ValueError(f"gamma must be positive, got {gamma!r}")


def lora_one_init(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, *, gamma: float = 128.0,
                  step_size: Optional[float] = None, num_batches: Optional[int] = None, method: str = "exact",
                  generator: Optional[torch.Generator] = None, progress: bool = True,
                  accumulate_on: Optional[str] = None, oversample: Optional[int] = None,
                  niter: Optional[int] = 16, sketch_size: Optional[int] = None) -> InitReport:
    """Initialise every FusedLoRALinear in ``model`` (4-bit bases included) from the top-r SVD of the negated
    one-step full gradient.

    batches: an iterable of batches; ``num_batches`` caps how many are used.  loss_fn(model, batch) -> scalar loss
    (default: ``model(**batch).loss`` or ``model(batch)``).  method: ``"exact"`` (fp32 accumulator per layer,
    ``accumulate_on="cpu"`` to keep them off the GPU) or ``"sketch"`` (streaming sketches, O((in+out)·k) memory).
    oversample / niter: passed to ``rsvd`` (method="exact") to trade time for accuracy.  niter defaults to 16, the
    authors' ``svd_lowrank(niter=16)``: on a layer-like gradient with σ_r/σ_(r+1) = 1.02 it gives 2.5e-6 relative
    error on ΔW where rsvd's own default (6) gives 4.2e-3 (docs/inits.md), for about 2-3× rsvd's default time, once.
    sketch_size: k of the sketches (method="sketch"; default 4r+1, see docs/inits.md for the measured trade-off).
    """
    _check_gamma(gamma)
    if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
        raise ValueError(f"step_size must be a positive float or None, got {step_size!r}")
    g = _gradient_svd(model, batches, loss_fn, svd_rank=lambda m, r: r, sketch_k=4, negate=True,
                      num_batches=num_batches, method=method, generator=generator, progress=progress,
                      accumulate_on=accumulate_on, oversample=oversample, niter=niter, sketch_size=sketch_size)
    new_A, new_B, reports = {}, {}, []
    for n, m in g.layers.items():
        U, S, V = g.factors[n]
        s1 = float(S[0])
        if not s1 > 0:
            raise ValueError(f"the gradient of layer {n!r} is zero (is the layer used by the loss?)")
        root = S.clamp_min(0).sqrt()
        c = math.sqrt(step_size / m.scaling) if step_size is not None else 1.0 / math.sqrt(s1 * gamma)
        new_B[n] = _pad(U * root * c, m.r, 1)
        new_A[n] = _pad((V * root * c).mT, m.r, 0)
        reports.append(LayerReport(n, (m.out_features, m.in_features), g.ranks[n], g.seconds[n], g.energy[n],
                                   S.tolist(), g.clamped[n]))
    _commit(g.layers, new_A, new_B)
    return InitReport("LoRA-One", method, g.num_batches, g.seconds_collect, time.perf_counter() - g.t_svd_start,
                      reports)


def lora_ga_init(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, *, gamma: float = 16.0,
                 num_batches: Optional[int] = None, method: str = "exact", generator: Optional[torch.Generator] = None,
                 progress: bool = True, accumulate_on: Optional[str] = None, oversample: Optional[int] = None,
                 niter: Optional[int] = None, sketch_size: Optional[int] = None) -> InitReport:
    """LoRA-GA: A₀ = V[:, :r]ᵀ, B₀ = U[:, r:2r] of the SVD of +G, both × out^{1/4}/√γ; W₀ ← W₀ − s·B₀A₀.
    A model with a 4-bit layer is refused (ValueError; module docstring)."""
    _check_gamma(gamma)
    _refuse_quantized(dict(adapted_layers(model)), "LoRA-GA")
    _refuse_shared_weights(dict(adapted_layers(model)), "LoRA-GA")
    g = _gradient_svd(model, batches, loss_fn, svd_rank=lambda m, r: min(2 * r, m.in_features, m.out_features),
                      sketch_k=2, negate=False, num_batches=num_batches, method=method, generator=generator,
                      progress=progress, accumulate_on=accumulate_on, oversample=oversample, niter=niter,
                      sketch_size=sketch_size)
    new_A, new_B, new_W, reports = {}, {}, {}, []
    for n, m in g.layers.items():
        U, S, V = g.factors[n]
        r = m.r
        c = m.out_features ** 0.25 / math.sqrt(gamma)
        a = V[:, :r].mT * c
        b = U[:, r:2 * r] * c
        A0, B0 = _pad(a, r, 0), _pad(b, r, 1)
        new_A[n], new_B[n] = A0, B0
        mdt = math_dtype(m.weight)
        new_W[n] = (m.out_in_weight.detach().to(mdt) - m.scaling * (B0.to(mdt) @ A0.to(mdt))).to(m.weight.dtype)
        reports.append(LayerReport(n, tuple(m.out_in_weight.shape), min(r, g.ranks[n]), g.seconds[n], g.energy[n], S.tolist(),
                                   g.clamped[n] or 2 * r > g.ranks[n]))
    _commit(g.layers, new_A, new_B, new_W, modified_by="LoRA-GA")
    return InitReport("LoRA-GA", method, g.num_batches, g.seconds_collect, time.perf_counter() - g.t_svd_start,
                      reports)


def pissa_init(model: nn.Module, *, generator: Optional[torch.Generator] = None, oversample: Optional[int] = None,
               niter: Optional[int] = None) -> InitReport:
    """PiSSA: adapters from the top-r SVD of each frozen weight, which keeps only the residual W − [W]_r.

    oversample / niter: passed to ``rsvd`` (random linear weights have flat spectra: raise them for accuracy).
    A model with a 4-bit layer is refused (ValueError; module docstring)."""
    layers = dict(adapted_layers(model))
    _refuse_quantized(layers, "PiSSA")
    _refuse_shared_weights(layers, "PiSSA")
    ranks, clamped = {}, {}
    for n, m in layers.items():
        ranks[n], clamped[n] = _rank_for(m, m.r, n)
    seed = shared_seed(generator)
    t0 = time.perf_counter()
    weights = {n: m.out_in_weight.detach().to(math_dtype(m.weight)) for n, m in layers.items()}
    fac, secs = _grouped_svd(weights, ranks, {n: m.weight.device for n, m in layers.items()}, seed, negate=False,
                             rsvd_kwargs=dict(oversample=oversample, niter=niter))
    new_A, new_B, new_W, reports = {}, {}, {}, []
    for n, m in layers.items():
        U, S, V = fac[n]
        root = S.clamp_min(0).sqrt() / math.sqrt(m.scaling)
        A0, B0 = _pad((V * root).mT, m.r, 0), _pad(U * root, m.r, 1)
        new_A[n], new_B[n] = A0, B0
        new_W[n] = (weights[n] - m.scaling * (B0.to(weights[n].dtype) @ A0.to(weights[n].dtype))).to(m.weight.dtype)
        energy = float(S.double().pow(2).sum() / weights[n].double().pow(2).sum().clamp_min(1e-300))
        reports.append(LayerReport(n, tuple(m.out_in_weight.shape), ranks[n], secs[n], energy, S.tolist(), clamped[n]))
    _commit(layers, new_A, new_B, new_W, modified_by="PiSSA")
    return InitReport("PiSSA", "rsvd", 0, 0.0, time.perf_counter() - t0, reports)
