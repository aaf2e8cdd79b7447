"""torch.library custom ops: opcheck on both, and torch.compile(fullgraph=True) with no graph break.

Compiled runs draw the dropout seed with inductor's RNG, so compiled-vs-eager comparisons use p = 0 or an explicit
seed.  CPU compilation uses inductor's C++ backend (the host compiler); the GPU variant is marked ``gpu``.
"""

import pytest
import torch

import lora_kernels.ops.fused_lora_linear  # noqa: F401  (registers torch.ops.lora_kernels.*)
from lora_kernels import FusedLoRALinear, lora_linear
from tests.helpers import IDX, randomise_adapters, tiny

OPS = torch.ops.lora_kernels


def _args(dtype, device="cpu", n=13, d_in=24, d_out=20, r=4):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    return mk(n, d_in), mk(d_out, d_in), mk(d_out), mk(r, d_in), mk(d_out, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32-kernels", "fp64-torch-path"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_forward_and_backward_ops(dtype, p):
    x, w, b, a, bb = _args(dtype)
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(OPS.lora_fwd.default, (x, w, b, a, bb, 0.5, p, seed))
    torch.library.opcheck(OPS.lora_fwd.default, (x, w, None, a, bb, 0.5, p, seed))
    y, t = OPS.lora_fwd(x, w, b, a, bb, 0.5, p, seed)
    g = torch.randn_like(y)
    for flags in ((True, True, True), (True, False, True), (False, True, False)):
        torch.library.opcheck(OPS.lora_bwd.default, (g, x, t, w, a, bb, 0.5, p, seed, *flags))


def test_ops_match_the_eager_path():
    x, w, b, a, bb = _args(torch.float32)
    seed = torch.tensor(5, dtype=torch.int64)
    y_op, _ = OPS.lora_fwd(x, w, b, a, bb, 0.5, 0.2, seed)
    y = lora_linear(x, w, b, a, bb, 0.5, 0.2, seed=5)
    assert torch.equal(y_op, y)


def _grads(fn, x, params):
    y = fn(x)
    y.float().pow(2).sum().backward()
    out = [y.detach().clone()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_compile_fullgraph_functional_cpu(p):
    torch._dynamo.reset()
    x, w, b, a, bb = _args(torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    x.requires_grad_()

    def f(inp):
        return lora_linear(inp, w, b, a, bb, 0.5, p, seed=torch.tensor(3, dtype=torch.int64))

    eager = _grads(f, x, [x, a, bb])
    compiled = _grads(torch.compile(f, fullgraph=True), x, [x, a, bb])
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_injected_model_cpu():
    torch._dynamo.reset()
    from lora_kernels import inject_lora

    model = inject_lora(tiny(), r=4).to(torch.float32)
    randomise_adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = _grads(lambda i: model(i), IDX, params)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = _grads(lambda i: compiled_model(i), IDX, params)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compile_fullgraph_gpu_bf16():
    torch._dynamo.reset()
    layer = FusedLoRALinear(512, 384, r=16, lora_dropout=0.0, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 100, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = _grads(layer, x, [x, layer.lora_A, layer.lora_B])
    compiled = _grads(torch.compile(layer, fullgraph=True), x, [x, layer.lora_A, layer.lora_B])
    for e, c in zip(eager, compiled):
        assert torch.allclose(e.float(), c.float(), rtol=2e-2, atol=2e-2)


# -- a 4-bit NF4 base (QLoRA): the op pair that takes the NF4 tensors as arguments -------------------------------

def _nf4_args(double_quant):
    from lora_kernels.ops.lora_linear.function import nf4_parts
    from lora_kernels.ops.lora_linear.nf4_weight import NF4Weight
    from lora_kernels.quant import quantize_nf4

    x, w, b, a, bb = _args(torch.float32, d_in=100, d_out=30)
    return x, nf4_parts(NF4Weight(quantize_nf4(w, double_quant=double_quant))), b, a, bb


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_nf4_ops(double_quant, p):
    x, parts, b, a, bb = _nf4_args(double_quant)
    seed = torch.tensor(7, dtype=torch.int64)
    torch.library.opcheck(OPS.lora_fwd_nf4.default, (x, *parts, b, a, bb, 0.5, p, seed))
    y, t = OPS.lora_fwd_nf4(x, *parts, b, a, bb, 0.5, p, seed)
    g = torch.randn_like(y)
    for flags in ((True, True, True), (True, False, True), (False, False, True)):
        torch.library.opcheck(OPS.lora_bwd_nf4.default, (g, x, t, *parts, a, bb, 0.5, p, seed, *flags))


def test_compile_fullgraph_4bit_model_cpu():
    """A tiny LLaMA on an NF4 base (our NF4Linear), injected, compiled with fullgraph=True: the same logits and
    LoRA gradients as eager (p = 0: compiled runs draw dropout seeds with inductor's RNG)."""
    torch._dynamo.reset()
    from lora_kernels import inject_lora, quantize_model
    from tests.helpers import tiny_llama

    model = tiny_llama()
    quantize_model(model)
    inject_lora(model, "all-linear", r=4, mode="B")
    for m in model.modules():
        if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.Parameter):
            with torch.no_grad():
                m.lora_B.normal_(std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = IDX % 64
    eager = _grads(lambda i: model(i).logits, ids, params)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = _grads(lambda i: compiled_model(i).logits, ids, params)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-4, atol=1e-5)
