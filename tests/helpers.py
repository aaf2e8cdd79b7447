"""Builders, measures and references shared by more than one test module (fixtures live in conftest.py).

Test modules import from here, never from one another.
"""

import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear, dropout_mask, lora_linear, lora_linear_ref

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_path(*parts: str) -> str:
    """A path inside the repository, wherever the calling test module sits under tests/."""
    return os.path.join(REPO_ROOT, *parts)


def load_repo_module(*parts: str):
    """Import a script of the repository (bench/..., not a package) by its path, registered under its basename
    (dataclasses look their module up in sys.modules)."""
    path = repo_path(*parts)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------------------
# lora_linear numerics
# ------------------------------------------------------------------------------------------------------------

EPS = {torch.float32: 1.2e-7, torch.float16: 9.8e-4, torch.bfloat16: 7.8e-3}  # machine epsilon of each dtype
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the dtypes the kernels serve
MODES = {"AB": (True, True), "B": (False, True), "A": (True, False)}  # mode -> (A trains, B trains)


def error_floor(dtype, k):
    """The part of an error bound that does not scale with torch's own error.

    Why a floor at all: torch's error can be near zero by luck of one BLAS's kernel on a short reduction (MKL on
    AVX-512 gave 3.7e-8 for a 16-long fp32 chain, where ours had 3.4e-7), so "2 × torch's error" alone cannot hold
    on every CPU, and a fixed tiny number (1e-7, 1e-6) is the same mistake one BLAS later.  Every output here is
    a chain of fp32-accumulated reductions (t over in, gB over out, the LoRA K-loop over r) with at most one
    rounding to ``dtype`` of a stored intermediate, so the floor is one unit roundoff of ``dtype`` plus the fp32
    random-walk error eps₃₂·√k of a k-long accumulation, k = in + out + r (or the reduction lengths involved)."""
    return EPS[dtype] + EPS[torch.float32] * k**0.5


def standalone_bound(dtype, k):
    """Relative error vs float64 allowed where no same-dtype torch run is compared with: the ``run_and_compare``
    bound (2 × torch's error + ``error_floor``) with torch's own error replaced by its size, ``error_floor``."""
    return 3 * error_floor(dtype, k)


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(n, d_in, d_out, r, dtype, mode="AB", bias=True, x_grad=True, lead=(), device="cpu"):
    """Fresh random inputs, every factor non-zero (B too), scaled so outputs are O(1)."""
    a_trains, b_trains = MODES[mode]
    kw = dict(device=device)
    x = torch.randn(*lead, n, d_in, **kw).to(dtype).requires_grad_(x_grad)
    w = (torch.randn(d_out, d_in, **kw) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, **kw).to(dtype) if bias else None
    a = (torch.randn(r, d_in, **kw) / d_in**0.5).to(dtype).requires_grad_(a_trains)
    bb = (torch.randn(d_out, r, **kw) / r**0.5).to(dtype).requires_grad_(b_trains)
    return x, w, b, a, bb


def grads_of(y, g, tensors):
    ins = [t for t in tensors if t.requires_grad]
    outs = torch.autograd.grad(y, ins, g)
    it = iter(outs)
    return [next(it) if t.requires_grad else None for t in tensors]


def run_and_compare(x, w, b, a, bb, scale, p, seed=1234, *, w_dense=None):
    """Forward + backward through lora_linear, checked against float64 and against torch in the same dtype.

    Bound: relative error of ours vs float64 ≤ 2 × that of the same computation done by torch in the same dtype
    + ``error_floor`` (which only matters where torch is exact by luck, which depends on the CPU's BLAS).
    ``w_dense``: the dense W the references use when ``w`` is not a tensor (a quantized W: its dequantization)."""
    dtype = x.dtype
    y = lora_linear(x, w, b, a, bb, scale, p, seed=seed)
    w = w if w_dense is None else w_dense
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == dtype
    g = torch.randn_like(y)
    got = [y] + grads_of(y, g, [x, a, bb])

    mask = None
    if p > 0:  # the mask this very call drew (the kernels' Philox mask, or torch's on the PyTorch path)
        mask = dropout_mask(seed, (x[..., 0].numel(), x.shape[-1]), p, x.device, dtype=dtype,
                            r=a.shape[0]).reshape(x.shape)
    results = {}
    for kind, cast in (("ref64", torch.float64), ("same", dtype)):
        leaves = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in (x, a, bb)]
        yr = lora_linear_ref(leaves[0], w.to(cast), b.to(cast) if b is not None else None, leaves[1], leaves[2],
                             scale, p, dropout_mask=mask)
        results[kind] = [yr] + grads_of(yr, g.to(cast), leaves)
    for name, o, r64, same in zip(("y", "dx", "dA", "dB"), got, results["ref64"], results["same"]):
        if r64 is None:
            assert o is None, f"{name} should not have been computed"
            continue
        assert o is not None and o.dtype == dtype and o.shape == r64.shape, name
        assert torch.isfinite(o).all(), f"{name} has non-finite entries (unwritten output?)"
        err, base = rel_err(o, r64), rel_err(same, r64)
        bound = 2 * base + error_floor(dtype, x.shape[-1] + w.shape[0] + a.shape[0])
        assert err <= bound, f"{name}: rel err {err:.3e} vs torch-{dtype} {base:.3e} (bound {bound:.3e})"
    return got


# ------------------------------------------------------------------------------------------------------------
# The kernels' dropout mask, rebuilt in numpy from its definition (no Triton, no torch RNG)
# ------------------------------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)
# triton.language.random (triton 3.6): Philox4x32 constants, n_rounds = 10
_PHILOX_KEY_A, _PHILOX_KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_PHILOX_ROUND_A, _PHILOX_ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)


def philox4x32(seed, c0, c1, c2, c3, n_rounds=10):
    """``tl.philox(seed, c0, c1, c2, c3)`` for uint32 counters: key (k0, k1) = (low, high) 32 bits of the seed;
    each round c0 ← hi(B·c2) ^ c1 ^ k0, c2 ← hi(A·c0) ^ c3 ^ k1, c1 ← lo(B·c2), c3 ← lo(A·c0), then the key is
    bumped by the Weyl constants.  32×32-bit products are exact in uint64."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) & _M32 for c in (c0, c1, c2, c3)))
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(n_rounds):
        pa, pb = _PHILOX_ROUND_A * c0, _PHILOX_ROUND_B * c2
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & _M32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p):
    """⌊p·2¹⁶⌋ clamped to 2¹⁶−1: an element is kept iff its 16-bit draw is ≥ this (P(keep) = 1 − p up to 2⁻¹⁶)."""
    return min(int(p * 65536.0), 65535)


def philox_keep_mask(seed, shape, p, row_len=None):
    """The kernels' keep mask (``_dropout_keep``) of an n×k input, True = kept.

    One Philox call per 8 adjacent columns: element (i, j) uses the int64 counter i·⌈K/8⌉ + ⌊j/8⌋ split into
    c0 = its low and c1 = its high 32 bits (c2 = c3 = 0), and 16 bits of its output: lane l = j mod 8 takes the low
    (l even) or high (l odd) half of r_(l // 2).  ``row_len`` is K in that formula (default k; a larger value
    emulates a row of that length)."""
    n, k = shape
    per_row = -(-(k if row_len is None else row_len) // 8)
    groups = -(-k // 8)
    counter = (np.arange(n, dtype=np.uint64)[:, None] * np.uint64(per_row)
               + np.arange(groups, dtype=np.uint64)[None, :])
    lanes = philox4x32(seed, counter & _M32, counter >> np.uint64(32), 0, 0)
    halves = [h for r in lanes for h in (r & np.uint64(0xFFFF), r >> np.uint64(16))]
    draws = np.stack(halves, axis=-1).reshape(n, 8 * groups)[:, :k]
    return draws >= np.uint64(dropout_threshold(p))


# ------------------------------------------------------------------------------------------------------------
# A tiny float64 model for surgery, adapters, compile and distributed tests
# ------------------------------------------------------------------------------------------------------------

DT64 = torch.float64


class Tiny(nn.Module):
    def __init__(self, dt=DT64):
        super().__init__()
        self.embed = nn.Embedding(50, 16, dtype=dt)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(16, 16, dtype=dt), "v_proj": nn.Linear(16, 16, dtype=dt),
                           "up_proj": nn.Linear(16, 32, dtype=dt), "down_proj": nn.Linear(32, 16, dtype=dt)})
            for _ in range(2))
        self.lm_head = nn.Linear(16, 50, bias=False, dtype=dt)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, idx):
        h = self.embed(idx)
        for b in self.blocks:
            h = h + b["v_proj"](torch.tanh(b["q_proj"](h)))
            h = h + b["down_proj"](torch.relu(b["up_proj"](h)))
        return self.lm_head(h)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedLoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g, dtype=DT64) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=DT64) * 0.1)


IDX = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------------
# "Left as it was": a model's complete state, compared bit for bit
# ------------------------------------------------------------------------------------------------------------

_NO_CONFIG = object()


def _bits(t):
    t = t.detach().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.numel() else t


def snapshot(model):
    """Everything a failed call must leave as it was: the module tree (names, types, identities, training modes),
    every parameter and buffer (identity, dtype, bits, requires_grad), each LoRA layer's config and merged flag, and
    the model's recorded LoRAConfig."""
    tensors = {}
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for n, t in items:
            tensors[f"{kind}:{n}"] = (id(t), t.dtype, tuple(t.shape), _bits(t).clone(), t.requires_grad)
    return {
        "modules": [(n, type(m), id(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "tensors": tensors,
        "layers": {n: (m.lora_config, m.merged) for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)},
        "config": getattr(model, "_lora_kernels_config", _NO_CONFIG),
    }


def assert_unchanged(model, snap):
    """``model`` is bit-identical to ``snapshot`` ``snap`` (each difference is named)."""
    now = snapshot(model)
    assert now["modules"] == snap["modules"], "the module tree (names, types, identities or training modes) changed"
    assert now["tensors"].keys() == snap["tensors"].keys(), "the set of parameters / buffers changed"
    for name, (ident, dtype, shape, bits, grad) in snap["tensors"].items():
        ident2, dtype2, shape2, bits2, grad2 = now["tensors"][name]
        assert (ident2, dtype2, shape2) == (ident, dtype, shape), f"{name}: replaced"
        assert torch.equal(bits2, bits), f"{name}: values changed"
        assert grad2 == grad, f"{name}: requires_grad changed from {grad} to {grad2}"
    assert now["layers"] == snap["layers"], "a LoRA layer's config or merged flag changed"
    assert now["config"] is snap["config"] or now["config"] == snap["config"], "the recorded LoRAConfig changed"


# ------------------------------------------------------------------------------------------------------------
# Whole-model comparisons against a reference implementation (PEFT)
# ------------------------------------------------------------------------------------------------------------

def assert_matches_reference(got, same, ref64, k, what="output"):
    """``got`` (ours, in some dtype) against a reference implementation run in float64 (``ref64``), with the bound of
    ``run_and_compare``: 2 × the error of the same reference run in ``got``'s dtype (``same``) + ``error_floor`` for
    a reduction length ``k`` (the sum of the reductions along the model's path).  Returns (ours, theirs) errors."""
    err, base = rel_err(got, ref64), rel_err(same, ref64)
    bound = 2 * base + error_floor(got.dtype, k)
    assert err <= bound, f"{what}: rel err {err:.3e} vs the reference's own {base:.3e} (bound {bound:.3e})"
    return err, base


# ------------------------------------------------------------------------------------------------------------
# What lora_linear saves for backward (the contract, checked from three test modules)
# ------------------------------------------------------------------------------------------------------------

SAVED_ACTIVATIONS = {"B": ("t",), "AB": ("x", "t"), "A": ("x",)}  # per mode; plus one CPU int64 seed, always


def check_saved_for_backward(x, w, b, a, bb, p, mode):
    """Run ``lora_linear``'s forward under ``saved_tensors_hooks`` and check the contract every backend meets: one
    CPU int64 scalar seed; besides the parameters (saved by reference), B-only keeps t (N×r) and never anything
    N×in, AB keeps x and t, A-only keeps x; x is the caller's own tensor (same storage, no copy), and no mask is
    stored.  Returns (y, the saved activations) for dtype checks by the caller."""
    n, d_in, r = x.shape[0], x.shape[1], a.shape[0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 1.0, p)
    params = {w.data_ptr(), a.data_ptr(), bb.data_ptr()}
    seeds = [t for t in saved if t.dim() == 0 and t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].device.type == "cpu", "the dropout seed is saved as one CPU int64 scalar"
    acts = [t for t in saved if t.data_ptr() not in params and t.dim() > 0]
    want = {"x": (n, d_in), "t": (n, r)}
    assert sorted(tuple(t.shape) for t in acts) == sorted(want[k] for k in SAVED_ACTIVATIONS[mode])
    for t in acts:
        if t.shape == (n, d_in):
            assert t.data_ptr() == x.data_ptr(), "x must be saved as-is, not copied"
    if mode == "B":
        assert all(t.numel() < n * d_in for t in acts), "B-only keeps nothing N×in"
    return y, acts


def tiny_llama(seed=0, dtype=torch.float32, intermediate=96):
    """A 2-layer LLaMA; intermediate 96 puts the NF4 blocks of down_proj (in = 96) across rows."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


# ------------------------------------------------------------------------------------------------------------
# bitsandbytes 4-bit layers on the CPU (tests that use it importorskip bitsandbytes first)
# ------------------------------------------------------------------------------------------------------------

def bnb_linear4bit(weight, bias=None, *, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=None,
                   quant_storage=torch.uint8):
    """A quantized bitsandbytes ``Linear4bit`` holding ``weight`` (and ``bias``), on the CPU.

    bitsandbytes quantizes a ``Params4bit`` the first time it is moved to a device, CPU included: ``.to("cpu")``
    (or ``.cpu()``) on the layer does it (0.50; a layer that was never moved is not quantized).  ``Linear4bit``'s
    constructor takes no block size and builds an fp32 weight, so the ``Params4bit`` is made here from ``weight``
    itself (its dtype becomes ``quant_state.dtype``).  The layer stays in training mode: in eval mode, with an input
    that needs no grad, bitsandbytes repacks the weight in place for its AVX512-BF16 CPU kernel."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type,
                                     quant_storage=quant_storage, module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")
