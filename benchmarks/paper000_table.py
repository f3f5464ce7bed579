"""Paper 000's table from the runs `benchmarks/reproduce_paper000.sh` made: reads each run's
metrics.csv (last validation top-1 and macro F1) and its `cli.py profile --baseline` report
(profile.json: side-by-side speedups with intervals), and its int8 `cli.py test` report
(int8/version_*/quantization.json: int8 ONNX Runtime top-1 and its speedup over ONNX Runtime float,
side by side); prints one Markdown table per thread count.

    python benchmarks/paper000_table.py runs/paper000 prune12 prune25 tucker_vbmf tucker_vbmf_runtime
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

PAPER = {  # paper 000, Table I (ResNet20, CIFAR-10, 100 fine-tuning epochs)
    "baseline": "92.02% / 272K",
    "prune12": "- / -",
    "prune25": "90.59% / 153K",
}
COLUMNS = [  # (backend, mode, batch size)
    ("torch", "inference", 1),
    ("torch", "train", 1),
    ("torch", "inference", 128),
    ("torch", "train", 128),
    ("onnxruntime", "inference", 1),
    ("onnxruntime", "inference", 128),
]


def last_metrics(run: Path, stage: str) -> dict[str, float]:
    """The last logged `<stage>/top1` and `<stage>/f1` of a CSVLogger run."""
    found: dict[str, float] = {}
    with open(run / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for key in ("top1", "f1"):
                if row.get(f"{stage}/{key}"):
                    found[key] = float(row[f"{stage}/{key}"])
    return found


def latest(path: Path) -> Path:
    versions = sorted(path.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no version_* run under {path}")
    return versions[-1]


def format_cell(estimate: float, low: float | None, high: float | None, verdict: str | None) -> str:
    """ "1.23x [1.10, 1.38]", with the verdict unless it is "faster"."""
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
    mark = "" if verdict in (None, "faster") else f" {verdict}"
    return f"{estimate:.2f}x{interval}{mark}"


def int8_cells(run_dir: Path) -> str:
    """The "int8 top-1 | int8 vs ORT float b1 | b128" from the run's int8 `cli.py test`, or dashes."""
    runs = sorted((run_dir / "int8").glob("version_*/quantization.json"), key=lambda p: int(p.parent.name[8:]))
    if not runs:
        return "- | - | -"
    report = json.loads(runs[-1].read_text())
    cells = [f"{100 * report['metrics']['quant/test_top1_int8']:.2f}%"]
    for size in (1, 128):
        int8 = next((s for s in report.get("speedups", {}).get(str(size), []) if s["candidate"] == "ort_int8"), None)
        cells.append("-" if int8 is None else format_cell(int8["estimate"], int8["low"], int8["high"], int8["verdict"]))
    return " | ".join(cells)


def memory_cell(comparison: dict) -> str:
    """Inference memory compression (paper 000's estimate) at batch 1 / 128."""
    by_size = {m["batch_size"]: m["inference"] for m in comparison["memory_compression"]}
    return " / ".join(f"{by_size[size]:.2f}x" if size in by_size else "-" for size in (1, 128))


def speedup_cell(speedups: list[dict], backend: str, mode: str, batch_size: int) -> str:
    for s in speedups:
        if (s["backend"], s["mode"], s["batch_size"]) == (backend, mode, batch_size):
            return format_cell(s["observed"], s.get("low"), s.get("high"), s.get("verdict"))
    return "-"


def main(out: Path, methods: list[str]) -> None:
    baseline_run = latest(out / "resnet20_pretrained")
    baseline_metrics = last_metrics(baseline_run, "test")
    rows: dict[int, list[str]] = {}
    for method in methods:
        run = latest(out / f"resnet20_{method}")
        metrics = last_metrics(run, "val")
        report = json.loads((run / "profile_vs_baseline" / "profile.json").read_text())
        base, current = report["baseline"][0], report["current"][0]
        for comparison in report["comparisons"]:
            threads = int(comparison["setting"].split("(cpu, ")[1].split(" thread")[0])
            if threads not in rows:
                rows[threads] = [
                    f"| baseline (published, fine-tuned) | {base['params']['total']:,} | "
                    f"{base['params']['bytes'] / 1024:.0f} KiB | 1.00x / 1.00x | 1.00x | "
                    f"{100 * baseline_metrics['top1']:.2f}% | {baseline_metrics['f1']:.4f} | "
                    + " | ".join("1.00x" for _ in COLUMNS)
                    + f" | {int8_cells(out / 'resnet20_pretrained')} | {PAPER['baseline']} |"
                ]
            cells = [speedup_cell(comparison["speedups"], *column) for column in COLUMNS]
            rows[threads].append(
                f"| {method} | {current['params']['total']:,} | {current['params']['bytes'] / 1024:.0f} KiB | "
                f"{memory_cell(comparison)} | {comparison['theoretical_speedup']:.2f}x | "
                f"{100 * metrics['top1']:.2f}% | {metrics['f1']:.4f} | "
                + " | ".join(cells)
                + f" | {int8_cells(run)} | {PAPER.get(method, '- / -')} |"
            )
    header = (
        "| model | params | weights | memory b1 / b128 | theoretical | top-1 | macro F1 | "
        + " | ".join(f"{b} {m} b{n}" for b, m, n in COLUMNS)
        + " | int8 top-1 | int8 vs ORT float b1 | b128 | paper 000 top-1 / params |"
    )
    for threads, lines in sorted(rows.items()):
        print(f"\n{threads} thread(s); speedups over the baseline, side by side [95% interval]\n")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
