"""The adaptive plan's precompiled precision configurations: every configuration the runtime's rule
(α·Γ + β ≤ θ → NVFP4, else the high format; excluded layers bf16) gives for some Γ ≥ 0 is reachable, so a
measured Γ never falls back to the baked variant for want of an engine."""
import random

import torch

from ditbake.exporter.plan_adaptive import precision_breakpoints, precision_choice, reachable_precisions

LAYERS = ["a", "b", "c", "d", "e", "f"]


def _key(c: dict) -> tuple:
    return tuple(sorted(c.items()))


def test_close_break_points_keep_the_interval_between_them():
    """A Flux block of the tiny test model (exporter test_adaptive): break points 0.0227 (to_q, α < 0) and
    0.0359 (proj_out, α > 0); at Γ = 0.0339 both layers run NVFP4. Probes a relative 1e-9 beside float32
    break points missed that configuration."""
    alpha = [-0.2507046461, -1.4818925858, -0.5121808648, 0.8795542717, -0.3064964712, 0.6151524782]
    beta = [0.1358937174, 0.1963306069, 0.1497828811, 0.0239950046, 0.1479850113, 0.1081314981]
    theta = 0.13019091786946993
    excluded = [False] * 6
    reachable = {_key(c) for c in reachable_precisions(alpha, beta, excluded, theta, "int8", LAYERS)}
    want = precision_choice(alpha, beta, excluded, 0.03393154046459431, theta, "int8", LAYERS)
    assert want["a"] == "nvfp4" and want["f"] == "nvfp4"
    assert _key(want) in reachable
    assert len(reachable) == len(set(precision_breakpoints(alpha, beta, theta))) + 1  # one per interval


def test_every_gamma_gives_a_reachable_configuration():
    """Fresh random blocks (signs of α mixed, some layers excluded, some α = 0) and Γ drawn across and right
    beside the break points: the rule's choice is always among the precompiled configurations."""
    rng = random.Random(torch.seed())
    for _ in range(200):
        n = rng.randint(1, 6)
        alpha = [rng.choice([0.0, rng.uniform(-2, 2)]) for _ in range(n)]
        beta = [rng.uniform(0, 0.3) for _ in range(n)]
        excluded = [rng.random() < 0.2 for _ in range(n)]
        theta = rng.uniform(0.05, 0.25)
        layers = LAYERS[:n]
        reachable = {_key(c) for c in reachable_precisions(alpha, beta, excluded, theta, "int8", layers)}
        pts = precision_breakpoints(alpha, beta, theta)
        gammas = [rng.uniform(0, 1) for _ in range(20)] + [0.0] + \
                 [p * (1 + s) for p in pts for s in (-1e-12, 0.0, 1e-12, -1e-6, 1e-6)]
        for g in gammas:
            if g >= 0:
                assert _key(precision_choice(alpha, beta, excluded, g, theta, "int8", layers)) in reachable, (g, pts)


def test_tensor_and_list_coefficients_agree():
    alpha, beta = [0.3, -0.7, 0.0], [0.01, 0.2, 0.5]
    as_lists = reachable_precisions(alpha, beta, [False] * 3, 0.1, "fp8", LAYERS[:3])
    as_tensors = reachable_precisions(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
                                      [False] * 3, 0.1, "fp8", LAYERS[:3])
    assert as_lists == as_tensors
    assert {c["c"] for c in as_lists} == {"fp8"}  # α = 0, β > θ: never NVFP4
