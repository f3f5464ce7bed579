"""Low-rank factorization (paper 003 scheme 2) and its replayable record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresslight.compression.lowrank import (
    LowRankRecord,
    compressible_layers,
    factorize_conv,
    factorize_linear,
    factorize_model,
    factorized_structure,
    from_matrix,
    low_rank_weights,
    max_rank,
    to_matrix,
)
from compresslight.compression.record import CompressionRecord, replay


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, groups=3),  # grouped: not compressible
        )
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 3, "stride": 1, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 0},
        {"kernel_size": (3, 2), "stride": (2, 1), "padding": (2, 0), "dilation": (2, 1)},
        {"kernel_size": 2, "padding": "same"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 1, "stride": 2},
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_scheme2_conv_is_exact_at_full_rank(conv_kwargs: dict, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, bias=bias, **conv_kwargs)
    factorized = factorize_conv(conv, max_rank(conv))
    x = torch.randn(2, 3, 9, 8)
    assert [name for name, _ in factorized.named_children()] == ["v", "u"]
    assert factorized.v.kernel_size == (1, conv.kernel_size[1])
    assert factorized.u.kernel_size == (conv.kernel_size[0], 1)
    torch.testing.assert_close(factorized(x), conv(x), atol=1e-4, rtol=0)


def test_scheme2_reshape_round_trip_and_truncation_error() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    matrix = to_matrix(weight)
    assert matrix.shape == (12, 9)
    assert torch.equal(from_matrix(matrix, weight.shape), weight)
    # The truncation is the SVD truncation of the scheme-2 matrix: error = tail of the spectrum.
    singular_values = torch.linalg.svdvals(matrix)
    approx = low_rank_weights(weight, 4)
    assert approx.shape == weight.shape
    assert torch.linalg.matrix_rank(to_matrix(approx)).item() == 4
    torch.testing.assert_close((weight - approx).pow(2).sum(), singular_values[4:].pow(2).sum(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(low_rank_weights(weight, 9), weight, atol=1e-5, rtol=0)
    assert torch.count_nonzero(low_rank_weights(weight, 0)) == 0


def test_truncated_conv_factorization_equals_conv_with_truncated_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    factorized = factorize_conv(conv, 3)
    reference = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        reference.weight.copy_(low_rank_weights(conv.weight, 3))
        reference.bias.copy_(conv.bias)
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(factorized(x), reference(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_exact_at_full_rank(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(7, 4, bias=bias)
    factorized = factorize_linear(linear, 4)
    assert factorized.v.weight.shape == (4, 7) and factorized.v.bias is None
    assert factorized.u.weight.shape == (4, 4) and (factorized.u.bias is not None) == bias
    x = torch.randn(3, 7)
    torch.testing.assert_close(factorized(x), linear(x), atol=1e-5, rtol=0)


def test_factorize_with_given_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    theta = low_rank_weights(torch.randn(5, 6), 2)
    factorized = factorize_linear(linear, 2, weight=theta)
    x = torch.randn(4, 6)
    torch.testing.assert_close(factorized(x), x @ theta.T + linear.bias, atol=1e-5, rtol=0)


def test_factorize_errors() -> None:
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 9\]"):
        factorize_conv(conv, 10)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 9\]"):
        factorize_conv(conv, 0)
    with pytest.raises(ValueError, match="groups=2"):
        factorized_structure(nn.Conv2d(4, 4, 3, groups=2), 1)
    with pytest.raises(ValueError, match="`conv` must be nn.Conv2d"):
        factorize_conv(nn.Linear(3, 3), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`linear` must be nn.Linear"):
        factorize_linear(conv, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`weight` must have shape \(4, 3, 3, 3\)"):
        factorize_conv(conv, 2, weight=torch.zeros(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"`rank` must be in \[0, 9\]"):
        low_rank_weights(conv.weight, 10)


def test_compressible_layers_skip_grouped_convs() -> None:
    assert list(compressible_layers(TinyNet())) == ["features.0", "features.2", "head"]


def test_record_replay_and_load_state_dict_give_identical_outputs() -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    record = factorize_model(model, {"features.0": 5, "features.2": 4, "head": 3})
    assert isinstance(model.features[0], nn.Sequential)
    assert {"features.0.v.weight", "features.0.u.weight", "features.0.u.bias", "head.v.weight"} <= set(
        model.state_dict()
    )

    data = record.to_dict()
    assert data["kind"] == "lowrank"
    fresh = TinyNet().eval()
    applied = replay(fresh, [data])
    assert applied[0] == record
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))


def test_record_rebuilds_from_dict() -> None:
    record = LowRankRecord.from_layers(TinyNet(), {"head": 2})
    assert CompressionRecord.from_dict(record.to_dict()) == record


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ({"features.9": 2}, "Layer 'features.9' not found"),
        ({"features.4": 2}, "Layer 'features.4' must be nn.Linear or nn.Conv2d with groups=1"),
        ({"features.1": 2}, "Layer 'features.1' must be nn.Linear or nn.Conv2d"),
        ({"head": 6}, r"Rank of layer 'head' must be an int in \[1, 5\]"),
        ({"head": 0}, r"Rank of layer 'head' must be an int in \[1, 5\]"),
    ],
)
def test_record_refuses_bad_layers(ranks: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowRankRecord.from_layers(TinyNet(), ranks)


def test_record_apply_validates_before_editing() -> None:
    record = LowRankRecord.from_layers(TinyNet(), {"features.0": 2, "head": 2})

    class Wider(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6 * 4 * 4, 7)

    model = Wider()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'head' does not match.*'out_features': \(5, 7\)"):
        record.apply(model)
    # features.0 precedes head but must not have been replaced.
    assert isinstance(model.features[0], nn.Conv2d)
    assert model.state_dict().keys() == before.keys()
