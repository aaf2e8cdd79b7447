"""The papers' qualitative claims on their toy problems, over several seeds (small sizes, CPU, float64).

Thresholds sit well inside the margins measured over seeds 0-4 (see each assertion); the plotting scripts
bench/experiments/{lora_one_toy,asymmetry_toy}.py run the same functions at full size.
"""

import pytest

from tests.helpers import load_repo_module


def _load(name):
    return load_repo_module("bench", "experiments", f"{name}.py")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lora_one_spectral_init_beats_random_init(seed):
    """LoRA-One toy (d=k=100, N=1600, rank-4 ΔW, r=8): after 20 steps the spectral init + preconditioned GD is
    at risk ≤ 1e-9 (measured) where random init + GD is still ≥ 0.16; and its first iterate is already aligned
    with ΔW's singular subspaces (sinΘ ≈ 0.2) while random init is not (≈ 0.97-1)."""
    curves = _load("lora_one_toy").run(seed, steps=20)
    (risk_rand, align_rand), (risk_one, align_one) = curves["random"], curves["lora_one"]
    assert risk_one[20] < 1e-6 and risk_rand[20] > 0.05
    assert risk_one[0] < risk_rand[0]
    assert align_one[1] < 0.4 and align_rand[1] > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_asymmetry_b_only_beats_a_only_with_anisotropic_inputs(seed):
    """Final loss ratio B-only / A-only: 0.70-0.84 with covariance ∝ 1/i (measured), 0.97-1.03 isotropic."""
    toy = _load("asymmetry_toy")
    aniso = toy.run(seed, True, d=32, n=2048, steps=200, r=4)
    iso = toy.run(seed, False, d=32, n=2048, steps=200, r=4)
    assert aniso["B"][-1] / aniso["A"][-1] < 0.9
    assert abs(iso["B"][-1] / iso["A"][-1] - 1.0) < 0.06
    # both arms really trained (the loss fell from 1) and converged (flat over the last 20 steps)
    for arm in (aniso["B"], aniso["A"], iso["B"], iso["A"]):
        assert arm[-1] < 0.95 and abs(arm[-1] - arm[-20]) < 1e-3
