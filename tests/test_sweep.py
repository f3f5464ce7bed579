"""Sweeps (paper 002): config paths, sweep-file checks, trial results, reports, and real tiny sweeps.

The end-to-end tests run real `cli.py fit` subprocesses on synthetic 8x8 images with a ResNet20;
each trial costs a Python + Lightning start-up (seconds), so they are marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import REPO, run_python
from optuna.trial import TrialState

from compresslight.sweep import (
    SweepResultsCallback,
    expand_path_overrides,
    get_at_path,
    leaf_paths,
    load_sweep_spec,
    open_storage,
    parse_path,
    read_progress,
    read_results,
    resolve_fit_config,
    run_sweep,
    set_at_path,
    split_path_overrides,
    sweep_spec_from_dict,
    write_reports,
)
from compresslight.sweep.paths import Index, Key, Keys, Selector

RATIO_PATH = 'trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]'
LATENCY = "profile/inference_latency_ms/bs1_t1_torch"


def tiny_fit_config(tmp_path: Path, **trainer: Any) -> Path:
    """A fit config that trains a ResNet20 on 32 synthetic 8x8 images, prunes and profiles it."""
    config = {
        "seed_everything": 0,
        "model": {"arch": "resnet20", "lr": 0.05},
        "data": {
            "class_path": "compresslight.datamodules.SyntheticDataModule",
            "init_args": {
                "num_classes": 4,
                "input_shape": [3, 8, 8],
                "num_samples": 32,
                "num_val_samples": 16,
                "batch_size": 16,
            },
        },
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "compresslight.callbacks.pruning.PruningCallback",
                    "init_args": {"ratios": {"layer1.*.conv1": 0.5, "layer2.*.conv1": 0.25}, "norm": 1},
                },
                {
                    "class_path": "compresslight.callbacks.profile.ProfileCallback",
                    "init_args": {"warmup": 0, "iters": 2, "threads": 1, "on_fit_start": False},
                },
            ],
            **trainer,
        },
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_sweep(tmp_path: Path, **entries: Any) -> dict[str, Any]:
    """A sweep over the tiny config's layer1 ratio and learning rate, toward top-1 and latency."""
    sweep = {
        "base_config": str(tiny_fit_config(tmp_path)),
        "search_space": {
            RATIO_PATH: {"type": "float", "low": 0.0, "high": 0.9, "label": "layer1"},
            "model.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
        },
        "objectives": [{"name": "val/top1", "direction": "maximize"}, {"name": LATENCY, "direction": "minimize"}],
        "budget": {"n_trials": 1},
        "engine": {"sampler": "tpe", "seed": 0},
        "storage": f"sqlite:///{tmp_path}/study.db",
        "output_dir": str(tmp_path / "out"),
        "study_name": "tiny",
    }
    sweep.update(entries)
    return sweep


def write_sweep(tmp_path: Path, sweep: dict[str, Any]) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# --- config paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, segments",
    [
        ("model.lr", [Key("model"), Key("lr")]),
        (
            "trainer.callbacks[1].init_args.norm",
            [Key("trainer"), Key("callbacks"), Index(1), Key("init_args"), Key("norm")],
        ),
        ("trainer.callbacks[-1]", [Key("trainer"), Key("callbacks"), Index(-1)]),
        (
            RATIO_PATH,
            [
                Key("trainer"),
                Key("callbacks"),
                Selector("PruningCallback"),
                Key("init_args"),
                Key("ratios"),
                Key("layer1.*.conv1"),
            ],
        ),
        ("a['x.y'][compresslight.X].b", [Key("a"), Key("x.y"), Selector("compresslight.X"), Key("b")]),
    ],
)
def test_parse_path(path: str, segments: list) -> None:
    assert parse_path(path) == segments


@pytest.mark.parametrize(
    "path, message",
    [
        ("", "non-empty string"),
        (".model", "must not start with a dot"),
        ("model..lr", "expected a name"),
        ("model.", "expected a name"),
        ('ratios["layer1', "no closing"),
        ("callbacks[0", "not closed"),
        ("callbacks[]", "empty brackets"),
        ("callbacks[0]x", "expected '.' or '\\['"),
    ],
)
def test_parse_path_errors(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_path(path)


CONFIG = {
    "model": {"lr": 0.1, "arch": "resnet20"},
    "trainer": {
        "callbacks": [
            {
                "class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "epoch"},
            },
            {
                "class_path": "compresslight.callbacks.pruning.PruningCallback",
                "init_args": {"ratios": {"layer1.*.conv1": 0.7}, "norm": 1},
            },
        ]
    },
}


@pytest.mark.parametrize(
    "path, expected",
    [
        ("model.lr", 0.1),
        (RATIO_PATH, 0.7),
        ('trainer.callbacks[compresslight.callbacks.pruning.PruningCallback].init_args.ratios["layer1.*.conv1"]', 0.7),
        ("trainer.callbacks[1].init_args.norm", 1),
        ("trainer.callbacks[-1].norm", 1),  # init_args may be skipped, as on jsonargparse's command line
        ("trainer.callbacks[LearningRateMonitor].init_args.logging_interval", "epoch"),
    ],
)
def test_get_and_set_at_path(path: str, expected: Any) -> None:
    assert get_at_path(CONFIG, path) == expected
    edited = set_at_path(CONFIG, path, "new")
    assert get_at_path(edited, path) == "new"
    assert get_at_path(CONFIG, path) == expected  # the original is untouched


def test_leaf_paths_name_callbacks_by_class() -> None:
    assert leaf_paths(CONFIG) == [
        "model.lr",
        "model.arch",
        "trainer.callbacks[LearningRateMonitor].class_path",
        "trainer.callbacks[LearningRateMonitor].init_args.logging_interval",
        "trainer.callbacks[PruningCallback].class_path",
        RATIO_PATH,
        "trainer.callbacks[PruningCallback].init_args.norm",
    ]


@pytest.mark.parametrize(
    "path, message",
    [
        ("model.lrr", r"model has no key 'lrr'.*Close matches: model\.lr"),
        (
            'trainer.callbacks[PruningCallback].init_args.ratios["layer3.*.conv1"]',
            r"no key 'layer3.\*.conv1'.*Close matches: .*ratios\[\"layer1",
        ),
        (
            "trainer.callbacks[EarlyStopping].init_args.patience",
            r"no item of trainer.callbacks has class 'EarlyStopping'",
        ),
        ("trainer.callbacks[5].init_args.norm", "has 2 items, index 5 is out of range"),
        ("trainer.callbacks.norm", r"is a list: select an item with \[index\] or \[ClassName\]"),
        ("model[0]", "is a mapping, not a list"),
        ("model.lr.x", "is a value"),
    ],
)
def test_path_errors_name_the_path_and_close_matches(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_at_path(CONFIG, path)
    with pytest.raises(ValueError, match=message):
        set_at_path(CONFIG, path, 0.5)


def test_keys_in_one_bracket_are_one_value() -> None:
    config = {"ratios": {"layer2.[1-4].conv1": 0.6, "layer2.[67].conv1": 0.6, "layer3.1.conv1": 0.2}}
    tied = 'ratios["layer2.[1-4].conv1","layer2.[67].conv1"]'
    assert parse_path(tied)[-1] == Keys(("layer2.[1-4].conv1", "layer2.[67].conv1"))
    assert get_at_path(config, tied) == 0.6
    assert set_at_path(config, tied, 0.3)["ratios"] == {
        "layer2.[1-4].conv1": 0.3,
        "layer2.[67].conv1": 0.3,
        "layer3.1.conv1": 0.2,
    }
    with pytest.raises(ValueError, match=r"ties keys that hold different values"):
        get_at_path(config, 'ratios["layer2.[67].conv1", "layer3.1.conv1"]')
    with pytest.raises(ValueError, match=r"several keys in one bracket are allowed in the last segment only"):
        parse_path('a["x", "y"].b')


def test_ambiguous_class_selector_asks_for_an_index() -> None:
    config = {"callbacks": [{"class_path": "a.Cb", "init_args": {}}, {"class_path": "b.Cb", "init_args": {}}]}
    with pytest.raises(ValueError, match=r"2 items of callbacks have class 'Cb' \(at \[0, 1\]\): select one by index"):
        get_at_path(config, "callbacks[Cb].init_args")


# --- fit configs and command-line overrides ----------------------------------------------------


def test_resolve_fit_config_fills_defaults_and_applies_args(tmp_path: Path) -> None:
    config = resolve_fit_config(["--config", str(tiny_fit_config(tmp_path)), "--trainer.max_epochs=3"])
    assert config["trainer"]["max_epochs"] == 3
    assert get_at_path(config, RATIO_PATH) == 0.5
    # Defaults of the callback's other arguments are there to be searched.
    assert get_at_path(config, "trainer.callbacks[PruningCallback].init_args.round_to") is None
    assert get_at_path(config, "model.momentum") == 0.9
    assert "num_classes" not in config["model"]  # a link target, set from the datamodule at run time


def test_resolve_fit_config_reports_parser_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"do not parse.*model\.lrr"):
        resolve_fit_config(["--config", str(tiny_fit_config(tmp_path)), "--model.lrr=3"])


def test_split_path_overrides_reads_values_as_yaml() -> None:
    rest, overrides = split_path_overrides(
        [
            "fit",
            "--config",
            "x.yaml",
            f"--{RATIO_PATH}=0.25",
            "--model.lr=0.1",
            "--trainer.callbacks[0].init_args.targets",
            "[0.5, 1.0]",
        ]
    )
    assert rest == ["fit", "--config", "x.yaml", "--model.lr=0.1"]
    assert overrides == {RATIO_PATH: 0.25, "trainer.callbacks[0].init_args.targets": [0.5, 1.0]}
    with pytest.raises(ValueError, match="has no value"):
        split_path_overrides(["--trainer.callbacks[0].init_args.norm"])


def wandb_command(command: list[str], values: dict[str, Any]) -> list[str]:
    """The argument list `wandb agent` runs for one set of values (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=["python"], program=["cli.py"])
    expanded: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        expanded += sweep_vars.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return expanded


def test_wandb_style_arguments_set_a_group_sparsity_inside_a_callback(tmp_path: Path) -> None:
    base = tiny_fit_config(tmp_path)
    command = ["${env}", "${interpreter}", "${program}", "fit", "--config", str(base), "${args}"]
    values = {
        RATIO_PATH: 0.3,
        'trainer.callbacks[PruningCallback].init_args.ratios["layer2.*.conv1"]': 0.1,
        "model.lr": 0.02,
    }
    argv = wandb_command(command, values)
    assert argv[:3] == ["/usr/bin/env", "python", "cli.py"]
    assert f"--{RATIO_PATH}=0.3" in argv
    expanded = expand_path_overrides(argv[3:])
    assert expanded[:2] == ["fit", "--config"] and len(expanded) == 3
    config = resolve_fit_config(expanded[1:])
    assert get_at_path(config, RATIO_PATH) == 0.3
    assert get_at_path(config, 'trainer.callbacks[PruningCallback].init_args.ratios["layer2.*.conv1"]') == 0.1
    assert config["model"]["lr"] == 0.02
    assert get_at_path(config, "trainer.callbacks[ProfileCallback].init_args.iters") == 2  # the rest is kept


def test_expand_path_overrides_leaves_plain_arguments_alone_and_rejects_typos(tmp_path: Path) -> None:
    plain = ["fit", "--config", "x.yaml", "--trainer.callbacks.norm=1"]
    assert expand_path_overrides(plain) == plain
    base = str(tiny_fit_config(tmp_path))
    with pytest.raises(ValueError, match=r"no key 'layer9.\*.conv1'.*Close matches"):
        expand_path_overrides(
            ["fit", "--config", base, '--trainer.callbacks[PruningCallback].init_args.ratios["layer9.*.conv1"]=0.5']
        )


def test_cli_fit_accepts_config_path_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cli.py fit ... --<path>=<value>` (what `wandb agent` runs) parses nested callback keys."""
    from compresslight.cli import main

    base = str(tiny_fit_config(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", base, f"--{RATIO_PATH}=0.3", "--print_config"])
    output = capsys.readouterr()
    assert exit_info.value.code == 0, output.err
    printed = yaml.safe_load(output.out)
    assert get_at_path(printed, RATIO_PATH) == 0.3


# --- sweep files: checked before any trial runs -------------------------------------------------


def test_sweep_spec_reads_a_valid_file(tmp_path: Path) -> None:
    spec = load_sweep_spec(write_sweep(tmp_path, tiny_sweep(tmp_path)), n_trials=7, seed=3)
    assert spec.budget.n_trials == 7 and spec.engine.seed == 3
    assert [p.label for p in spec.parameters] == ["layer1", "lr"]
    assert spec.base_params == {RATIO_PATH: 0.5, "model.lr": 0.05}
    assert spec.directions == ["maximize", "minimize"]
    trial_config = spec.trial_config({RATIO_PATH: 0.2, "model.lr": 0.03})
    assert get_at_path(trial_config, RATIO_PATH) == 0.2 and trial_config["model"]["lr"] == 0.03


@pytest.mark.parametrize(
    "search_space, message",
    [
        (
            {"model.lrr": {"type": "float", "low": 0.01, "high": 0.1}},
            r"search_space\['model.lrr'\].*not a key of the base config.*Close matches: model\.lr",
        ),
        (
            {
                'trainer.callbacks[PruningCallback].init_args.ratios["layer3.*.conv1"]': {
                    "type": "float",
                    "low": 0,
                    "high": 0.9,
                }
            },
            r"not a key of the base config.*Close matches: .*ratios\[\"layer[12]",
        ),
        (
            {"model.lr": {"type": "uniform", "low": 0.01, "high": 0.1}},
            r"search_space\['model.lr'\].type` must be one of",
        ),
        ({"model.lr": {"type": "float", "low": 0.1, "high": 0.01}}, r"low` must be <= `high`"),
        ({"model.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"low` must be > 0 with `log: true`"),
        (
            {"model.lr": {"type": "float", "low": 0.01, "high": 0.1, "lower": 0}},
            r"unknown key 'lower'.*Did you mean low",
        ),
        (
            {"model.lr": {"type": "float", "low": 0.2, "high": 0.3}},
            r"base config's value 0.05 is outside the search space \[0.2, 0.3\]",
        ),
        ({"model.lr_schedule": {"type": "categorical", "choices": []}}, r"choices` must be a non-empty list"),
        ({}, "`search_space` must map config paths"),
    ],
)
def test_bad_search_space_is_refused(tmp_path: Path, search_space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_spec_from_dict(tiny_sweep(tmp_path, search_space=search_space))


@pytest.mark.parametrize(
    "name, message",
    [
        ("top1", r"objectives\[0\].name`='top1' is not produced by any callback: objectives start with one of"),
        ("val/accuracy", r"not a metric the model logs; val/ metrics are \['val/top1'"),
        ("compression/sparsity", r"compression/ objectives are \['compression/params', 'compression/macs'\]"),
        ("profile/latency_ms/bs1", r"not a ProfileCallback key .*Close matches: .*latency_ms"),
    ],
)
def test_objective_nothing_produces_is_refused(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_spec_from_dict(tiny_sweep(tmp_path, objectives=[{"name": name, "direction": "minimize"}]))


def test_profile_objective_must_be_a_setting_the_callback_measures(tmp_path: Path) -> None:
    objectives = [{"name": "profile/inference_latency_ms/bs8_t1_torch", "direction": "minimize"}]
    with pytest.raises(ValueError, match=r"asks for batch size 8, 1 thread\(s\), backend 'torch', but .* measures"):
        sweep_spec_from_dict(tiny_sweep(tmp_path, objectives=objectives))


def test_base_args_and_extra_args_edit_the_base_config(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, base_args=[f"--{RATIO_PATH}=0.25", "--trainer.max_epochs=2"])
    spec = load_sweep_spec(write_sweep(tmp_path, sweep), ["--model.lr=0.02"])
    assert spec.base_params == {RATIO_PATH: 0.25, "model.lr": 0.02}
    assert spec.fit_config["trainer"]["max_epochs"] == 2


def test_missing_baseline_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"`model.init_from` must be the trained baseline checkpoint .*'nope.ckpt'"
    ):
        sweep_spec_from_dict(tiny_sweep(tmp_path, base_args=["--model.init_from=nope.ckpt"]))


def test_profile_objective_needs_a_profile_callback(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    config = yaml.safe_load(Path(sweep["base_config"]).read_text())
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    Path(sweep["base_config"]).write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"objectives\[1\].name`='profile/.*needs a ProfileCallback"):
        sweep_spec_from_dict(sweep)


def test_validation_objective_without_training_needs_a_full_validation_pass(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, base_args=["--trainer.max_epochs=0"])
    with pytest.raises(ValueError, match=r"trains for 0 epochs.*--trainer.num_sanity_val_steps=-1"):
        sweep_spec_from_dict(sweep)
    sweep["base_args"].append("--trainer.num_sanity_val_steps=-1")
    assert sweep_spec_from_dict(sweep).fit_config["trainer"]["max_epochs"] == 0


@pytest.mark.parametrize(
    "entries, error, message",
    [
        ({"engine": {"sampler": "cmaes"}}, ValueError, r"engine.sampler` must be one of \['tpe', 'nsga2', 'random'\]"),
        ({"engine": {"pruner": "median"}}, ValueError, r"'median' works with one objective"),
        ({"engine": {"seeds": 1}}, ValueError, r"`engine` has an unknown key 'seeds'.*Did you mean seed"),
        ({"budget": {"n_trials": 0}}, ValueError, r"budget.n_trials` must be an int >= 1, got 0"),
        ({"budgets": {}}, ValueError, r"the sweep file has an unknown key 'budgets'.*Did you mean budget"),
        ({"base_args": "--trainer.max_epochs=0"}, ValueError, r"`base_args` must be a list"),
        (
            {"base_config": "no/such/base.yaml"},
            FileNotFoundError,
            r"`base_config` must be a fit config file, got 'no/such/base.yaml'",
        ),
    ],
)
def test_bad_engine_budget_and_files_are_refused(tmp_path: Path, entries: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        sweep_spec_from_dict(tiny_sweep(tmp_path, **entries))


@pytest.mark.parametrize("url", ["nosuchdialect://user@host/db", "sqlite:///{tmp}/a_file/study.db"])
def test_storage_that_cannot_be_opened_is_refused(tmp_path: Path, url: str) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"`storage` .*cannot be opened|`storage` must be a database URL"):
        sweep_spec_from_dict(tiny_sweep(tmp_path, storage=url.format(tmp=tmp_path)))


def test_missing_sweep_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"`--config` must be a sweep YAML file, got '.*nope.yaml' \(no such file\)"
    ):
        load_sweep_spec(tmp_path / "nope.yaml")


# --- the shipped sweep files ---------------------------------------------------------------------

# What configs/resnet56_distiller_schedule.yaml holds and the shipped sweeps rely on: the `ratios`
# keys of paper 002's groups, and a ProfileCallback measuring batch size 1.
DISTILLER_SCHEDULE = {
    "model": {"arch": "resnet56"},
    "data": {"class_path": "compresslight.datamodules.SyntheticDataModule", "init_args": {"num_classes": 10}},
    "trainer": {
        "max_epochs": 70,
        "callbacks": [
            {
                "class_path": "compresslight.callbacks.pruning.PruningCallback",
                "init_args": {
                    "ratios": {
                        "layer1.*.conv1": 0.7,
                        "layer2.[1-4].conv1": 0.6,
                        "layer2.[67].conv1": 0.6,
                        "layer3.1.conv1": 0.2,
                        "layer3.[2-3].conv1": 0.4,
                        "layer3.[5-8].conv1": 0.4,
                    },  # fmt: skip
                    "norm": 1,
                },
            },
            {
                "class_path": "compresslight.callbacks.profile.ProfileCallback",
                "init_args": {"batch_sizes": [1], "threads": [1, 2]},
            },
        ],
    },
}
SWEEP_FILES = sorted(p for p in (REPO / "configs" / "sweeps").glob("*.yaml") if not p.name.endswith(".wandb.yaml"))
WANDB_FILES = sorted((REPO / "configs" / "sweeps").glob("*.wandb.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    base = yaml.safe_load(path.read_text())["base_config"]
    if not (REPO / base).is_file():
        pytest.skip(f"{base} is not written yet")
    spec = load_sweep_spec(path, storage=f"sqlite:///{tmp_path}/study.db", output_dir=tmp_path)
    assert len(spec.parameters) == 4  # paper 002's four groups


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_files_fit_the_distiller_schedule(path: Path, tmp_path: Path) -> None:
    stand_in = tmp_path / "resnet56_distiller_schedule.yaml"
    stand_in.write_text(yaml.safe_dump(DISTILLER_SCHEDULE))
    sweep = {**yaml.safe_load(path.read_text()), "base_config": str(stand_in), "storage": f"sqlite:///{tmp_path}/s.db"}
    spec = sweep_spec_from_dict(sweep)
    assert [p.base_value for p in spec.parameters] == [0.7, 0.6, 0.2, 0.4]  # trial 0: the off-the-shelf schedule
    assert {p.label for p in spec.parameters} == {
        "filter_pruner_70",
        "filter_pruner_60",
        "filter_pruner_20",
        "filter_pruner_40",
    }


@pytest.mark.parametrize("path", WANDB_FILES, ids=lambda p: p.name)
def test_shipped_wandb_sweeps_run_cli_fit_with_parsable_arguments(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    sweep = yaml.safe_load(path.read_text())
    config_file = sweep["command"][sweep["command"].index("--config") + 1]
    if not Path(config_file).is_file():  # not written yet: check the arguments against a stand-in
        stand_in = tmp_path / "resnet56_distiller_schedule.yaml"
        stand_in.write_text(yaml.safe_dump(DISTILLER_SCHEDULE))
        sweep["command"] = [str(stand_in) if chunk == config_file else chunk for chunk in sweep["command"]]
    assert sweep["program"] == "cli.py" and sweep["method"] in ("bayes", "random", "grid")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["command"][2:4] == ["${program}", "fit"] and sweep["command"][-1] == "${args}"
    values = {name: spec.get("min", (spec.get("values") or [None])[0]) for name, spec in sweep["parameters"].items()}
    argv = wandb_command(sweep["command"], values)
    config = resolve_fit_config(expand_path_overrides(argv[3:])[1:])
    for name, value in values.items():
        assert get_at_path(config, name) == value


# --- what a trial writes -------------------------------------------------------------------------


def test_results_callback_writes_progress_and_results(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from compresslight.callbacks.profile import ProfileCallback
    from compresslight.datamodules import SyntheticDataModule

    from compresslight.classifier import ImageClassifier

    data = SyntheticDataModule(num_classes=4, input_shape=(3, 8, 8), num_samples=32, num_val_samples=16, batch_size=16)
    model = ImageClassifier(arch="resnet20", num_classes=4, input_shape=(3, 8, 8))
    trainer = pl.Trainer(
        max_epochs=2, num_sanity_val_steps=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
        callbacks=[
            SweepResultsCallback(str(tmp_path / "trial")),
            ProfileCallback(warmup=0, iters=2, threads=1, on_fit_start=False),
        ],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    progress = read_progress(tmp_path / "trial")
    assert [record["step"] for record in progress] == [0, 1, 2]  # before training, after epochs 1 and 2
    assert all(record["num_classes"] == 4 and record["max_epochs"] == 2 for record in progress)
    assert set(progress[0]["metrics"]) >= {"val/top1", "val/loss"}
    results = read_results(tmp_path / "trial")
    metrics = results["metrics"]
    assert metrics["val/top1"] == progress[-1]["metrics"]["val/top1"]
    assert metrics["compression/params"] == sum(p.numel() for p in model.model.parameters())
    assert metrics["compression/macs"] > 0
    assert metrics[LATENCY] > 0 and metrics["profile/macs"] == metrics["compression/macs"]


def test_reports_mark_the_base_schedule_and_the_pareto_front(tmp_path: Path) -> None:
    spec = sweep_spec_from_dict(tiny_sweep(tmp_path))
    study = optuna.create_study(directions=spec.directions)
    distributions = {p.path: p.distribution for p in spec.parameters}
    points = [(0.5, 0.40, 5.0, True), (0.8, 0.30, 3.0, False), (0.2, 0.45, 6.0, False), (0.6, 0.35, 5.5, False)]
    for ratio, top1, latency, base in points:
        study.add_trial(
            optuna.trial.create_trial(
                params={RATIO_PATH: ratio, "model.lr": 0.05}, distributions=distributions, values=[top1, latency],
                user_attrs={"metrics": {"val/top1": top1, LATENCY: latency, "compression/params": 1000.0},
                            "duration_s": 1.0, **({"base_schedule": True} if base else {})},
            )
        )  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(
            params={RATIO_PATH: 0.9, "model.lr": 0.05}, distributions=distributions, state=TrialState.FAIL,
            user_attrs={"error": "fit exited with code 1:\nValueError: boom"},
        )
    )  # fmt: skip
    written = write_reports(study, spec)
    out = tmp_path / "out"
    assert {p.name for p in written} == {"results.csv", "results.md", "pareto.csv", "pareto.md", "top1_vs_latency.png"}
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["state"] for row in rows] == ["COMPLETE"] * 4 + ["FAIL"]
    assert rows[0]["base"] == "yes" and rows[0]["layer1"] == "0.5" and rows[4]["error"] == "fit exited with code 1:"
    with (out / "pareto.csv").open() as file:
        assert [int(row["trial"]) for row in csv.DictReader(file)] == [0, 1, 2]  # trial 3 is dominated by trial 0
    summary = (out / "results.md").read_text()
    assert f"| {LATENCY} | minimize | 5 | 3 | 1 | -40.0% |" in summary
    assert (out / "top1_vs_latency.png").stat().st_size > 10_000


# --- real sweeps (subprocess fits) ---------------------------------------------------------------


def run_cli_sweep(sweep_file: Path, *args: str) -> subprocess.CompletedProcess:
    return run_python(REPO / "cli.py", "sweep", "--config", sweep_file, *args, cwd=REPO, timeout=600, check=False)


@pytest.mark.slow
def test_one_trial_sweep_from_the_command_line(tmp_path: Path) -> None:
    sweep_file = write_sweep(tmp_path, tiny_sweep(tmp_path))
    result = run_cli_sweep(sweep_file)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["base_schedule"]
    assert trial.params == {RATIO_PATH: 0.5, "model.lr": 0.05}
    trial_dir = Path(trial.user_attrs["trial_dir"])
    assert trial.values == [read_results(trial_dir)["metrics"]["val/top1"], read_results(trial_dir)["metrics"][LATENCY]]
    # The trial's config is a complete fit config with the trial's values.
    assert get_at_path(yaml.safe_load((trial_dir / "trial.yaml").read_text()), RATIO_PATH) == 0.5
    assert (tmp_path / "out" / "top1_vs_latency.png").is_file()


@pytest.mark.slow
def test_sweep_resumes_from_its_storage(tmp_path: Path) -> None:
    spec = sweep_spec_from_dict(tiny_sweep(tmp_path, budget={"n_trials": 2}))
    first = run_sweep(spec)
    assert [t.state for t in first.trials] == [TrialState.COMPLETE] * 2
    # Run again with a larger budget: the study continues from the two trials it holds.
    spec = sweep_spec_from_dict(tiny_sweep(tmp_path, budget={"n_trials": 3}))
    study = run_sweep(spec)
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].user_attrs["base_schedule"] and study.trials[0].params[RATIO_PATH] == 0.5
    assert not study.trials[1].user_attrs.get("base_schedule")
    ratios = [t.params[RATIO_PATH] for t in study.trials]
    assert len(set(ratios)) == 3
    with (tmp_path / "out" / "results.csv").open() as file:
        assert [row["trial"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    # A finished study is not run again.
    assert len(run_sweep(spec).trials) == 3
    # Another search space under the same name is refused rather than mixed in.
    other = sweep_spec_from_dict(
        tiny_sweep(tmp_path, search_space={"model.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    )
    with pytest.raises(ValueError, match=r"`study_name`='tiny' .* holds a sweep with another search space"):
        run_sweep(other)


@pytest.mark.slow
def test_sweep_killed_midway_resumes_and_reruns_the_interrupted_trial(tmp_path: Path) -> None:
    sweep_file = write_sweep(tmp_path, tiny_sweep(tmp_path, budget={"n_trials": 2}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(sweep_file)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    fit_log = tmp_path / "out" / "trial_0000" / "fit.log"
    deadline = time.monotonic() + 300
    while not fit_log.is_file() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)  # kill the sweep while its first fit runs
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, output[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs["error"].startswith("interrupted")

    result = run_cli_sweep(sweep_file)  # resume
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = study.trials[1]
    assert (
        retry.params == study.trials[0].params
        and retry.user_attrs["base_schedule"]
        and retry.user_attrs["error"] is None
    )


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    sweep = tiny_sweep(
        tmp_path,
        search_space={"model.lr": {"type": "float", "low": -1.0, "high": -0.5}},  # ImageClassifier refuses lr <= 0
        engine={"sampler": "random", "seed": 0, "include_base": False},
        budget={"n_trials": 2},
    )
    study = run_sweep(sweep_spec_from_dict(sweep))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    for trial in study.trials:
        assert "fit exited with code 1" in trial.user_attrs["error"]
        assert "`lr` must be > 0" in trial.user_attrs["error"]
    assert "FAIL" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_trial_at_chance_level_after_the_first_epoch_is_pruned(tmp_path: Path) -> None:
    sweep = tiny_sweep(
        tmp_path,
        base_args=["--trainer.max_epochs=50"],
        objectives=[{"name": "val/top1", "direction": "maximize"}],
        # A margin this wide calls every accuracy "chance": the trial must stop after epoch 1 of 50.
        engine={"sampler": "tpe", "seed": 0, "pruner": "chance", "chance_after_epochs": 1, "chance_margin": 0.9},
    )
    study = run_sweep(sweep_spec_from_dict(sweep))
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert "at chance level (1/4=0.2500 + margin 0.9) after 1 epoch(s)" in trial.user_attrs["error"]
    progress = read_progress(trial.user_attrs["trial_dir"])
    assert max(record["step"] for record in progress) < 50
    assert read_results(trial.user_attrs["trial_dir"]) is None  # stopped before fit end


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, budget={"n_trials": 2}, objectives=[{"name": "val/top1", "direction": "maximize"}])
    del sweep["engine"]["seed"]  # workers of one study must not draw the same points
    sweep_file = write_sweep(tmp_path, sweep)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(sweep_file)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/study.db")
    # Each worker checks the budget before asking, so two workers may both start a last trial.
    assert 2 <= len(study.trials) <= 3
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sum(bool(t.user_attrs.get("base_schedule")) for t in study.trials) == 1  # queued by one worker only
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert json.loads(json.dumps(study.user_attrs["sweep"]))["objectives"] == [
        {"name": "val/top1", "direction": "maximize"}
    ]
    assert open_storage(f"sqlite:///{tmp_path}/study.db") is not None
