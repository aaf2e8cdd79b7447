"""LoRA-One / LoRA-GA / PiSSA inits: the factors against a float64 reference built directly from autograd, state
restoration, failure atomicity, the sketch path, and identical results across 2 gloo processes.

Models are float64 so that every layer takes the PyTorch path (exact, and fast under TRITON_INTERPRET=1).
"""

import copy
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear, lora_ga_init, lora_one_init, pissa_init
from lora_kernels.ops.rsvd import principal_sine

DT = torch.float64


def mlp(seed=0, r=4, dims=(24, 32, 32, 16), mode="AB", rslora=True):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1], dtype=DT)
        layers.append(FusedLoRALinear.from_linear(lin, r=r, lora_alpha=2 * r, mode=mode, use_rslora=rslora))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def data(seed=0, n=256, d_in=24, d_out=16, batch=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=DT)
    Y = torch.randn(n, d_out, generator=g, dtype=DT)
    return [(X[i:i + batch], Y[i:i + batch]) for i in range(0, n, batch)]


def mse(model, b):
    return (model(b[0]) - b[1]).pow(2).mean()


def reference_grads(model, batches):
    """Mean over batches of ∇_W L for each FusedLoRALinear weight, straight from autograd (float64)."""
    m = copy.deepcopy(model)
    layers = [x for x in m.modules() if isinstance(x, FusedLoRALinear)]
    for p in m.parameters():
        p.requires_grad_(False)
    for x in layers:
        x.weight.requires_grad_(True)
    for b in batches:
        mse(m, b).backward()
    return [x.weight.grad / len(batches) for x in layers]


def fused(model):
    return [x for x in model.modules() if isinstance(x, FusedLoRALinear)]


@pytest.mark.parametrize("step_size", [None, 0.3])
def test_lora_one_exact_matches_reference(step_size):
    model, batches = mlp(), data()
    grads = reference_grads(model, batches)
    report = lora_one_init(model, batches, mse, step_size=step_size, progress=False)
    assert report.num_batches == len(batches) and len(report.layers) == 3
    for layer, g, lrep in zip(fused(model), grads, report.layers):
        r = layer.r
        U, S, Vh = torch.linalg.svd(-g)
        best = (U[:, :r] * S[:r]) @ Vh[:r]  # [−G]_r
        delta = layer.scaling * layer.lora_B @ layer.lora_A
        expected = step_size * best if step_size is not None else layer.scaling * best / (S[0] * 128.0)
        assert ((delta - expected).norm() / expected.norm()) < 1e-4
        # the factors themselves: B₀ = U√S·c and A₀ = √S Vᵀ·c (balanced), columns/rows span the top-r subspaces
        assert principal_sine(layer.lora_B, U[:, :r]) < 1e-4
        assert principal_sine(layer.lora_A.mT, Vh[:r].mT) < 1e-4
        assert torch.allclose(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1), rtol=1e-6)
        assert abs(lrep.energy - float(S[:r].pow(2).sum() / S.pow(2).sum())) < 1e-5
        assert lrep.top_singular_values[0] == pytest.approx(float(S[0]), rel=1e-5)


def test_state_restored_and_no_gradients_left():
    model, batches = mlp(mode="B"), data()
    model.eval()
    model[0].lora_B.requires_grad_(False)  # a custom flag pattern must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lora_one_init(model, batches, mse, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_weights_not_modified_and_default_loss_and_num_batches():
    model = mlp()
    w0 = [x.weight.detach().clone() for x in fused(model)]

    class Wrapper(nn.Module):  # model(batch) returns the loss itself: the default loss_fn
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, b):
            return mse(self.m, b)

    report = lora_one_init(Wrapper(model), iter(data()), num_batches=2, progress=True)
    assert report.num_batches == 2
    assert all(torch.equal(a, b.weight) for a, b in zip(w0, fused(model)))
    assert "LoRA-One" in str(report)


def test_hf_style_dict_batches_use_model_loss():
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x, labels):
            return {"loss": (self.body(x) - labels).pow(2).mean()}

    model = HF()
    batches = [{"x": x, "labels": y} for x, y in data()]
    lora_one_init(model, batches, progress=False)
    assert fused(model)[0].lora_B.abs().sum() > 0


def test_sketch_matches_exact_on_low_rank_gradients():
    """A single linear layer on a rank-3 regression target: G has rank 3, so the sketch recovers it exactly."""
    torch.manual_seed(0)
    d, k = 40, 30
    X = torch.randn(512, d, dtype=DT)
    dW = torch.randn(k, 3, dtype=DT) @ torch.randn(3, d, dtype=DT)
    Y = X @ dW.mT
    batches = [(X[i:i + 128], Y[i:i + 128]) for i in range(0, 512, 128)]
    results = {}
    for method in ("exact", "sketch"):
        lin = nn.Linear(d, k, bias=False, dtype=DT)
        nn.init.zeros_(lin.weight)
        layer = FusedLoRALinear.from_linear(lin, r=3, lora_alpha=3)
        lora_one_init(layer, batches, mse, method=method, step_size=1.0, progress=False,
                      generator=torch.Generator().manual_seed(1))
        results[method] = layer.scaling * layer.lora_B @ layer.lora_A
    err = (results["sketch"] - results["exact"]).norm() / results["exact"].norm()
    assert err < 1e-6


def test_sketch_memory_is_small_and_accumulate_on_cpu():
    from lora_kernels.init.collect import collect_gradients

    # Sketches save memory when k = 2r+1 ≪ min(in, out) (for a 256→16 layer the Ψ-sketch would be as big as G).
    model = mlp(dims=(24, 256, 128, 16))[:3]
    batches = [(x, torch.randn(x.shape[0], 128, dtype=DT)) for x, _ in data()]
    got = collect_gradients(model, batches, mse, method="sketch", progress=False)
    for name, sk in got.sketches.items():
        out_f, in_f = dict(model.named_modules())[name].weight.shape
        assert sk.Y.numel() + sk.W.numel() < 0.5 * out_f * in_f
    got = collect_gradients(model, batches, mse, method="exact", accumulate_on="cpu", progress=False)
    assert all(t.device.type == "cpu" for t in got.grads.values())


def test_rank_larger_than_layer_is_clamped_with_warning():
    torch.manual_seed(0)
    layer = FusedLoRALinear.from_linear(nn.Linear(6, 5, dtype=DT), r=8, lora_alpha=8)
    batches = [(torch.randn(32, 6, dtype=DT), torch.randn(32, 5, dtype=DT))]
    with pytest.warns(UserWarning, match="clamped to 5"):
        rep = lora_one_init(layer, batches, mse, progress=False)
    assert rep.layers[0].clamped and rep.layers[0].rank == 5
    assert (layer.lora_A[5:] == 0).all() and (layer.lora_B[:, 5:] == 0).all()
    assert layer.lora_A[:5].abs().sum() > 0


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["no-layers", "empty", "non-scalar", "nan", "zero-grad", "bad-method", "bad-gamma"])
def test_bad_input_leaves_model_unchanged(case):
    model, batches, loss = mlp(), data(), mse
    kwargs = {}
    if case == "no-layers":
        model = nn.Sequential(nn.Linear(4, 4))
        match = "no FusedLoRALinear"
    elif case == "empty":
        batches, match = [], "empty"
    elif case == "non-scalar":
        loss, match = (lambda m, b: (m(b[0]) - b[1]).pow(2)), "scalar"
    elif case == "nan":
        batches = [(b[0] * float("nan"), b[1]) for b in batches]
        match = "NaN"
    elif case == "zero-grad":
        loss, match = (lambda m, b: m[0](b[0]).sum() * 0.0 + m(b[0]).sum() * 0.0 + m[0](b[0]).sum() * 0), "zero"
    elif case == "bad-method":
        kwargs, match = {"method": "svd"}, "method"
    else:
        kwargs, match = {"gamma": 0.0}, "gamma"
    snap = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        lora_one_init(model, batches, loss, progress=False, **kwargs)
    assert _unchanged(model, snap)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_lora_ga_keeps_output_and_uses_the_right_singular_vectors():
    model, batches = mlp(r=3, rslora=False), data()
    x = batches[0][0]
    with torch.no_grad():
        y0 = model(x)
    grads = reference_grads(model, batches)
    lora_ga_init(model, batches, mse, progress=False)
    model.eval()
    with torch.no_grad():
        y1 = model(x)
    assert torch.allclose(y0, y1, atol=1e-10), "LoRA-GA must leave the initial output unchanged"
    for layer, g in zip(fused(model), grads):
        r = layer.r
        U, S, Vh = torch.linalg.svd(g)
        c = layer.out_features ** 0.25 / math.sqrt(16.0)
        assert principal_sine(layer.lora_A.mT, Vh[:r].mT) < 1e-4
        assert principal_sine(layer.lora_B, U[:, r:2 * r]) < 1e-4
        assert torch.allclose(layer.lora_A.norm(dim=1), torch.full((r,), c, dtype=DT), rtol=1e-6)
        assert torch.allclose(layer.lora_B.norm(dim=0), torch.full((r,), c, dtype=DT), rtol=1e-6)


def test_pissa_splits_principal_part():
    model = mlp(r=4)
    w0 = [x.weight.detach().clone() for x in fused(model)]
    x = torch.randn(10, 24, dtype=DT)
    with torch.no_grad():
        y0 = model.eval()(x)
    default = copy.deepcopy(model)
    pissa_init(default)  # output invariance holds whatever the SVD accuracy
    with torch.no_grad():
        assert torch.allclose(y0, default(x), atol=1e-10)
    # random nn.Linear weights have nearly flat spectra (tiny gap after σ₄): ask rsvd for accuracy to check the math
    rep = pissa_init(model, niter=30, oversample=16)
    with torch.no_grad():
        y1 = model(x)
    assert torch.allclose(y0, y1, atol=1e-10)
    for layer, w in zip(fused(model), w0):
        U, S, Vh = torch.linalg.svd(w)
        principal = (U[:, :4] * S[:4]) @ Vh[:4]
        delta = layer.scaling * layer.lora_B @ layer.lora_A
        assert ((delta - principal).norm() / principal.norm()) < 1e-4
        assert ((layer.weight - (w - principal)).norm() / w.norm()) < 1e-4
    assert all(0 < lr.energy <= 1 for lr in rep.layers)


# ------------------------------------------------------------------------------------------------------------
# torch.distributed: 2 CPU processes on gloo get identical A₀, B₀, equal to a single process on all batches
# ------------------------------------------------------------------------------------------------------------

def _dist_worker(rank, world, init_file, out_dir, method):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches = mlp(), data()
        mine = batches[rank::world]
        lora_one_init(model, mine, mse, method=method, progress=False, generator=torch.Generator().manual_seed(5))
        torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_distributed_two_processes_identical(method):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_dist_worker, args=(2, init_file, tmp, method), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "0.pt"))
        r1 = torch.load(os.path.join(tmp, "1.pt"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs across ranks"
    single, batches = mlp(), data()
    lora_one_init(single, batches, mse, method=method, progress=False, generator=torch.Generator().manual_seed(5))
    for k, v in single.state_dict().items():
        if "lora_" in k:
            assert torch.allclose(v, r0[k], atol=1e-10, rtol=1e-8), f"{k}: distributed result differs from single"


def test_no_warning_at_normal_ranks():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_one_init(mlp(), data(), mse, progress=False)


# ------------------------------------------------------------------------------------------------------------
# Regressions from the review of the init code
# ------------------------------------------------------------------------------------------------------------

def test_shared_weight_layers_each_get_the_full_gradient():
    from lora_kernels.init.collect import collect_gradients

    torch.manual_seed(0)
    base = nn.Linear(12, 12, bias=False, dtype=DT)
    a = FusedLoRALinear.from_linear(base, r=2)
    b = FusedLoRALinear.from_linear(base, r=2)  # same weight object, used twice
    model = nn.Sequential(a, nn.Tanh(), b)
    batches = [(torch.randn(16, 12, dtype=DT), torch.randn(16, 12, dtype=DT))]
    got = collect_gradients(model, batches, mse, progress=False)
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref[0].weight.requires_grad_(True)
    mse(ref, batches[0]).backward()
    for name in ("0", "2"):
        assert torch.allclose(got.grads[name], ref[0].weight.grad)
    with pytest.raises(ValueError, match="share one weight"):
        lora_ga_init(model, batches, mse, progress=False)


def test_existing_weight_grad_is_not_mixed_in_and_is_restored():
    model, batches = mlp(), data()
    w = fused(model)[0].weight
    w.grad = torch.full_like(w, 100.0)
    grads = reference_grads(model, batches)
    from lora_kernels.init.collect import collect_gradients

    got = collect_gradients(model, batches, mse, progress=False)
    assert torch.allclose(got.grads["0"], grads[0])
    assert w.grad is not None and (w.grad == 100.0).all()


def test_sketch_size_must_exceed_the_rank():
    with pytest.raises(ValueError, match="sketch_size"):
        lora_one_init(mlp(), data(), mse, method="sketch", sketch_size=3, progress=False)


@pytest.mark.parametrize("init", ["lora_one", "lora_ga", "pissa"])
def test_conv1d_layers_give_the_same_init_as_the_equivalent_linear(init):
    """A transformers Conv1D stores W as in×out (fan_in_fan_out): the inits must read, collect and write W through
    its out×in view, so a Conv1D model and the nn.Linear model with the transposed weights end identical."""
    from transformers.pytorch_utils import Conv1D

    lin_model = mlp(seed=3)
    conv_model = copy.deepcopy(lin_model)
    for i, m in enumerate(list(conv_model)):
        if isinstance(m, FusedLoRALinear):
            conv = Conv1D(m.out_features, m.in_features).to(DT)
            with torch.no_grad():
                conv.weight.copy_(m.weight.t())
                conv.bias.copy_(m.bias)
            new = FusedLoRALinear.from_linear(conv, r=m.r, lora_alpha=m.lora_alpha, use_rslora=m.use_rslora)
            with torch.no_grad():
                new.lora_A.copy_(m.lora_A)
                new.lora_B.copy_(m.lora_B)
            conv_model[i] = new
    batches = data()
    for model in (lin_model, conv_model):
        if init == "lora_one":
            lora_one_init(model, batches, mse, progress=False, generator=torch.Generator().manual_seed(1))
        elif init == "lora_ga":
            lora_ga_init(model, batches, mse, progress=False, generator=torch.Generator().manual_seed(1))
        else:
            pissa_init(model, generator=torch.Generator().manual_seed(1))
    for a, b in zip(fused(lin_model), fused(conv_model)):
        assert b.fan_in_fan_out and not a.fan_in_fan_out
        # Singular vectors are defined up to sign (LoRA-GA's B takes the weakly separated σ_r+1..σ_2r, where 1e-16
        # differences in the summed gradient can flip one): align each rank-1 term's sign before comparing.
        sign = torch.sign((a.lora_A * b.lora_A).sum(1))
        assert torch.allclose(a.lora_A, b.lora_A * sign[:, None], rtol=1e-9, atol=1e-12)
        sign_b = torch.sign((a.lora_B * b.lora_B).sum(0))
        assert torch.allclose(a.lora_B, b.lora_B * sign_b[None, :], rtol=1e-9, atol=1e-12)
        delta_a, delta_b = a.lora_B @ a.lora_A, b.lora_B @ b.lora_A
        assert torch.allclose(a.weight + a.scaling * delta_a, b.weight.t() + b.scaling * delta_b, rtol=1e-9,
                              atol=1e-12)
    x = batches[0][0]
    assert torch.allclose(lin_model(x), conv_model(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batches", [None, 3])
def test_batches_that_are_not_iterable_are_named(batches):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="batches must be an iterable"):
        lora_one_init(model, batches, mse, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
