"""Collect G = mean over batches of ∇_W L at the frozen weights W of every FusedLoRALinear, without ever holding
every layer's full gradient in ``.grad``.

How, for a dense base (nn.Linear / Conv1D): for the duration of the collection each adapted frozen weight is made
to require grad and gets a post-accumulate-grad hook; every other parameter is frozen, so nothing else accumulates
a gradient.  When autograd has written a batch gradient into ``W.grad`` the hook folds it into the layer's collector
and sets ``W.grad = None``: a full gradient exists for one layer of one batch at a time, and only transiently.

How, for a 4-bit base (``FusedLoRALinear4bit``): its W is packed NF4 codes, which cannot require grad, so the layer's
own forward and backward supply the gradient's factors, ∂L/∂W = gᵀx with x the layer's input and g = ∂L/∂y.  A
forward hook passes the layer's output through ``_FoldGradient``, an autograd node that saves x (as an autograd
saved tensor, so activation checkpointing and saved-tensor hooks treat it as they treat a dense W's saved input),
returns a copy of y (a fresh tensor, not a view: in-place ops downstream stay legal) and, in backward, folds
g2dᵀx2d into the collector and passes g on unchanged.  x and g are taken in the dtype the layer's product used (its
compute dtype, or autocast's) and upcast to the accumulator's (fp32; fp64 for fp64 layers).  For that node to run
the layer's output must require grad even though everything is frozen: each 4-bit layer's ``lora_B`` is made to
require grad for the duration (its gradient, out×r, is the cheapest one the layer computes: no extra GEMM over W)
and a post-accumulate-grad hook discards it.  A 4-bit layer called twice (or two layers over one 4-bit weight)
adds each call's term, as autograd sums a dense W's uses.  A model may mix both kinds.

What the gradient is taken at is the same for both: train mode (dropout on, as in the first training step) and the
adapters as they are (B = 0 after a fresh init, so the model computes its base).

Collectors:
  * ``exact``: an fp32 accumulator of shape (out, in) per layer, on the layer's device or on the CPU
    (``accumulate_on="cpu"``).  A 4-bit layer adds g2dᵀx2d to it with one ``addmm_`` (on another device: that
    product is formed on the layer's device, one layer's at a time, and moved).
  * ``sketch``: streaming two-sided sketches (Tropp, Yurtsever, Udell, Cevher 2017): Y += G_b Ω (out×k) and
    W += Ψ G_b (l×in) with fixed Gaussian Ω (in×k), Ψ (l×out).  Memory O((in + out)·k) per layer; the low-rank
    SVD is recovered afterwards in a single pass over the sketches (``sketch_svd``).  A 4-bit layer never forms G_b:
    Y += g2dᵀ(x2d Ω), W += (Ψ g2dᵀ) x2d.
Both are linear in G, so under ``torch.distributed`` they are summed across ranks (with the batch counts) and
every rank sees the same result.

The model's train/eval mode, every parameter's ``requires_grad`` and the ``.grad`` of the tensors made to require
grad are restored afterwards, and every hook removed, whatever happens.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import math_dtype
from lora_kernels.model.inject import named_lora_layers
from lora_kernels.modules import FusedLoRALinear


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``FusedLoRALinear4bit`` (a 4-bit base: no dense W to read, write or differentiate).
    False when that module has not been imported: no such layer can exist then."""
    mod = sys.modules.get("lora_kernels.modules.lora_linear_4bit")
    return mod is not None and isinstance(layer, mod.FusedLoRALinear4bit)


def layer_device(layer: FusedLoRALinear) -> torch.device:
    """Where a layer's adapter math belongs: its weight's device (a 4-bit layer: its adapters')."""
    return layer.lora_A.device if is_quantized(layer) else layer.weight.device


def layer_math_dtype(layer: FusedLoRALinear) -> torch.dtype:
    """The accumulator / SVD dtype of a layer (``math_dtype``): of its weight, or for a 4-bit layer (whose weight is
    uint8 codes) fp64 when its adapters or compute dtype are fp64, else fp32."""
    if not is_quantized(layer):
        return math_dtype(layer.weight)
    wide = torch.float64 in (layer.lora_A.dtype, layer.compute_dtype)
    return torch.float64 if wide else torch.float32


def adapted_layers(model: nn.Module) -> List[Tuple[str, FusedLoRALinear]]:
    """``named_lora_layers``, refusing a model without any."""
    layers = named_lora_layers(model)
    if not layers:
        raise ValueError("model has no FusedLoRALinear layer to initialise (replace nn.Linear layers first, e.g. "
                         "with FusedLoRALinear.from_linear)")
    return layers


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a mapping batch (Hugging Face style), else ``model(batch)`` if that is a tensor
    (or has ``.loss``)."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("the model's output has no .loss and is not a tensor: pass loss_fn(model, batch) -> loss")
    return loss


@dataclass
class _Sketch:
    omega: torch.Tensor  # (in, k)
    psi: torch.Tensor    # (l, out)
    Y: torch.Tensor      # (out, k)
    W: torch.Tensor      # (l, in)


@dataclass
class Collected:
    """What a collection produced, per layer name: the mean gradient (exact) or its sketches (sketch)."""
    method: str
    num_batches: int
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)
    sketches: Dict[str, _Sketch] = field(default_factory=dict)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL (it rejects CPU tensors), else CPU."""
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed(generator: Optional[torch.Generator]) -> int:
    """A seed identical on every rank: drawn from ``generator`` (or torch's default RNG) on rank 0, broadcast."""
    dev = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=dev).item())
    d = _dist()
    if d is not None:
        t = torch.tensor([seed], dtype=torch.int64, device=comm_device())
        d.broadcast(t, src=0)
        seed = int(t.item())
    return seed


def agree_on_failure(error: Optional[BaseException]) -> None:
    """Collective check after a phase that can fail on one rank only: every rank raises if any rank failed, so no
    rank is left waiting in a later collective."""
    d = _dist()
    if d is None:
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=comm_device())
    d.all_reduce(flag)
    if error is not None:
        raise error
    if float(flag.item()) > 0:
        raise RuntimeError("lora_kernels: gradient collection failed on another rank (see that rank's error)")


@contextlib.contextmanager
def _collection_state(model: nn.Module, grad_params: List[nn.Parameter]):
    """Train mode, only ``grad_params`` requiring grad (the dense weights, the 4-bit layers' lora_B), their
    existing ``.grad`` set aside (it would be mixed into G); modes, flags and those gradients are restored
    afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {w: w.grad for w in grad_params}
    try:
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in grad_params:
            w.grad = None
            w.requires_grad_(True)
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for w, g in old_grads.items():
            w.grad = g
        for m, t in modes.items():
            m.train(t)


class _FoldGradient(torch.autograd.Function):
    """Identity on a 4-bit layer's output y (returned as a copy) whose backward hands ∂L/∂y and the saved layer
    input x to ``fold`` (module docstring)."""

    @staticmethod
    def forward(ctx, y, x, fold, op_dtype):
        ctx.save_for_backward(x)
        ctx.fold, ctx.op_dtype = fold, op_dtype
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.fold(g.to(ctx.op_dtype), x.to(ctx.op_dtype))
        return g, None, None, None


def collect_gradients(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, *,
                      num_batches: Optional[int] = None, method: str = "exact", sketch_rank: Optional[Dict[str, int]] = None,
                      accumulate_on: Optional[str] = None, seed: int = 0, progress: bool = True) -> Collected:
    """Run forward/backward over up to ``num_batches`` batches and collect each adapted layer's mean gradient
    (dense and 4-bit layers alike: module docstring)."""
    if method not in ("exact", "sketch"):
        raise ValueError(f"method must be 'exact' or 'sketch', got {method!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    layers = adapted_layers(model)
    loss_fn = loss_fn or default_loss
    quantized = {name: m for name, m in layers if is_quantized(m)}
    weights = {name: m.weight for name, m in layers}
    # Layers may share one frozen weight (tied weights): its gradient (the sum over every use) goes to each alias.
    # A 4-bit layer's "weight" is its codes tensor: layers over one 4-bit base share it the same way.
    aliases: Dict[int, List[str]] = {}
    for name, w in weights.items():
        aliases.setdefault(id(w), []).append(name)
    result = Collected(method=method, num_batches=0)
    gen = torch.Generator().manual_seed(seed)
    # Gradients are accumulated as out×in; a Conv1D base (fan_in_fan_out) stores W as in×out: its grad is transposed.
    transposed = {name: bool(getattr(m, "fan_in_fan_out", False)) for name, m in layers}
    for name, m in layers:
        out_f, in_f = m.out_features, m.in_features
        dev = torch.device(accumulate_on) if accumulate_on else layer_device(m)
        mdt = layer_math_dtype(m)
        if method == "exact":
            result.grads[name] = torch.zeros((out_f, in_f), dtype=mdt, device=dev)
        else:
            k = (sketch_rank or {}).get(name, 2 * m.r + 1)
            k = min(k, out_f, in_f)
            l_ = min(2 * k + 1, out_f)
            result.sketches[name] = _Sketch(
                omega=torch.randn((in_f, k), generator=gen, dtype=mdt).to(dev),
                psi=torch.randn((l_, out_f), generator=gen, dtype=mdt).to(dev),
                Y=torch.zeros((out_f, k), dtype=mdt, device=dev), W=torch.zeros((l_, in_f), dtype=mdt, device=dev))

    def make_hook(names):
        def hook(param: torch.Tensor):
            g = param.grad
            param.grad = None
            if g is None:
                return
            for name in names:
                gn = g.t() if transposed[name] else g
                if method == "exact":
                    acc = result.grads[name]
                    acc.add_(gn.detach().to(device=acc.device, dtype=acc.dtype))
                else:
                    sk = result.sketches[name]
                    g32 = gn.detach().to(device=sk.Y.device, dtype=sk.Y.dtype)
                    sk.Y.add_(g32 @ sk.omega)
                    sk.W.add_(sk.psi @ g32)
        return hook

    def make_fold(names, in_f, out_f):
        """Fold one call's G_b = g2dᵀ x2d (never formed on the sketch path) into the collectors of ``names``."""
        def fold(g: torch.Tensor, x: torch.Tensor):
            for name in names:
                if method == "exact":
                    acc = result.grads[name]
                    g2d = g.reshape(-1, out_f).to(acc.dtype)
                    x2d = x.reshape(-1, in_f).to(acc.dtype)
                    if acc.device == g2d.device:
                        acc.addmm_(g2d.mT, x2d)
                    else:  # accumulate_on elsewhere: one layer's G_b, formed where g and x are, then moved
                        acc.add_((g2d.mT @ x2d).to(acc.device))
                else:
                    sk = result.sketches[name]
                    g2d = g.reshape(-1, out_f).to(sk.Y.dtype)
                    x2d = x.reshape(-1, in_f).to(sk.Y.dtype)
                    omega, psi = sk.omega.to(x2d.device), sk.psi.to(x2d.device)
                    sk.Y.add_((g2d.mT @ (x2d @ omega)).to(sk.Y.device))
                    sk.W.add_(((psi @ g2d.mT) @ x2d).to(sk.W.device))
        return fold

    def make_forward_hook(m, fold):
        def forward_hook(module, args, kwargs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None  # no backward will run through this call (no_grad, a reentrant checkpoint's 1st pass)
            x = args[0] if args else kwargs["x"]
            dev_type = x.device.type
            op_dtype = (torch.get_autocast_dtype(dev_type) if dev_type in ("cuda", "cpu")
                        and torch.is_autocast_enabled(dev_type) else m.compute_dtype)
            return _FoldGradient.apply(output, x, fold, op_dtype)
        return forward_hook

    def discard_grad(param: torch.Tensor):
        param.grad = None

    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list, a generator), got "
                        f"{type(batches).__name__}") from None
    handles = []
    unique = {id(w): w for name, w in weights.items() if name not in quantized}
    # A 4-bit layer's lora_B is made to require grad so that its output does (module docstring).
    b_params = {id(m.lora_B): m.lora_B for m in quantized.values()}
    failure: Optional[BaseException] = None
    with _collection_state(model, list(unique.values()) + list(b_params.values())):
        try:
            for wid, w in unique.items():
                handles.append(w.register_post_accumulate_grad_hook(make_hook(aliases[wid])))
            for b in b_params.values():
                handles.append(b.register_post_accumulate_grad_hook(discard_grad))
            for name, m in quantized.items():
                fold = make_fold(aliases[id(m.weight)], m.in_features, m.out_features)
                handles.append(m.register_forward_hook(make_forward_hook(m, fold), with_kwargs=True))
            bar = _progress(progress, num_batches)
            while num_batches is None or result.num_batches < num_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on any adapted layer's weight (no gradient path)")
                loss.backward()
                result.num_batches += 1
                bar.update(1)
            bar.close()
        except Exception as exc:  # agreed on across ranks below, so no rank hangs in the all-reduce
            failure = exc
        finally:
            for h in handles:
                h.remove()
    agree_on_failure(failure)
    total = _all_reduce(result)
    if total == 0:
        raise ValueError("batches is empty: the one-step gradient needs at least one batch")
    scale = 1.0 / total
    for t in result.grads.values():
        t.mul_(scale)
    for sk in result.sketches.values():
        sk.Y.mul_(scale)
        sk.W.mul_(scale)
    for name in list(result.grads) + list(result.sketches):
        tensors = [result.grads[name]] if method == "exact" else [result.sketches[name].Y, result.sketches[name].W]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(f"the gradient of layer {name!r} has NaN or Inf entries")
    result.num_batches = total
    return result


def _all_reduce(result: Collected) -> int:
    d = _dist()
    if d is None:
        return result.num_batches
    dev = comm_device()
    count = torch.tensor([float(result.num_batches)], device=dev)
    d.all_reduce(count)

    def reduce_(t: torch.Tensor) -> None:
        if t.device == dev or dev.type == "cpu":
            d.all_reduce(t)
        else:  # e.g. accumulators kept on the CPU under NCCL
            buf = t.to(dev)
            d.all_reduce(buf)
            t.copy_(buf)

    for t in result.grads.values():
        reduce_(t)
    for sk in result.sketches.values():
        reduce_(sk.Y)
        reduce_(sk.W)
    return int(count.item())


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: Optional[int]):
    if not enabled:
        return _NoBar()
    d = _dist()
    if d is not None and d.get_rank() != 0:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc="one-step gradient", unit="batch")


def sketch_svd(sk: _Sketch, rank: int):
    """Low-rank SVD from the two sketches (Tropp et al. 2017, fixed-rank variant): Q = orth(Y), X = (Ψ Q)⁺ W,
    G ≈ Q X; then the SVD of the small X.  Returns U (out, rank), S (rank,), V (in, rank)."""
    if sk.Y.shape[1] < rank:
        raise ValueError(f"sketch_size {sk.Y.shape[1]} is smaller than the rank {rank} it must recover")
    Y, W, psi = sk.Y.double(), sk.W.double(), sk.psi.double()
    Q = torch.linalg.qr(Y)[0]
    X = torch.linalg.lstsq(psi @ Q, W).solution  # (k, in)
    Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
    U = Q @ Ux[:, :rank]
    dt = sk.Y.dtype
    return U.to(dt), S[:rank].to(dt), Vh[:rank].mT.to(dt)


def sketch_frobenius2(sk: _Sketch) -> float:
    """Unbiased estimate of ‖G‖_F² from the Ψ sketch (E‖Ψ G‖_F² = l ‖G‖_F² for Gaussian Ψ)."""
    return float(sk.W.double().pow(2).sum() / sk.W.shape[0])
