"""The sweep file: what to search, toward what, how long, where the study lives.

```yaml
base_config: configs/resnet56_distiller_schedule.yaml   # relative to the working directory
base_args: [--trainer.max_epochs=0, --trainer.num_sanity_val_steps=-1]
search_space:                                            # config path -> distribution
  'trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]': {type: float, low: 0.0, high: 0.99}
  model.lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
  trainer.max_epochs: {type: int, low: 1, high: 10}
  model.lr_schedule: {type: categorical, choices: [cosine, multistep]}
objectives:
  - {name: val/top1, direction: maximize}
  - {name: profile/inference_latency_ms/bs1_t1_torch, direction: minimize}
budget: {n_trials: 30, timeout_s: null, trial_timeout_s: null}
engine: {sampler: tpe, pruner: chance, seed: 0}
storage: sqlite:///runs/sweeps/NAME.db                  # default; any SQLAlchemy URL
study_name: NAME                                         # default: the sweep file's stem
output_dir: runs/sweeps/NAME                             # default
```

Paths (`base_config`, `output_dir`, a relative SQLite file) are relative to the working
directory, like every path inside a fit config (`data_dir`, `init_from`): run sweeps from the
repository root, as `cli.py fit`. Search-space keys are config paths (`compresslight.sweep.paths`):
any argument of `cli.py fit`, including one init arg of one callback of the YAML list.

`load_sweep_spec` checks everything before a trial runs: unknown keys, search-space paths that
name nothing in the base config (with close matches), distributions, objectives that nothing
produces, the engine's options and that the storage opens.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml

from compresslight.checks import check_choice, check_int, check_ratio
from compresslight.profiling import keys as profile_keys
from compresslight.sweep.fitconfig import resolve_fit_config, split_path_overrides
from compresslight.sweep.paths import Index, Keys, get_at_path, parse_path, set_at_path
from compresslight.sweep.storage import open_storage

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
PRUNERS = ("chance", "median", "none")
DIRECTIONS = ("maximize", "minimize")

# What a trial's results hold (see `compresslight.sweep.results`): the LightningModule's logged
# metrics (ImageClassifier logs these), the final model's size, and ProfileCallback's keys
# (documented in callbacks/profile.py).
CLASSIFIER_METRICS = {
    "val/": ("top1", "top5", "f1", "loss"),
    "train/": ("top1", "top5", "f1", "loss", "loss_epoch"),
}
COMPRESSION_METRICS = ("compression/params", "compression/macs")
PROFILE_FAMILIES = profile_keys.FAMILIES  # one definition of the ProfileCallback keys
OBJECTIVE_PREFIXES = ("val/", "train/", "compression/", "profile/")

_TOP_LEVEL = (
    "base_config",
    "base_args",
    "search_space",
    "objectives",
    "budget",
    "engine",
    "storage",
    "study_name",
    "output_dir",
)
_DISTRIBUTION_KEYS = ("type", "low", "high", "step", "log", "choices", "label")
_BUDGET_KEYS = ("n_trials", "timeout_s", "trial_timeout_s")
_ENGINE_KEYS = (
    "sampler", "pruner", "seed", "include_base", "n_startup_trials", "population_size",
    "chance_after_epochs", "chance_margin", "heartbeat_s",
)  # fmt: skip


@dataclasses.dataclass
class Parameter:
    """One searched value.

    Attributes:
        path: the config path it is written to (also the Optuna parameter name).
        distribution: the Optuna distribution it is drawn from.
        label: a short name for tables and plots (default: the path's last segment).
        base_value: its value in the base config.
    """

    path: str
    distribution: optuna.distributions.BaseDistribution
    label: str
    base_value: Any


@dataclasses.dataclass
class Objective:
    """One optimized metric: `name` is a results key (or a glob matching exactly one)."""

    name: str
    direction: Literal["maximize", "minimize"]


@dataclasses.dataclass
class Engine:
    """How trials are proposed and stopped.

    Attributes:
        sampler: "tpe" (Bayesian, single- or multi-objective, the default), "nsga2"
            (multi-objective evolutionary) or "random".
        pruner: "chance" (stop a trial whose validation top-1 is at chance level after
            `chance_after_epochs` training epochs: paper 002 saw such nets never recover),
            "median" (Optuna's MedianPruner on the first objective, single-objective only) or "none".
        seed: sampler seed (give each worker of one study its own, or none).
        include_base: run the base config's own values first (trial 0), marked in tables and plots.
        n_startup_trials: random trials before TPE models the results.
        population_size: NSGA-II's generation size.
        chance_after_epochs: training epochs after which the chance test applies (0: judge the
            pruned model before any training; needs `num_sanity_val_steps: -1`).
        chance_margin: top-1 up to `1/num_classes + chance_margin` counts as chance.
        heartbeat_s: how often a running trial tells the storage it is alive; a trial silent for
            twice that (its worker was killed) is marked failed and its parameters are retried.
    """

    sampler: str = "tpe"
    pruner: str = "chance"
    seed: int | None = None
    include_base: bool = True
    n_startup_trials: int = 10
    population_size: int = 20
    chance_after_epochs: int = 1
    chance_margin: float = 0.01
    heartbeat_s: int = 60


@dataclasses.dataclass
class Budget:
    """How many trials the study should hold (across resumes and workers) and time limits.

    Attributes:
        n_trials: trials in the study (finished, failed, pruned or running) after which workers stop.
        timeout_s: wall-clock seconds after which this worker starts no new trial.
        trial_timeout_s: seconds after which a trial's fit is stopped and the trial failed.
    """

    n_trials: int = 30
    timeout_s: float | None = None
    trial_timeout_s: float | None = None


@dataclasses.dataclass
class SweepSpec:
    """A checked sweep file.

    Attributes:
        source: the sweep file (None when built from a dict).
        base_config: the fit config the trials start from.
        base_args: extra fit arguments applied to it.
        fit_config: the parsed base config with `base_args` applied (plain data).
        parameters: the search space.
        objectives: what is optimized, in order.
        budget: trial count and time limits.
        engine: sampler and pruner settings.
        storage: the Optuna storage URL.
        study_name: the study's name in the storage.
        output_dir: where trial folders and reports go.
    """

    source: Path | None
    base_config: Path
    base_args: list[str]
    fit_config: dict[str, Any]
    parameters: list[Parameter]
    objectives: list[Objective]
    budget: Budget
    engine: Engine
    storage: str
    study_name: str
    output_dir: Path

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @property
    def base_params(self) -> dict[str, Any]:
        return {parameter.path: parameter.base_value for parameter in self.parameters}

    def trial_config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base fit config with `params` (path -> value) set."""
        config = self.fit_config
        for path, value in params.items():
            config = set_at_path(config, path, value)
        return config

    def describe(self) -> dict[str, Any]:
        """What defines the study (search space and objectives), to refuse resuming a different one."""
        return {
            "search_space": {
                p.path: optuna.distributions.distribution_to_json(p.distribution) for p in self.parameters
            },
            "objectives": [dataclasses.asdict(o) for o in self.objectives],
        }


def load_sweep_spec(
    path: str | Path,
    extra_args: Sequence[str] = (),
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout_s: float | None = None,
    output_dir: str | Path | None = None,
    seed: int | None = None,
) -> SweepSpec:
    """Reads and checks a sweep file; the keyword arguments override its values (`cli.py sweep` options).

    Args:
        path: the sweep YAML file.
        extra_args: fit arguments appended to the file's `base_args` (e.g. `--model.init_from=...`).
        storage: replaces `storage`.
        study_name: replaces `study_name`.
        n_trials: replaces `budget.n_trials`.
        timeout_s: replaces `budget.timeout_s`.
        output_dir: replaces `output_dir`.
        seed: replaces `engine.seed`.

    Raises:
        FileNotFoundError: if the sweep file or its base config does not exist.
        ValueError: for any invalid entry, naming it (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--config` must be a sweep YAML file, got {str(path)!r} (no such file).")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"The sweep file {str(path)!r} must hold a mapping, got {type(data).__name__}.")
    overrides = {"storage": storage, "study_name": study_name, "output_dir": output_dir}
    data.update({key: value for key, value in overrides.items() if value is not None})
    if n_trials is not None or timeout_s is not None:
        data["budget"] = dict(data.get("budget") or {})
        if n_trials is not None:
            data["budget"]["n_trials"] = n_trials
        if timeout_s is not None:
            data["budget"]["timeout_s"] = timeout_s
    if seed is not None:
        data["engine"] = {**(data.get("engine") or {}), "seed": seed}
    if extra_args:
        data["base_args"] = [*(data.get("base_args") or []), *extra_args]
    return sweep_spec_from_dict(data, default_name=path.stem, source=path)


def sweep_spec_from_dict(data: Mapping[str, Any], default_name: str = "sweep", source: Path | None = None) -> SweepSpec:
    """Checks a sweep given as a mapping (the content of a sweep file).

    Raises:
        FileNotFoundError: if `base_config` does not exist.
        ValueError: for any invalid entry, naming it.
    """
    _check_keys("the sweep file", data, _TOP_LEVEL)
    for required in ("base_config", "search_space", "objectives"):
        if required not in data:
            raise ValueError(f"The sweep file needs `{required}`, found keys {sorted(data)}.")
    base_config = Path(str(data["base_config"]))
    if not base_config.is_file():
        raise FileNotFoundError(
            f"`base_config` must be a fit config file, got {str(base_config)!r}: not found under {Path.cwd()} "
            "(paths in a sweep file are relative to the working directory; run sweeps from the repository root)."
        )
    base_args = data.get("base_args") or []
    if not isinstance(base_args, list) or not all(isinstance(a, str) for a in base_args):
        raise ValueError(
            f"`base_args` must be a list of fit arguments like '--trainer.max_epochs=0', got {base_args!r}."
        )
    plain_args, path_overrides = split_path_overrides(base_args)
    fit_config = resolve_fit_config(["--config", str(base_config), *plain_args])
    for override_path, value in path_overrides.items():
        fit_config = set_at_path(fit_config, override_path, value)
    _check_init_from(fit_config)

    engine = _engine(data.get("engine") or {})
    budget = _budget(data.get("budget") or {})
    parameters = _parameters(data["search_space"], fit_config, engine.include_base)
    objectives = _objectives(data["objectives"], fit_config, engine)
    study_name = str(data.get("study_name") or default_name)
    storage = str(data.get("storage") or f"sqlite:///runs/sweeps/{study_name}.db")
    output_dir = Path(str(data.get("output_dir") or f"runs/sweeps/{study_name}"))
    spec = SweepSpec(
        source=source,
        base_config=base_config,
        base_args=list(base_args),
        fit_config=fit_config,
        parameters=parameters,
        objectives=objectives,
        budget=budget,
        engine=engine,
        storage=storage,
        study_name=study_name,
        output_dir=output_dir,
    )
    open_storage(spec.storage, heartbeat_s=engine.heartbeat_s)
    return spec


def _check_init_from(fit_config: dict[str, Any]) -> None:
    init_from = (fit_config.get("model") or {}).get("init_from")
    if init_from is None:
        log.warning(
            "`model.init_from` is not set: every trial compresses a randomly initialized model, not a trained baseline."
        )
    elif not Path(str(init_from)).is_file():
        raise FileNotFoundError(
            f"`model.init_from` must be the trained baseline checkpoint every trial starts from, got {init_from!r} "
            f"(no such file under {Path.cwd()}); pass it with `cli.py sweep --config ... --model.init_from=PATH`."
        )


def _parameters(search_space: Any, fit_config: dict[str, Any], include_base: bool) -> list[Parameter]:
    if not isinstance(search_space, dict) or not search_space:
        raise ValueError(f"`search_space` must map config paths to distributions, got {search_space!r}.")
    parameters = []
    for path, spec in search_space.items():
        name = f"search_space[{path!r}]"
        parse_path(str(path))
        try:
            base_value = get_at_path(fit_config, str(path))
        except ValueError as error:
            raise ValueError(f"`{name}` is not a key of the base config or the fit CLI: {error}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"`{name}` must be a mapping like {{type: float, low: 0, high: 1}}, got {spec!r}.")
        _check_keys(f"`{name}`", spec, _DISTRIBUTION_KEYS)
        distribution = _distribution(name, spec)
        if include_base and not _contains(distribution, base_value):
            raise ValueError(
                f"`{name}`: the base config's value {base_value!r} is outside the search space "
                f"{_describe(distribution)}; widen it or set `engine.include_base: false`."
            )
        label = str(spec.get("label") or _short_label(str(path)))
        parameters.append(Parameter(path=str(path), distribution=distribution, label=label, base_value=base_value))
    labels = [p.label for p in parameters]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"`search_space` labels must be unique, {duplicates} repeat: give the parameters a `label`.")
    return parameters


def _distribution(name: str, spec: dict[str, Any]) -> optuna.distributions.BaseDistribution:
    kind = spec.get("type")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"`{name}.choices` must be a non-empty list, got {choices!r}.")
        if not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices):
            raise ValueError(f"`{name}.choices` must be numbers, strings, booleans or null, got {choices!r}.")
        return optuna.distributions.CategoricalDistribution(choices)
    if kind not in ("float", "int"):
        raise ValueError(f"`{name}.type` must be one of ['float', 'int', 'categorical'], got {kind!r}.")
    low, high, step, log_scale = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}.{key}` must be a finite number, got {value!r}.")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"`{name}` is an int range: `low` and `high` must be integers, got {low!r} and {high!r}.")
    if low > high:
        raise ValueError(f"`{name}.low` must be <= `high`, got low={low!r}, high={high!r}.")
    if log_scale and low <= 0:
        raise ValueError(f"`{name}.low` must be > 0 with `log: true`, got {low!r}.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ValueError(f"`{name}.step` must be a number > 0, got {step!r}.")
    if step is not None and log_scale:
        raise ValueError(f"`{name}`: `step` and `log: true` cannot be combined (Optuna's rule).")
    if kind == "int":
        return optuna.distributions.IntDistribution(int(low), int(high), log=log_scale, step=int(step or 1))
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log_scale, step=step)


def _contains(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(distribution, optuna.distributions.IntDistribution) and not float(value).is_integer():
        return False
    return distribution.low <= value <= distribution.high


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return f"choices {list(distribution.choices)}"
    return f"[{distribution.low}, {distribution.high}]"


def _short_label(path: str) -> str:
    last = parse_path(path)[-1]
    if isinstance(last, Keys):
        return "+".join(last.names)
    return str(last.index) if isinstance(last, Index) else last.name


def _objectives(objectives: Any, fit_config: dict[str, Any], engine: Engine) -> list[Objective]:
    if isinstance(objectives, dict):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives:
        raise ValueError(f"`objectives` must be a list of {{name, direction}}, got {objectives!r}.")
    checked = []
    trainer = fit_config.get("trainer", {})
    callbacks = trainer.get("callbacks") or []
    trains = (
        trainer.get("max_epochs") != 0 and trainer.get("limit_train_batches") != 0 and trainer.get("max_steps") != 0
    )
    for position, item in enumerate(objectives):
        name_key = f"objectives[{position}]"
        if not isinstance(item, dict):
            raise ValueError(f"`{name_key}` must be a mapping {{name, direction}}, got {item!r}.")
        _check_keys(f"`{name_key}`", item, ("name", "direction"))
        name, direction = item.get("name"), item.get("direction", "maximize")
        if not isinstance(name, str) or not name:
            raise ValueError(f"`{name_key}.name` must be a metric name like 'val/top1', got {name!r}.")
        check_choice(f"{name_key}.direction", direction, DIRECTIONS)
        _check_produced(name_key, name, trainer, callbacks, trains)
        checked.append(Objective(name=name, direction=direction))
    names = [o.name for o in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"`objectives` must be distinct, got {names}.")
    if engine.pruner == "median":
        if len(checked) > 1:
            raise ValueError(
                "`engine.pruner`='median' works with one objective "
                "(Optuna cannot prune multi-objective trials by intermediate values); use 'chance' or 'none'."
            )
        if not checked[0].name.startswith("val/"):
            raise ValueError(
                f"`engine.pruner`='median' needs a per-epoch objective (a val/ metric), got {checked[0].name!r}."
            )
    if engine.pruner == "chance" and engine.chance_after_epochs == 0 and trainer.get("num_sanity_val_steps") != -1:
        raise ValueError(
            "`engine.chance_after_epochs`=0 judges the model before training, which needs a full validation pass "
            "then: add '--trainer.num_sanity_val_steps=-1' to `base_args`."
        )
    return checked


def _check_produced(name_key: str, name: str, trainer: dict[str, Any], callbacks: list[Any], trains: bool) -> None:
    prefix = next((p for p in OBJECTIVE_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        raise ValueError(
            f"`{name_key}.name`={name!r} is not produced by any callback: objectives start with one of "
            f"{list(OBJECTIVE_PREFIXES)} "
            "(e.g. 'val/top1', 'compression/params', 'profile/inference_latency_ms/bs1_t1_torch')."
        )
    rest = name[len(prefix) :]
    if prefix in CLASSIFIER_METRICS:
        known = CLASSIFIER_METRICS[prefix]
        if rest not in known:
            raise ValueError(
                f"`{name_key}.name`={name!r} is not a metric the model logs; "
                f"{prefix} metrics are {[prefix + k for k in known]}."
            )
        if trainer.get("limit_val_batches") == 0 and prefix == "val/":
            raise ValueError(
                f"`{name_key}.name`={name!r} needs validation, but the base config sets `trainer.limit_val_batches: 0`."
            )
        if not trains and prefix == "train/":
            raise ValueError(f"`{name_key}.name`={name!r} needs training, but the base config trains for 0 epochs.")
        if not trains and prefix == "val/" and trainer.get("num_sanity_val_steps") != -1:
            raise ValueError(
                f"`{name_key}.name`={name!r} needs a validation pass, but the base config trains for 0 epochs (no "
                "validation epoch runs): add '--trainer.num_sanity_val_steps=-1' to `base_args` to validate the "
                "compressed model before training."
            )
    elif prefix == "compression/":
        if name not in COMPRESSION_METRICS:
            raise ValueError(
                f"`{name_key}.name`={name!r} is not produced; compression/ objectives are {list(COMPRESSION_METRICS)}."
            )
    else:
        family = rest.split("/", 1)[0]
        if not any(fnmatch.fnmatchcase(f, family) for f in PROFILE_FAMILIES):
            close = difflib.get_close_matches(family, PROFILE_FAMILIES, n=3)
            raise ValueError(
                f"`{name_key}.name`={name!r} is not a ProfileCallback key (profile/<family>/...: families "
                f"{list(PROFILE_FAMILIES)}).{' Close matches: ' + ', '.join(close) + '.' if close else ''}"
            )
        profilers = [
            c for c in callbacks
            if isinstance(c, dict) and str(c.get("class_path", "")).endswith("ProfileCallback")
            and (c.get("init_args") or {}).get("on_fit_end", True)
        ]  # fmt: skip
        if not profilers:
            raise ValueError(
                f"`{name_key}.name`={name!r} needs a ProfileCallback (with on_fit_end: true) in the base config's "
                "`trainer.callbacks`; it has none. Add `- class_path: compresslight.callbacks.profile.ProfileCallback`."
            )
        _check_profile_setting(name_key, name, [c.get("init_args") or {} for c in profilers])


# ProfileCallback's setting suffix: `bs{B}_t{T}_{backend}` (+ `_{device}` with several devices).
_SETTING = profile_keys.SETTING_PATTERN


def _check_profile_setting(name_key: str, name: str, profilers: list[dict[str, Any]]) -> None:
    """Checks that a ProfileCallback measures the batch size, threads and backend an objective names."""
    setting = name.rsplit("/", 1)[-1]
    match = _SETTING.match(setting)
    if match is None or "*" in name:
        return
    batch, threads, backend = int(match["batch"]), int(match["threads"]), match["backend"]
    for init_args in profilers:
        batch_sizes = _as_list(init_args.get("batch_sizes", [1]))
        thread_counts = _as_list(init_args.get("threads"))
        backends = _as_list(init_args.get("backends", ["torch"]))
        if batch in batch_sizes and backend in backends and (thread_counts == [None] or threads in thread_counts):
            return
    measured = [
        {key: init_args.get(key) for key in ("batch_sizes", "threads", "backends")} for init_args in profilers
    ]  # fmt: skip
    raise ValueError(
        f"`{name_key}.name`={name!r} asks for batch size {batch}, {threads} thread(s), backend {backend!r}, but the "
        f"base config's ProfileCallback measures {measured}: change the objective or the callback's init_args."
    )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _engine(data: Any) -> Engine:
    if not isinstance(data, dict):
        raise ValueError(f"`engine` must be a mapping, got {data!r}.")
    _check_keys("`engine`", data, _ENGINE_KEYS)
    engine = Engine(**data)
    check_choice("engine.sampler", engine.sampler, SAMPLERS)
    check_choice("engine.pruner", engine.pruner, PRUNERS)
    if engine.seed is not None and (isinstance(engine.seed, bool) or not isinstance(engine.seed, int)):
        raise ValueError(f"`engine.seed` must be an int or null, got {engine.seed!r}.")
    for key, minimum in (
        ("n_startup_trials", 0),
        ("population_size", 2),
        ("chance_after_epochs", 0),
        ("heartbeat_s", 1),
    ):
        check_int(f"engine.{key}", getattr(engine, key), minimum)
    check_ratio("engine.chance_margin", engine.chance_margin, include_zero=True, include_one=False)
    return engine


def _budget(data: Any) -> Budget:
    if not isinstance(data, dict):
        raise ValueError(f"`budget` must be a mapping, got {data!r}.")
    _check_keys("`budget`", data, _BUDGET_KEYS)
    budget = Budget(**data)
    check_int("budget.n_trials", budget.n_trials, 1)
    for key in ("timeout_s", "trial_timeout_s"):
        value = getattr(budget, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"`budget.{key}` must be a number of seconds > 0 or null, got {value!r}.")
    return budget


def _check_keys(where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{where} has an unknown key {key!r}; allowed keys: {list(allowed)}.{hint}")


__all__ = [
    "Budget",
    "Engine",
    "Objective",
    "Parameter",
    "SweepSpec",
    "load_sweep_spec",
    "sweep_spec_from_dict",
]
