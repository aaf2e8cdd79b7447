"""Collect G = mean over batches of ∇_W L at the frozen weights W of every FusedLoRALinear, without ever holding
every layer's full gradient in ``.grad``.

How: for the duration of the collection each adapted frozen weight is made to require grad and gets a
post-accumulate-grad hook; every other parameter is frozen, so nothing else accumulates a gradient.  When
autograd has written a batch gradient into ``W.grad`` the hook folds it into the layer's collector and sets
``W.grad = None``: a full gradient exists for one layer of one batch at a time, and only transiently.

Collectors:
  * ``exact``: an fp32 accumulator of shape (out, in) per layer, on the layer's device or on the CPU
    (``accumulate_on="cpu"``).
  * ``sketch``: streaming two-sided sketches (Tropp, Yurtsever, Udell, Cevher 2017): Y += G_b Ω (out×k) and
    W += Ψ G_b (l×in) with fixed Gaussian Ω (in×k), Ψ (l×out).  Memory O((in + out)·k) per layer; the low-rank
    SVD is recovered afterwards in a single pass over the sketches (``sketch_svd``).
Both are linear in G, so under ``torch.distributed`` they are summed across ranks (with the batch counts) and
every rank sees the same result.

The model's train/eval mode and every parameter's ``requires_grad`` are restored afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import math_dtype
from lora_kernels.model.inject import named_lora_layers
from lora_kernels.modules import FusedLoRALinear


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
def _collection_state(model: nn.Module, weights: List[nn.Parameter]):
    """Train mode, only ``weights`` requiring grad, their existing ``.grad`` set aside (it would be mixed into G);
    modes, flags and those gradients are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {w: w.grad for w in weights}
    try:
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
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


def collect_gradients(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, *,
                      num_batches: Optional[int] = None, method: str = "exact", sketch_rank: Optional[Dict[str, int]] = None,
                      accumulate_on: Optional[str] = None, seed: int = 0, progress: bool = True) -> Collected:
    """Run forward/backward over up to ``num_batches`` batches and collect each adapted layer's mean gradient."""
    if method not in ("exact", "sketch"):
        raise ValueError(f"method must be 'exact' or 'sketch', got {method!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    layers = adapted_layers(model)
    loss_fn = loss_fn or default_loss
    weights = {name: m.weight for name, m in layers}
    # Layers may share one frozen weight (tied weights): its gradient (the sum over every use) goes to each alias.
    aliases: Dict[int, List[str]] = {}
    for name, w in weights.items():
        aliases.setdefault(id(w), []).append(name)
    result = Collected(method=method, num_batches=0)
    gen = torch.Generator().manual_seed(seed)
    # Gradients are accumulated as out×in; a Conv1D base (fan_in_fan_out) stores W as in×out: its grad is transposed.
    transposed = {name: bool(getattr(m, "fan_in_fan_out", False)) for name, m in layers}
    for name, m in layers:
        out_f, in_f = m.out_in_weight.shape
        dev = torch.device(accumulate_on) if accumulate_on else m.weight.device
        mdt = math_dtype(m.weight)
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

    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list, a generator), got "
                        f"{type(batches).__name__}") from None
    handles = []
    unique = {id(w): w for w in weights.values()}
    failure: Optional[BaseException] = None
    with _collection_state(model, list(unique.values())):
        for wid, w in unique.items():
            handles.append(w.register_post_accumulate_grad_hook(make_hook(aliases[wid])))
        try:
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
