"""LC algorithm for low-rank compression (paper 003 section 3): C step, penalties, schedule, state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compresslight.compression.lc import (
    FlopsCost,
    LayerCosts,
    LowRankLC,
    StorageCost,
    c_step_layer,
    lc_penalty,
    mu_schedule,
    penalty_gradient,
    update_multiplier,
)
from compresslight.compression.lowrank import (
    LowRankRecord,
    compressible_layers,
    factorized_structure,
    layer_config,
    low_rank_weights,
    max_rank,
    to_matrix,
)
from compresslight.compression.record import replay
from compresslight.compression.runtime_model import LayerRuntime, RuntimeEnvironment, RuntimeModel


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def synthetic_runtime_model(model: nn.Module, dense_ms: float = 1.0, slope_ms: float = 0.05) -> RuntimeModel:
    """A runtime model with known lines (no timing), for exact tests of the C step."""
    layers = {}
    for name, layer in compressible_layers(model).items():
        layers[name] = LayerRuntime(
            config={}, input_shape=[1], max_rank=max_rank(layer), ranks=[1, 2], latencies_s=[0.0, 0.0],
            dense_s=dense_ms * 1e-3, intercept_s=0.1e-3, slope_s=slope_ms * 1e-3,
        )  # fmt: skip
    environment = RuntimeEnvironment("torch", "cpu", "test CPU", 1, 1, torch.__version__, None, 0, 1)
    architecture = {name: layer_config(layer) for name, layer in compressible_layers(model).items()}
    return RuntimeModel(layers, environment, [1, 3, 8, 8], 5e-3, architecture)


def brute_force(target: torch.Tensor, costs: LayerCosts, mu: float, lam: float) -> tuple[int, bool, float]:
    """Every option by explicit truncation: (rank, dense, objective)."""
    full = min(to_matrix(target).shape)
    options = []
    for rank in range(full + 1):
        error = float((target.double() - low_rank_weights(target.double(), rank)).pow(2).sum())
        options.append((lam * costs.factorized[rank] + mu / 2 * error, rank, False))
    options.append((lam * costs.dense, full, True))
    objective, rank, dense = min(options, key=lambda option: (round(option[0], 9), option[1]))
    return rank, dense, objective


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 3, 3), (5, 2, 3, 1)])
def test_c_step_enumeration_matches_brute_force(shape: tuple[int, ...], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    full = min(to_matrix(target).shape)
    rng = np.random.default_rng(seed)
    costs = LayerCosts(factorized=np.sort(rng.uniform(0, 2, full + 1)), dense=float(rng.uniform(0.5, 2.5)))
    mu, lam = float(rng.uniform(0.5, 3)), float(rng.uniform(0.1, 2))
    result = c_step_layer(target, costs, mu=mu, lam=lam)
    rank, dense, objective = brute_force(target, costs, mu, lam)
    assert (result.rank, result.dense) == (rank, dense) or result.objective == pytest.approx(objective)
    assert result.objective == pytest.approx(objective, rel=1e-9)
    assert result.theta.shape == target.shape
    assert torch.linalg.matrix_rank(to_matrix(result.theta)).item() == result.rank
    torch.testing.assert_close(result.theta, low_rank_weights(target, result.rank))
    assert result.error == pytest.approx(float((target - result.theta).pow(2).sum()), abs=1e-9)


def test_c_step_extreme_lambda() -> None:
    torch.manual_seed(0)
    target = torch.randn(4, 3, 3, 3)
    costs = LayerCosts(factorized=np.linspace(0.1, 1.0, 10), dense=2.0)
    cheap = c_step_layer(target, costs, mu=1.0, lam=1e9)
    assert cheap.rank == 0 and not cheap.dense
    assert torch.count_nonzero(cheap.theta) == 0
    exact = c_step_layer(target, costs, mu=1.0, lam=0.0)
    assert exact.rank == 9 and not exact.dense  # the factorized full rank is cheaper than dense
    assert torch.equal(exact.theta, target)
    dense = c_step_layer(target, LayerCosts(factorized=costs.factorized, dense=0.5), mu=1.0, lam=0.0)
    assert dense.rank == 9 and dense.dense and dense.cost == 0.5


def test_c_step_prefers_dense_over_every_slower_factorization() -> None:
    torch.manual_seed(0)
    target = torch.randn(8, 8)
    # Factorized is slower than dense from rank 3 on: only ranks 0..2 or dense can win.
    costs = LayerCosts(factorized=np.arange(9, dtype=float), dense=2.5)
    for lam in (1e-3, 1e-1, 1.0, 10.0):
        result = c_step_layer(target, costs, mu=1.0, lam=lam)
        assert result.dense or result.rank <= 2


def test_c_step_errors() -> None:
    target = torch.randn(4, 3)
    costs = LayerCosts(factorized=np.zeros(4), dense=1.0)
    with pytest.raises(ValueError, match="`lam` must be >= 0, got -1"):
        c_step_layer(target, costs, mu=1.0, lam=-1)
    with pytest.raises(ValueError, match="`mu` must be > 0, got 0"):
        c_step_layer(target, costs, mu=0, lam=1.0)
    with pytest.raises(ValueError, match=r"`costs.factorized` must have 4 entries \(ranks 0..3\)"):
        c_step_layer(target, LayerCosts(factorized=np.zeros(3), dense=1.0), mu=1.0, lam=1.0)


def test_mu_schedule() -> None:
    assert mu_schedule(1e-5, 1.2, 4) == pytest.approx([1e-5, 1.2e-5, 1.44e-5, 1.728e-5])
    assert mu_schedule(2.0, 1.0, 2) == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"`mu_init` \(a of mu_t = a \* b\^t\) must be > 0, got 0"):
        mu_schedule(0, 1.2, 3)
    with pytest.raises(ValueError, match=r"`mu_growth` \(b of mu_t = a \* b\^t\) must be >= 1 so mu grows, got -1"):
        mu_schedule(1e-5, -1, 3)
    with pytest.raises(ValueError, match=r"`steps` \(T\) must be an int >= 1, got 0"):
        mu_schedule(1e-5, 1.2, 0)


@pytest.mark.parametrize("with_multiplier", [False, True])
def test_penalty_gradient_is_mu_times_difference(with_multiplier: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(5, 4, requires_grad=True)
    theta = torch.randn(5, 4)
    multiplier = torch.randn(5, 4) if with_multiplier else None
    mu = 0.7
    lc_penalty(weight, theta, mu, multiplier).backward()
    expected = mu * (weight.detach() - theta) - (multiplier if with_multiplier else 0)
    torch.testing.assert_close(weight.grad, expected)
    torch.testing.assert_close(penalty_gradient(weight, theta, mu, multiplier), expected)
    if not with_multiplier:
        assert lc_penalty(weight, theta, mu).item() == pytest.approx(mu / 2 * (weight - theta).pow(2).sum().item())


def test_multiplier_update() -> None:
    weight, theta, multiplier = torch.full((2, 2), 3.0), torch.ones(2, 2), torch.full((2, 2), 0.5)
    torch.testing.assert_close(update_multiplier(multiplier, weight, theta, 0.25), torch.full((2, 2), 0.0))


def make_lc(model: nn.Module, **kwargs) -> LowRankLC:
    arguments = {"lam": 1e-3, "mu_init": 1e-2, "mu_growth": 2.0, "steps": 3, **kwargs}
    return LowRankLC(model, synthetic_runtime_model(model), **arguments)


def test_init_state_follows_the_paper() -> None:
    model = tiny_net()
    lc = make_lc(model)
    state = lc.init_state(model)
    assert state.step == 0 and state.mu == 1e-2
    assert state.ranks == {"0": 0, "2": 0, "6": 0}
    assert all(torch.count_nonzero(theta) == 0 for theta in state.thetas.values())
    assert set(state.multipliers) == {"0", "2", "6"}
    assert make_lc(model, augmented_lagrangian=False).init_state(model).multipliers == {}


def test_c_step_updates_state_multipliers_and_mu() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    lc = make_lc(model, lam=1e-2)
    state = lc.init_state(model)
    state.multipliers = {name: torch.randn_like(value) * 1e-3 for name, value in state.multipliers.items()}
    old_multipliers = {name: value.clone() for name, value in state.multipliers.items()}
    report = lc.c_step(model, state)
    assert report.step == 0 and report.mu == 1e-2 and report.cost_unit == "ms"
    assert state.step == 1 and state.mu == pytest.approx(2e-2)
    runtime = synthetic_runtime_model(model)
    expected_cost = 0.0
    for name, layer in compressible_layers(model).items():
        weight = layer.weight.detach()
        target = weight - old_multipliers[name] / 1e-2
        single = c_step_layer(target, runtime.layer_costs(name), mu=1e-2, lam=1e-2)
        assert state.ranks[name] == single.rank
        torch.testing.assert_close(state.thetas[name], single.theta)
        torch.testing.assert_close(state.multipliers[name], old_multipliers[name] - 1e-2 * (weight - single.theta))
        expected_cost += single.cost
    assert report.cost == pytest.approx(expected_cost)
    distance = (
        sum(
            float((layer.weight.detach() - state.thetas[name]).pow(2).sum())
            for name, layer in compressible_layers(model).items()
        )
        ** 0.5
    )
    assert report.distance == pytest.approx(distance)
    assert state.history == [report.to_dict()]


def test_add_penalty_gradient_equals_autograd_of_penalty() -> None:
    torch.manual_seed(0)
    model = tiny_net()
    lc = make_lc(model)
    state = lc.init_state(model)
    lc.c_step(model, state)
    lc.penalty(model, state).backward()
    autograd = {name: layer.weight.grad.clone() for name, layer in compressible_layers(model).items()}
    model.zero_grad(set_to_none=True)
    lc.add_penalty_gradient(model, state)
    lc.add_penalty_gradient(model, state)  # accumulates like backward does
    for name, layer in compressible_layers(model).items():
        torch.testing.assert_close(layer.weight.grad, 2 * autograd[name])


def test_tolerance_stops_early() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(low_rank_weights(torch.randn(3, 4), 1))
    lc = LowRankLC(model, StorageCost(model), lam=1e-3, mu_init=1.0, mu_growth=1.5, steps=10, tolerance=1e-4)
    state = lc.init_state(model)
    assert not lc.finished(state)
    report = lc.c_step(model, state)
    assert report.distance < 1e-4 and state.converged and lc.finished(state)
    assert state.ranks["0"] == 1


def test_finished_after_steps() -> None:
    model = tiny_net()
    lc = make_lc(model, steps=2)
    state = lc.init_state(model)
    lc.c_step(model, state)
    assert not lc.finished(state)
    lc.c_step(model, state)
    assert lc.finished(state)
    # tolerance 0 never stops early, even when W equals Theta.
    exact = make_lc(model, lam=0.0, steps=5)
    exact_state = exact.init_state(model)
    assert exact.c_step(model, exact_state).distance == 0.0
    assert not exact.finished(exact_state)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_net()
    lc = make_lc(model)
    state = lc.init_state(model)
    lc.c_step(model, state)
    torch.save(state.state_dict(), tmp_path / "lc.pt")
    restored = make_lc(model).init_state(model)
    restored.load_state_dict(torch.load(tmp_path / "lc.pt"))
    assert (restored.step, restored.mu, restored.ranks, restored.dense, restored.history) == (
        state.step, state.mu, state.ranks, state.dense, state.history,
    )  # fmt: skip
    for name in state.thetas:
        assert torch.equal(restored.thetas[name], state.thetas[name])
        assert torch.equal(restored.multipliers[name], state.multipliers[name])
    # The restored state continues exactly like the original.
    assert lc.c_step(model, restored).to_dict() | {"seconds": 0} == lc.c_step(model, state).to_dict() | {"seconds": 0}
    # A state saved elsewhere (here: another dtype) is moved to the weights' device and dtype.
    other = make_lc(model).init_state(model)
    saved = state.state_dict()
    saved["thetas"] = {name: theta.double() for name, theta in saved["thetas"].items()}
    other.load_state_dict(saved)
    lc.penalty(model, other)
    assert all(theta.dtype == torch.float32 for theta in other.thetas.values())
    with pytest.raises(ValueError, match=r"`state` holds layers \['0', '2', '6'\], the algorithm compresses \['2'\]"):
        make_lc(model, layers=["2"]).penalty(model, state)
    with pytest.raises(ValueError, match=r"LC `state_dict` is missing keys \['thetas'\]"):
        restored.load_state_dict({k: v for k, v in state.state_dict().items() if k != "thetas"})


def test_compress_builds_the_theta_network_and_a_replayable_record() -> None:
    torch.manual_seed(0)
    model = tiny_net().eval()
    # Runtime model where layer "6" is cheapest dense and the convs are cheap to factorize.
    runtime = synthetic_runtime_model(model, dense_ms=1.0, slope_ms=0.01)
    runtime.layers["6"].dense_s = 1e-6
    lc = LowRankLC(model, runtime, lam=10.0, mu_init=1.0, mu_growth=1.0, steps=1)
    state = lc.init_state(model)
    lc.c_step(model, state)
    assert state.dense["6"] and not state.dense["0"] and 1 <= state.ranks["2"] < max_rank(model[2])
    expected = tiny_net().eval()
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("0", "2"):
            expected.get_submodule(name).weight.copy_(state.thetas[name])
    record = lc.compress(model, state)
    assert isinstance(record, LowRankRecord)
    assert set(record.ranks) == {"0", "2"} and isinstance(model[6], nn.Linear)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), expected(x), atol=1e-4, rtol=1e-4)
    fresh = tiny_net().eval()
    replay(fresh, [record.to_dict()])
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="Layer '0' must be a dense layer .* was the model already compressed"):
        lc.compress(model, state)


def test_compress_rank_zero_is_bias_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    lc = LowRankLC(model, StorageCost(model), lam=1e6, mu_init=1.0, mu_growth=1.0, steps=1)
    state = lc.init_state(model)
    lc.c_step(model, state)
    assert state.ranks["0"] == 0
    bias = model[0].bias.detach().clone()
    record = lc.compress(model, state)
    assert record.ranks == {"0": 1}
    torch.testing.assert_close(model(torch.randn(2, 4)), bias.expand(2, 3))


def test_compress_before_any_c_step_is_refused() -> None:
    model = tiny_net()
    lc = make_lc(model)
    with pytest.raises(ValueError, match="has no C step yet"):
        lc.compress(model, lc.init_state(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": -1.0}, "`lam` must be a number >= 0, got -1.0"),
        ({"mu_init": 0.0}, "`mu_init`"),
        ({"mu_growth": 0.0}, "`mu_growth`"),
        ({"steps": 0}, r"`steps` \(T\) must be an int >= 1"),
        ({"tolerance": -1.0}, "`tolerance` must be >= 0"),
        ({"layers": ["1"]}, r"`layers` must name compressible layers of the model \['0', '2', '6'\], got \['1'\]"),
    ],
)
def test_lc_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_lc(tiny_net(), **kwargs)


def test_lc_refuses_a_cost_for_another_architecture() -> None:
    model = tiny_net()
    other = tiny_net()
    other[2] = nn.Conv2d(6, 4, 3, stride=2, padding=1)
    other[6] = nn.Linear(16, 5)
    with pytest.raises(ValueError, match="The runtime model was measured for another architecture"):
        LowRankLC(model, synthetic_runtime_model(other), lam=1.0, mu_init=1.0, mu_growth=1.0, steps=1)
    with pytest.raises(ValueError, match="`cost` prices layer '2' at \\(13,\\) ranks, expected 19"):
        LowRankLC(model, StorageCost(other), lam=1.0, mu_init=1.0, mu_growth=1.0, steps=1)
    with pytest.raises(ValueError, match="`cost` must implement `layer_costs"):
        LowRankLC(model, object(), lam=1.0, mu_init=1.0, mu_growth=1.0, steps=1)  # type: ignore[arg-type]


def _count_macs(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total += output[0].numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    module(x)
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("rank", [1, 4])
def test_flops_and_storage_costs_count_the_factorized_layers(rank: int) -> None:
    model = tiny_net()
    x = torch.randn(1, 3, 8, 8)
    flops, storage = FlopsCost(model, x), StorageCost(model)
    inputs = {"0": x, "2": torch.randn(1, 6, 8, 8), "6": torch.randn(1, 32)}
    for name, layer in compressible_layers(model).items():
        factorized = factorized_structure(layer, rank)
        assert flops.layer_costs(name).factorized[rank] * 1e6 == pytest.approx(_count_macs(factorized, inputs[name]))
        assert flops.layer_costs(name).dense * 1e6 == pytest.approx(_count_macs(layer, inputs[name]))
        params = sum(p.numel() for p in factorized.parameters())
        assert storage.layer_costs(name).factorized[rank] * 1e6 == pytest.approx(params)
        assert storage.layer_costs(name).dense * 1e6 == pytest.approx(sum(p.numel() for p in layer.parameters()))
    with pytest.raises(ValueError, match="Layer '1' is not priced by this cost"):
        flops.layer_costs("1")


def test_short_lc_run_drives_weights_to_low_rank() -> None:
    """A few L steps (SGD on a regression task + penalty) and C steps end with W close to Theta."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    teacher = low_rank_weights(torch.randn(10, 10), 3)
    x = torch.randn(256, 10)
    y = x @ teacher.T
    lc = LowRankLC(model, StorageCost(model), lam=10.0, mu_init=1e-2, mu_growth=2.0, steps=8)
    state = lc.init_state(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    while not lc.finished(state):
        for _ in range(40):  # L step
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y) + lc.penalty(model, state)
            loss.backward()
            optimizer.step()
        report = lc.c_step(model, state)
    assert report.ranks["0"] == 3
    assert report.distance < 1e-3
    assert nn.functional.mse_loss(model(x), y).item() < 1e-3
