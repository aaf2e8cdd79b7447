"""The fused LoRA linear op: argument checks, forward/backward over the chosen backend, the ``torch.library`` custom
ops that ``torch.compile`` traces, the autograd Function and the functional ``lora_linear``.

Call path (eager): ``lora_linear`` → ``LoRALinearFunction`` → ``lora_fwd`` / ``lora_bwd`` → backend
(``dispatch.backend``: ``launch`` or ``torch_path``).  Under ``torch.compile`` the Function calls the custom ops
``torch.ops.lora_kernels.lora_fwd`` / ``lora_bwd`` instead, whose bodies are the same ``lora_fwd`` / ``lora_bwd``;
for a 4-bit NF4 W, ``lora_fwd_nf4`` / ``lora_bwd_nf4``, which take its tensors (``nf4_parts``) as arguments.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from lora_kernels.ops.lora_linear import dispatch
from lora_kernels.ops.lora_linear.base_weight import BaseWeight, as_base_weight


def lora_fwd(x2d: torch.Tensor, base: BaseWeight, bias, lora_A, lora_B, scale: float, dropout_p: float,
             seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y2d [N, out], t' [N, r]) with t' = s/(1-p) · (m ⊙ x) Aᵀ (the scales folded in).  x2d: [N, in], any strides.
    y2d is in x's dtype; t' in the adapters' when they are fp32 on a 16-bit x (the LoRA branch in fp32, as PEFT)."""
    be = dispatch.backend(x2d, lora_A.shape[0])
    with dispatch.on_device(x2d):
        t = be.shrink(x2d, lora_A, seed, dropout_p, scale / (1.0 - dropout_p))
        y = be.gemm(x2d, base, True, bias, t, lora_B.t(), seed, 0.0, False)
    return y, t


def lora_bwd(g2d: torch.Tensor, x2d: Optional[torch.Tensor], t: Optional[torch.Tensor], base: BaseWeight, lora_A,
             lora_B, scale: float, dropout_p: float, seed: int, *, need_dx: bool, need_dA: bool, need_dB: bool):
    """(dx2d, dA, dB); entries not asked for are None.  x2d is needed only for dA, t' only for dB."""
    dx = d_a = d_b = None
    be = dispatch.backend(g2d, lora_A.shape[0])
    whole = getattr(be, "lora_bwd", None)  # a backend that serves the whole backward (the PyTorch path: one mask draw)
    if whole is not None:
        return whole(g2d, x2d, t, base, lora_A, lora_B, scale, dropout_p, seed, need_dx=need_dx, need_dA=need_dA,
                     need_dB=need_dB)
    with dispatch.on_device(g2d):
        # gB' = s/(1-p) · g B serves both dX and dA.
        gb = be.shrink(g2d, lora_B.t(), 0, 0.0, scale / (1.0 - dropout_p)) if (need_dx or need_dA) else None
        if need_dx:
            dx = be.gemm(g2d, base, False, None, gb, lora_A, seed, dropout_p, True)
        if need_dA:
            d_a = be.grad_A(x2d, gb, seed, dropout_p, lora_A.dtype)
        if need_dB:
            d_b = be.grad_B(g2d, t, lora_B.dtype)
    return dx, d_a, d_b


# --------------------------------------------------------------------------------------------------------------
# torch.library custom ops (what torch.compile sees) and the eager/compiled switch
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_fwd", mutates_args=())
def _lora_fwd_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y2d, t') of the fused forward; ``seed`` is a CPU int64 scalar tensor (no .item() on a traced path)."""
    return lora_fwd(x2d, as_base_weight(weight), bias, lora_A, lora_B, scale, dropout_p, int(seed))


@_lora_fwd_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    n = x2d.shape[0]
    return (x2d.new_empty((n, weight.shape[0])),
            x2d.new_empty((n, lora_A.shape[0]), dtype=torch.promote_types(x2d.dtype, lora_A.dtype)))


@torch.library.custom_op("lora_kernels::lora_bwd", mutates_args=())
def _lora_bwd_op(g2d: torch.Tensor, x2d: Optional[torch.Tensor], t: Optional[torch.Tensor], weight: torch.Tensor,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor,
                 need_dx: bool, need_dA: bool, need_dB: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx2d, dA, dB); an output not asked for is an empty tensor (custom ops cannot return None)."""
    dx, d_a, d_b = lora_bwd(g2d, x2d, t, as_base_weight(weight), lora_A, lora_B, scale, dropout_p, int(seed),
                            need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)
    return (dx if dx is not None else g2d.new_empty(0), d_a if d_a is not None else lora_A.new_empty(0),
            d_b if d_b is not None else lora_B.new_empty(0))


@_lora_bwd_op.register_fake
def _(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed, need_dx, need_dA, need_dB):
    n, n_in = g2d.shape[0], weight.shape[1]
    return (g2d.new_empty((n, n_in) if need_dx else (0,)), lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_B.new_empty(lora_B.shape if need_dB else (0,)))


def _out_features(weight) -> int:
    return weight.shape[0] if isinstance(weight, torch.Tensor) else weight.out_features


def _fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed_t):
    # Eager calls skip the dispatcher (tens of µs per op); torch.compile traces the custom op and its fake.
    if torch.compiler.is_compiling():
        if not isinstance(weight, torch.Tensor):
            return torch.ops.lora_kernels.lora_fwd_nf4(x2d, *nf4_parts(weight), bias, lora_A, lora_B, scale,
                                                       dropout_p, seed_t)
        return torch.ops.lora_kernels.lora_fwd(x2d, weight, bias, lora_A, lora_B, scale, dropout_p, seed_t)
    return lora_fwd(x2d, as_base_weight(weight), bias, lora_A, lora_B, scale, dropout_p, int(seed_t))


def _bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed_t, **need):
    if torch.compiler.is_compiling():
        flags = (need["need_dx"], need["need_dA"], need["need_dB"])
        if not isinstance(weight, torch.Tensor):
            outs = torch.ops.lora_kernels.lora_bwd_nf4(g2d, x2d, t, *nf4_parts(weight), lora_A, lora_B, scale,
                                                       dropout_p, seed_t, *flags)
        else:
            outs = torch.ops.lora_kernels.lora_bwd(g2d, x2d, t, weight, lora_A, lora_B, scale, dropout_p, seed_t,
                                                   *flags)
        return tuple(o if need[k] else None for o, k in zip(outs, ("need_dx", "need_dA", "need_dB")))
    return lora_bwd(g2d, x2d, t, as_base_weight(weight), lora_A, lora_B, scale, dropout_p, int(seed_t), **need)


def _seed_tensor(seed) -> torch.Tensor:
    """The call's dropout seed as a CPU int64 scalar tensor (what backward keeps); drawn from torch's CPU generator
    when None, so ``torch.manual_seed`` reproduces runs and checkpointing regenerates the same mask."""
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)  # traceable, no .item()
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an int or a one-element integer tensor, got a {seed.dtype} tensor of "
                             f"shape {tuple(seed.shape)}")
        return seed.to(device="cpu", dtype=torch.int64).reshape(())
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be a non-negative int below 2**63, got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


# The same pair for a 4-bit NF4 W: its tensors and sizes as the ops' arguments (custom ops take tensors and
# scalars, not an NF4Tensor), rebuilt into an NF4Weight in the body.  ``meta``: [out, in, blocksize,
# nested_blocksize]; the nested tensors are None without double quantization.

def nf4_parts(base) -> tuple:
    """(packed, absmax, code, nested_absmax, nested_code, meta, offset) of an ``NF4Weight``."""
    q = base.q
    offset = q.offset.reshape(()) if isinstance(q.offset, torch.Tensor) else q.code.new_full((), q.offset)
    return (q.packed, q.absmax, q.code, q.nested_absmax, q.nested_code,
            [q.shape[0], q.shape[1], q.blocksize, q.nested_blocksize], offset)


def _nf4_base(dtype, packed, absmax, code, nested_absmax, nested_code, meta, offset) -> BaseWeight:
    from lora_kernels.quant.nf4 import NF4Tensor

    return as_base_weight(NF4Tensor(packed, absmax, (meta[0], meta[1]), dtype, meta[2], code, nested_absmax,
                                    nested_code, meta[3], offset))


@torch.library.custom_op("lora_kernels::lora_fwd_nf4", mutates_args=())
def _lora_fwd_nf4_op(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor], meta: List[int],
                     offset: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scale: float, dropout_p: float, seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``lora_fwd`` on a 4-bit NF4 W given by its parts (compute dtype: x's)."""
    base = _nf4_base(x2d.dtype, packed, absmax, code, nested_absmax, nested_code, meta, offset)
    return lora_fwd(x2d, base, bias, lora_A, lora_B, scale, dropout_p, int(seed))


@_lora_fwd_nf4_op.register_fake
def _(x2d, packed, absmax, code, nested_absmax, nested_code, meta, offset, bias, lora_A, lora_B, scale, dropout_p,
      seed):
    n = x2d.shape[0]
    return (x2d.new_empty((n, meta[0])),
            x2d.new_empty((n, lora_A.shape[0]), dtype=torch.promote_types(x2d.dtype, lora_A.dtype)))


@torch.library.custom_op("lora_kernels::lora_bwd_nf4", mutates_args=())
def _lora_bwd_nf4_op(g2d: torch.Tensor, x2d: Optional[torch.Tensor], t: Optional[torch.Tensor], packed: torch.Tensor,
                     absmax: torch.Tensor, code: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                     nested_code: Optional[torch.Tensor], meta: List[int], offset: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor, need_dx: bool,
                     need_dA: bool, need_dB: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lora_bwd`` on a 4-bit NF4 W given by its parts; outputs not asked for are empty tensors."""
    base = _nf4_base(g2d.dtype, packed, absmax, code, nested_absmax, nested_code, meta, offset)
    dx, d_a, d_b = lora_bwd(g2d, x2d, t, base, lora_A, lora_B, scale, dropout_p, int(seed), need_dx=need_dx,
                            need_dA=need_dA, need_dB=need_dB)
    return (dx if dx is not None else g2d.new_empty(0), d_a if d_a is not None else lora_A.new_empty(0),
            d_b if d_b is not None else lora_B.new_empty(0))


@_lora_bwd_nf4_op.register_fake
def _(g2d, x2d, t, packed, absmax, code, nested_absmax, nested_code, meta, offset, lora_A, lora_B, scale, dropout_p,
      seed, need_dx, need_dA, need_dB):
    n = g2d.shape[0]
    return (g2d.new_empty((n, meta[1]) if need_dx else (0,)), lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_B.new_empty(lora_B.shape if need_dB else (0,)))


# --------------------------------------------------------------------------------------------------------------
# Autograd Function and functional API
# --------------------------------------------------------------------------------------------------------------

class LoRALinearFunction(torch.autograd.Function):
    r"""y = x Wᵀ + b + s · (m ⊙ x / (1-p)) Aᵀ Bᵀ, with t = (m ⊙ x / (1-p)) Aᵀ (N×r) and g = ∂L/∂y.

    Chain rule, writing x̃ = m ⊙ x / (1-p) (m the dropout keep mask, all-ones when p = 0):
      ∂L/∂t  = s · g B                         (N×r; computed as gB = g B, scaled later)
      ∂L/∂B  = s · gᵀ t                        (out×r)           -- needs t, never x
      ∂L/∂A  = (∂L/∂t)ᵀ x̃ = s · (gB)ᵀ x̃        (r×in)            -- needs x (mask regenerated from the seed)
      ∂L/∂x  = g W + m ⊙ ((∂L/∂t) A) / (1-p)  = g W + s/(1-p) · m ⊙ (gB A)
      ∂L/∂W  = gᵀ x,  ∂L/∂b = Σ_rows g        (only if the caller made W or b trainable)

    The kernels fold the scales into the N×r intermediates (t' = s·t, gB' = s/(1-p)·g B), so that the LoRA term
    shares the base GEMM's accumulator and dB = gᵀ t', dA = gB'ᵀ (m ⊙ x), dX = g W + m ⊙ (gB' A) need no
    further scaling.

    Saved for backward, on every device and backend: B-only (A frozen) keeps t' and the seed (a CPU int64 scalar
    tensor), never x; AB and A-only keep x itself (same storage, no copy) and the seed, plus t' when B needs a
    gradient.  W, A, B are parameters, saved by reference.  The dropout mask is never stored: the Triton kernels
    regenerate it in-kernel from the seed; the PyTorch path (CPU without the interpreter, float64, ...) draws it
    again from the seed in backward, once for dX and dA together (``torch_path.lora_bwd``).  Keeping it instead
    (N·in bytes as bool) would save one draw per step on CPU (~3.5 ms at 2048×1024) but break B-only's N×r-only
    footprint, so it is not done.  With fp32 adapters on a 16-bit x, t' is fp32 (N×r×4 bytes): the same tensors.

    Under ``create_graph=True`` the backward is ``_backward_with_graph`` (differentiable torch ops), not the backends.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
        n_in = x.shape[-1]
        y2d, t = _fwd(x.reshape(-1, n_in), weight, bias, lora_A, lora_B, scale, dropout_p, seed)
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        dense = isinstance(weight, torch.Tensor)
        ctx.save_for_backward(x if (need_da or need_dw) else None, t if need_dbb else None,
                              weight if dense else None, lora_A, lora_B, seed)
        # A quantized W (a BaseWeight holding the module's frozen codes) is kept by reference, as a parameter is.
        ctx.base = None if dense else weight
        ctx.scale, ctx.dropout_p, ctx.x_shape = scale, dropout_p, x.shape
        return y2d.reshape(*x.shape[:-1], _out_features(weight))

    @staticmethod
    def backward(ctx, grad_y):
        x, t, weight, lora_A, lora_B, seed = ctx.saved_tensors
        weight = weight if ctx.base is None else ctx.base
        need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True (double backward): a differentiable composition instead of the backends.
            return _backward_with_graph(ctx, grad_y, x, t, weight, lora_A, lora_B, seed)
        g2d = grad_y.reshape(-1, _out_features(weight))
        x2d = x.reshape(-1, ctx.x_shape[-1]) if x is not None else None
        dx, d_a, d_b = _bwd(g2d, x2d, t, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, seed,
                            need_dx=need_dx, need_dA=need_da, need_dB=need_dbb)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        d_w = (g2d.t() @ x2d).to(weight.dtype) if need_dw else None
        d_bias = g2d.sum(0) if need_db else None
        return dx, d_w, d_bias, d_a, d_b, None, None, None


def _backward_with_graph(ctx, grad_y, x, t, weight, lora_A, lora_B, seed):
    """The backward of ``LoRALinearFunction`` under ``create_graph=True``, as plain differentiable torch ops, so that
    its results can be differentiated again (double backward, gradient penalties, Hessian-vector products).

    Neither backend's own backward can serve it: the kernels' outputs carry no autograd history, and t' (saved from
    the forward) carries no dependence on x and A, which ∂²L through dB = gᵀ t' needs.  So t' is recomputed here from
    x (saved in AB and A-only modes, and whenever W is trainable) with the very mask the forward drew (``keep_mask``
    of the backend that served it: the kernels' Philox mask or torch's generator's), and every product is a torch op.
    The one case that cannot be done from the saved state is B-only with an x that needs a gradient: B-only never
    keeps x (its point is the N×r-only footprint), so that raises instead of returning a wrong second derivative."""
    need_dx, need_dw, need_db, need_da, need_dbb = ctx.needs_input_grad[:5]
    n_in = ctx.x_shape[-1]
    g2d = grad_y.reshape(-1, _out_features(weight))
    if x is None and need_dx and need_dbb:
        raise RuntimeError(
            "lora_linear: double backward (create_graph=True) with lora_A frozen (B-only) and an input that "
            "requires grad is not supported: dB = gᵀ·t' depends on x through t' = s·dropout(x)·Aᵀ, and B-only "
            "training does not keep x.  Make lora_A trainable for this call, or detach the input.")
    s, p = ctx.scale, ctx.dropout_p
    ld = lora_A.dtype  # the LoRA branch's dtype (fp32 for fp32 adapters on a 16-bit base, as PEFT)
    keep = None
    if p > 0.0:
        with dispatch.on_device(g2d):
            keep = dispatch.backend(g2d, lora_A.shape[0]).keep_mask(int(seed), g2d.shape[0], n_in, p, g2d.device)
        keep = keep.to(ld)
    c = s / (1.0 - p)
    gl = g2d.to(ld)
    x2d = x.reshape(-1, n_in) if x is not None else None
    xm = None
    if x2d is not None:
        xm = x2d.to(ld) if keep is None else x2d.to(ld) * keep
    dx = d_w = d_bias = d_a = d_b = None
    if need_dx or need_da:
        gb = (gl @ lora_B) * c  # gB' = s/(1-p) · g B
        if need_dx:
            lora = gb @ lora_A
            w = weight if isinstance(weight, torch.Tensor) else weight.dense()
            dx = ((g2d @ w).to(ld) + (lora if keep is None else lora * keep)).to(grad_y.dtype)
            dx = dx.reshape(ctx.x_shape)
        if need_da:
            d_a = gb.t() @ xm
    if need_dbb:
        t_g = (xm @ lora_A.t()) * c if xm is not None else t  # x saved: t' with its graph; else t' is a constant
        d_b = gl.t() @ t_g.to(ld)
    if need_dw:
        d_w = (g2d.t() @ x2d).to(weight.dtype)
    if need_db:
        d_bias = g2d.sum(0)
    return dx, d_w, d_bias, d_a, d_b, None, None, None


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, *, autocast=False):
    """Every argument's type, shape, dtype and device, each error naming the argument.  ``weight``: a tensor or a
    ``BaseWeight`` (a quantized W: its logical shape, compute dtype and device are checked)."""
    dense = isinstance(weight, torch.Tensor)
    named_tensors = (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B))
    for name, ten in named_tensors if dense else named_tensors[:1] + named_tensors[2:]:
        if not isinstance(ten, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ten).__name__}")
        if ten.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {ten.dtype}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if dense and weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape if dense else (weight.out_features, weight.in_features)
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects {in_f}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape (r, {in_f}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError("lora_A has rank r = 0; r must be ≥ 1")
    if lora_B.dim() != 2 or lora_B.shape != (out_f, r):
        raise ValueError(f"lora_B must have shape ({out_f}, {r}), got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)] + ([("bias", bias)] if bias is not None else [])
    for name, ten in named:
        if ten.device != x.device:
            raise ValueError(f"{name} is on {ten.device} but x is on {x.device}")
    if not dense and weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight's compute dtype must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    if autocast:
        return _check_scalars(scale, dropout_p)  # every operand runs in the autocast dtype: theirs do not matter
    for name, ten in named:
        if name in ("weight", "bias") and ten.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {ten.dtype} but x has {x.dtype}; x, weight and bias must share one "
                            f"dtype")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A has dtype {lora_A.dtype} but lora_B has {lora_B.dtype}; the adapters must share one "
                        f"dtype")
    if lora_A.dtype != x.dtype and not (lora_A.dtype == torch.float32 and x.dtype in _HALF_DTYPES):
        raise TypeError(f"lora_A / lora_B have dtype {lora_A.dtype} but x has {x.dtype}; the adapters must be in x's "
                        f"dtype, or float32 with a float16 / bfloat16 x (PEFT's autocast_adapter_dtype)")
    _check_scalars(scale, dropout_p)


def _check_scalars(scale, dropout_p):
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a Python float, not a tensor")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _capturing(x: torch.Tensor) -> bool:
    """Whether x's CUDA stream is being captured into a CUDA graph (never under torch.compile's tracing)."""
    return (x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())


def _refuse_captured_dropout(x, dropout_p, seed) -> None:
    """Dropout with a drawn seed inside a CUDA graph capture would repeat one mask on every replay: the seed is drawn
    on the host at capture time and baked into the graph.  Refused rather than silently wrong."""
    if dropout_p > 0.0 and seed is None and _capturing(x):
        raise RuntimeError(
            "lora_linear: dropout (p > 0) inside a CUDA graph capture would replay the same dropout mask on every "
            "replay (the seed is drawn on the host when the graph is captured).  Capture with lora_dropout=0 (or the "
            "layer in eval mode), or pass seed= explicitly if one fixed mask is what you want")


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, seed=None):
    """y = x Wᵀ + b + scale · (dropout(x) lora_Aᵀ) lora_Bᵀ, differentiable in x, lora_A, lora_B (and W, b if
    they require grad).  Dropout (inverted, as nn.Dropout) acts on the LoRA branch only.

    ``seed`` (int or CPU int64 scalar tensor) fixes the dropout mask; by default it is drawn from torch's CPU
    generator, so ``torch.manual_seed`` reproduces runs and activation checkpointing regenerates the same mask.
    Under ``torch.compile`` the kernels are the custom ops ``torch.ops.lora_kernels.lora_fwd`` / ``lora_bwd``.
    Triton kernels serve CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``); any other case runs the
    pure-PyTorch path with the same semantics.

    dtypes: x, weight and bias share one; lora_A and lora_B share one, x's or float32 with a float16 / bfloat16 x
    (PEFT's default ``autocast_adapter_dtype``): then the LoRA branch runs in fp32 as in PEFT (docs/design.md,
    decision 14), y and dx are in x's dtype, dA and dB in float32.  Under autocast everything runs in the autocast
    dtype, as PEFT's layers do there.  Double backward (``create_graph=True``) runs a differentiable composition
    (``_backward_with_graph``).
    """
    autocast = (isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu")
                and torch.is_autocast_enabled(x.device.type))
    if not isinstance(weight, torch.Tensor):
        weight = as_base_weight(weight)  # a quantized W (NF4Tensor) or a BaseWeight; a TypeError names weight
    _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, autocast=autocast)
    scale, dropout_p = float(scale), float(dropout_p)
    _refuse_captured_dropout(x, dropout_p, seed)
    if autocast:
        # Under autocast (e.g. HF Trainer bf16=True with fp32 parameters) run in the autocast dtype, as
        # nn.Linear would, and as PEFT's layers do (fp32 adapters included: their F.linear autocasts too); the
        # casts are differentiable, so fp32 parameters receive fp32 gradients.
        dt = torch.get_autocast_dtype(x.device.type)
        x, lora_A, lora_B = (v.to(dt) for v in (x, lora_A, lora_B))
        weight = weight.to(dt) if isinstance(weight, torch.Tensor) else weight.with_dtype(dt)
        bias = bias.to(dt) if bias is not None else None
    seed = _seed_tensor(seed if (seed is not None or dropout_p > 0.0) else 0)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(ten, torch.Tensor) and ten.requires_grad for ten in (x, weight, bias, lora_A, lora_B))
    if needs_grad:
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    # Inference: no autograd node, no saved state.
    n_in = x.shape[-1]
    y2d, _ = _fwd(x.reshape(-1, n_in), weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    return y2d.reshape(*x.shape[:-1], _out_features(weight))
