"""Preconditioned optimizers for LoRA factors (the r×r preconditioners of LoRA-One / Riemannian-preconditioned LoRA).

For each adapter y = x Wᵀ + s·x Aᵀ Bᵀ with A (r×in) and B (out×r):
    g̃_A = (BᵀB + λI)⁻¹ g_A          g̃_B = g_B (AAᵀ + λI)⁻¹
then AdamW moments and step (``PreconditionedAdamW``) or plain SGD (``PreconditionedSGD``) on g̃.
Frozen factors are skipped (B-only: only (AAᵀ + λI)⁻¹ acts, on B).  λ (``precond_damping``) defaults to 1e-6.

``PreconditionedAdamW``'s defaults reproduce ``AdamWr`` of the LoRA-One authors' ``prec_logTrainer.py`` (the
optimizer of their preconditioned runs; docs/inits.md quotes the lines), step for step:
  * no bias correction (``correct_bias=False``; ``True`` gives torch.optim.AdamW's bias-corrected moments);
  * λ = 1e-6, betas (0.9, 0.999), eps 1e-8 added to √v (outside the square root);
  * A is preconditioned with the current B and updated first; B's preconditioner is then built from the *updated*
    A (``use_updated_A=True``; ``False`` uses the factors from before the step for both);
  * decoupled weight decay p ← p·(1 − lr·wd) applied *after* the Adam step (``decay_after_update=True``; ``False``
    applies it before, as torch.optim.AdamW does), so B's preconditioner sees A after its decay too.
With ``correct_bias=True, decay_after_update=False, use_updated_A=False`` each step is torch.optim.AdamW fed g̃.

Pairs come from the modules (``from_model`` finds every FusedLoRALinear), never from parameter order.  Each
step solves all r×r systems of equal r with one batched Cholesky (``torch.linalg.cholesky_ex`` +
``cholesky_inverse``) in fp32 (fp64 for fp64 factors); an element whose Cholesky fails falls back to a
pseudo-inverse.

Parameters that are not part of a pair (e.g. a trainable head) get the plain AdamW / SGD update with the same
settings.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from lora_kernels.config import math_dtype
from lora_kernels.model.inject import lora_layers

Pair = Tuple[nn.Parameter, nn.Parameter]


def lora_pairs(model: nn.Module) -> List[Pair]:
    """(lora_A, lora_B) of every FusedLoRALinear in ``model`` (``lora_layers``)."""
    pairs = [(m.lora_A, m.lora_B) for m in lora_layers(model)]
    if not pairs:
        raise ValueError("model has no FusedLoRALinear layer: nothing to precondition")
    return pairs


def _up(t: torch.Tensor) -> torch.Tensor:
    """The factor detached, in ``math_dtype`` (fp32 for fp32/fp16/bf16, fp64 kept as fp64)."""
    return t.detach().to(math_dtype(t))


def _batched_inverse(mats: List[torch.Tensor], damping: float) -> List[torch.Tensor]:
    """(M + λI)⁻¹ for a list of r×r SPD matrices, one batched Cholesky per distinct r."""
    out: List[Optional[torch.Tensor]] = [None] * len(mats)
    by_shape: Dict[Tuple, List[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault((m.shape[-1], m.device, m.dtype), []).append(i)
    for (r, dev, _), idx in by_shape.items():
        M = torch.stack([mats[i] for i in idx])
        M = M + damping * torch.eye(r, device=dev, dtype=M.dtype)
        L, info = torch.linalg.cholesky_ex(M)
        ok = info == 0
        inv = torch.cholesky_inverse(torch.where(ok[:, None, None], L, torch.eye(r, device=dev, dtype=M.dtype)))
        if not bool(ok.all()):
            inv[~ok] = torch.linalg.pinv(M[~ok], hermitian=True)
        for j, i in enumerate(idx):
            out[i] = inv[j]
    return out  # type: ignore[return-value]


class _PreconditionedBase(torch.optim.Optimizer):
    def __init__(self, params, defaults, pairs: Optional[Iterable[Pair]], precond_damping: float, use_updated_A: bool):
        if not precond_damping >= 0:
            raise ValueError(f"precond_damping must be ≥ 0, got {precond_damping!r}")
        super().__init__(params, defaults)
        self.precond_damping = float(precond_damping)
        self.use_updated_A = bool(use_updated_A)
        in_opt = {id(p) for g in self.param_groups for p in g["params"]}
        self._pairs: List[Pair] = []
        for a, b in pairs or []:
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"each pair must be (A: r×in, B: out×r), got {tuple(a.shape)} and {tuple(b.shape)}")
            if id(a) in in_opt or id(b) in in_opt:
                self._pairs.append((a, b))
        if not self._pairs:
            warnings.warn(f"{type(self).__name__}: no (lora_A, lora_B) pair among the parameters, so no gradient is "
                          f"preconditioned (this is plain {type(self).__name__[14:]}); build it with from_model(model) "
                          f"or pass pairs=", stacklevel=3)

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs):
        """An optimizer over the trainable adapter factors (and any other trainable parameter) of ``model``."""
        pairs = lora_pairs(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameter")
        return cls(params, pairs=pairs, **kwargs)

    def _trainable(self, p) -> bool:
        return p.requires_grad and p.grad is not None and any(p is q for g in self.param_groups for q in g["params"])

    def _precondition_A(self) -> Dict[int, torch.Tensor]:
        todo = [(a, b) for a, b in self._pairs if self._trainable(a)]
        invs = _batched_inverse([_up(b).mT @ _up(b) for _, b in todo], self.precond_damping)
        return {id(a): (inv @ _up(a.grad)).to(a.grad.dtype) for (a, _), inv in zip(todo, invs)}

    def _precondition_B(self) -> Dict[int, torch.Tensor]:
        todo = [(a, b) for a, b in self._pairs if self._trainable(b)]
        invs = _batched_inverse([_up(a) @ _up(a).mT for a, _ in todo], self.precond_damping)
        return {id(b): (_up(b.grad) @ inv).to(b.grad.dtype) for (_, b), inv in zip(todo, invs)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        b_ids = {id(b) for _, b in self._pairs}
        if self.use_updated_A:
            pre = self._precondition_A()
            self._update(lambda p: id(p) not in b_ids, pre)  # A factors and unpaired parameters first
            self._update(lambda p: id(p) in b_ids, self._precondition_B())
        else:
            pre = {**self._precondition_A(), **self._precondition_B()}
            self._update(lambda p: True, pre)
        return loss

    def _update(self, select, pre: Dict[int, torch.Tensor]) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not select(p):
                    continue
                self._apply(p, pre.get(id(p), p.grad), group)


class PreconditionedAdamW(_PreconditionedBase):
    """AdamW on the r×r-preconditioned LoRA gradients (see module docstring).

    Defaults follow the LoRA-One authors' ``AdamWr``: ``correct_bias=False`` (raw moments: m/(√v + eps), no
    1/(1−β^t) factors), λ = 1e-6, A updated first and B preconditioned with the updated A, weight decay applied
    after the step.  ``correct_bias=True`` gives Adam's usual bias correction, exactly as torch.optim.AdamW
    (m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), step lr·m̂/(√v̂ + eps)).  Early steps differ a lot between the two: with
    β₂ = 0.999 an uncorrected step is (1−β₁ᵗ)/√(1−β₂ᵗ) times the corrected one: 3.2× at t = 1, 6.5× at t = 10,
    3.2× at t = 100, 1.26× at t = 1000.
    ``bias_correction=`` is the former name of ``correct_bias`` (deprecated).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, pairs: Optional[Iterable[Pair]] = None, precond_damping: float = 1e-6, correct_bias: bool = False,
                 decay_after_update: bool = True, use_updated_A: bool = True, bias_correction: Optional[bool] = None):
        if bias_correction is not None:
            warnings.warn("PreconditionedAdamW(bias_correction=) is deprecated: use correct_bias= (the default is now "
                          "False, as in the LoRA-One authors' AdamWr)", DeprecationWarning, stacklevel=2)
            correct_bias = bias_correction
        if not lr >= 0:
            raise ValueError(f"lr must be ≥ 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0, got {eps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=bool(correct_bias),
                        decay_after_update=bool(decay_after_update))
        super().__init__(params, defaults, pairs, precond_damping, use_updated_A)

    def _apply(self, p, grad, group):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        # groups saved before the rename carry "bias_correction" (and decayed before the step)
        correct_bias = group.get("correct_bias", group.get("bias_correction", False))
        decay_after = group.get("decay_after_update", "bias_correction" not in group)
        decay = 1 - group["lr"] * group["weight_decay"]
        if group["weight_decay"] and not decay_after:
            p.mul_(decay)
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if correct_bias:
            c1, c2 = 1 - beta1**step, 1 - beta2**step
            denom = (state["exp_avg_sq"] / c2).sqrt_().add_(group["eps"])
        else:
            c1 = 1.0
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / c1)
        if group["weight_decay"] and decay_after:
            p.mul_(decay)


class PreconditionedSGD(_PreconditionedBase):
    """SGD (optional momentum and decoupled weight decay) on the preconditioned LoRA gradients.

    The LoRA-One code has no preconditioned SGD.  ``SGDr`` of the Riemannian-preconditioned LoRA code
    (pilancilab/Riemannian_Preconditioned_LoRA, e.g. ``Mix-of-Show/custom_optimizers.py``) builds both
    preconditioners from the pre-step factors (``use_updated_A=False`` here), with λ = 0, and decays before the
    step (as here).  Our default ``use_updated_A=True`` keeps the Adam variant's order instead.
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0, *,
                 pairs: Optional[Iterable[Pair]] = None, precond_damping: float = 1e-6, use_updated_A: bool = True):
        if not lr >= 0:
            raise ValueError(f"lr must be ≥ 0, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, pairs, precond_damping, use_updated_A)

    def _apply(self, p, grad, group):
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if group["momentum"]:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.clone()
            else:
                buf.mul_(group["momentum"]).add_(grad)
            grad = buf
        p.add_(grad, alpha=-group["lr"])
