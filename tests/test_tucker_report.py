"""`TuckerReport` and the one MAC counter behind the Tucker report's numbers."""

import torch
from torch import nn

from compresslight.compression.tucker import TuckerConv2d, decompose_model
from compresslight.compression.tucker_report import ModelCost, TuckerReport, layer_macs, model_cost


def two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_macs_are_the_conv_formula_for_dense_and_factorized_layers():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    assert layer_macs(conv, (4, 16, 8, 8)) == 8 * 8 * 16 * 16 * 9  # batch 1 whatever the batch given
    factorized = TuckerConv2d.from_conv(conv, (4, 6))
    expected = 8 * 8 * (16 * 6 + 6 * 4 * 9 + 4 * 16)  # in_proj, core, out_proj
    assert layer_macs(factorized, (1, 16, 8, 8)) == expected


def test_report_totals_rows_and_markdown_survive_a_json_round_trip():
    model, inputs = two_convs(), torch.randn(2, 3, 8, 8)
    before = model_cost(model, inputs)
    assert before == ModelCost(params=3 * 16 * 9 + 16 + 16 * 16 * 9 + 16, macs=8 * 8 * 16 * (3 + 16) * 9)
    record = decompose_model(model, rank_method={"2": [4, 4]}, example_inputs=inputs)
    report = TuckerReport(
        rank_method={"2": [4, 4]}, runtime_check=None, seconds=0.25, before=before, after=model_cost(model, inputs),
        decomposed=sorted(record.methods), layers=record.report, whole_model=record.whole_model, epoch=0,
    )  # fmt: skip
    row = {row["name"]: row for row in report.layers}["2"]
    assert report.before.macs - report.after.macs == row["macs_before"] - row["macs_after"] > 0
    assert report.theoretical_speedup == before.macs / report.after.macs
    again = TuckerReport.from_dict(report.to_dict())
    assert again == report and again.to_markdown() == report.to_markdown()
    markdown = report.to_markdown()
    assert f"| before | {before.params:,} | {before.macs:,} |" in markdown
    assert "| 2 | tucker2 | 4x4 |" in markdown and "Decomposed 1 layers in 0.25 s." in markdown
