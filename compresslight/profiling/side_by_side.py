"""Side-by-side speedups: the one way compresslight measures whether a model is faster than another.

Two latencies measured at different times are not comparable on a shared machine: whatever
else ran in between lands in their ratio (on this project's VM two consecutive measurements of
one model differ by 20-50%). So a speedup is measured as a comparison:

1. The contenders (models, or one model on several backends) alternate in *rounds* in one
   process; in each round every contender is timed once (`measure_latency`: warm-up, then the
   median of timed calls), in an order that rotates from round to round.
2. The speedup is taken *per round* (baseline / candidate, paired): load that lasts a round
   slows both sides and cancels in the ratio.
3. The point estimate is the geometric mean of the per-round speedups, and its confidence
   interval a bootstrap over rounds (numpy; `resamples` resamples, fixed seed, so a report is
   reproducible). The geometric mean because speedups are ratios: 2x and 0.5x average to 1x.
   The bootstrap because per-round ratios on a shared machine are skewed (a round hit by a
   burst of load is an outlier), which a normal-theory interval would assume away. With few
   rounds the plain percentile bootstrap is too narrow, so the percentiles are expanded for the
   sample size (Hesterberg's expanded percentile interval: levels from Student's t with n - 1
   degrees of freedom, spread scaled by sqrt(n / (n - 1))). Simulated on lognormal per-round
   noise, the 95% interval then covers the true speedup 95% of the time at 10 rounds, 92% at 5,
   and only 74% at 3 (three rounds have ten distinct resamples): use 5 or more where it matters.
4. A verdict at the chosen confidence: "faster" when the whole interval is above 1, "slower"
   when it is below 1, "not distinguishable" otherwise.
5. Rounds continue until every interval is narrower than `target_width` (relative to its
   estimate) or `time_budget_s` is spent (or `max_rounds` were run), after `min_rounds`.
6. The machine's load during the rounds is recorded (`load.MachineLoad`) and a busy machine is
   flagged in every rendering.

`SideBySide.run` compares any zero-argument callables; `compare_models` builds them for models
(inference and train step, torch and ONNX Runtime, batch sizes, threads) and returns a
`SideBySideReport` with `to_dict()` / `to_markdown()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

import compresslight.profiling.profiler as profiler
from compresslight.checks import check_choice, check_int, check_ratio
from compresslight.profiling.backends import onnxruntime_runner, validate_backends
from compresslight.profiling.environment import resolve_device
from compresslight.profiling.load import BUSY_THRESHOLD, LoadMonitor, MachineLoad
from compresslight.profiling.progress import progress_bar
from compresslight.profiling.results import INFERENCE, MODES, TRAIN
from compresslight.profiling.timing import measure_latency, num_threads

log = logging.getLogger(__name__)

FASTER = "faster"
NOT_DISTINGUISHABLE = "not distinguishable"
SLOWER = "slower"
VERDICTS = (FASTER, NOT_DISTINGUISHABLE, SLOWER)

NARROW_ENOUGH = "interval narrow enough"
BUDGET_SPENT = "time budget spent"
MAX_ROUNDS = "max rounds reached"


@dataclasses.dataclass
class PairedSpeedup:
    """The speedup of one candidate over the baseline, from paired rounds.

    Attributes:
        baseline: the baseline contender's name.
        candidate: this contender's name.
        estimate: geometric mean of the per-round speedups (baseline / candidate latency).
        low: lower bound of the bootstrap confidence interval.
        high: upper bound.
        confidence: the interval's confidence level, e.g. 0.95.
        verdict: "faster", "not distinguishable" or "slower" at that confidence.
        round_speedups: the speedup of every round.
        baseline_median_s: median over rounds of the baseline's per-round median latency.
        candidate_median_s: the same for the candidate.
    """

    baseline: str
    candidate: str
    estimate: float
    low: float
    high: float
    confidence: float
    verdict: str
    round_speedups: list[float]
    baseline_median_s: float
    candidate_median_s: float

    @property
    def rounds(self) -> int:
        return len(self.round_speedups)

    @property
    def relative_width(self) -> float:
        """(high - low) / estimate: how precise the estimate is."""
        return (self.high - self.low) / self.estimate if self.estimate > 0 else math.inf

    def label(self) -> str:
        """The speedup as reports print it: `1.23x [1.15, 1.31]`."""
        return format_speedup(self.estimate, self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rounds": self.rounds, "label": self.label()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedSpeedup:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})


@dataclasses.dataclass
class SideBySideResult:
    """One side-by-side measurement: all contenders in one setting, alternating in rounds.

    Attributes:
        setting: what was measured, e.g. {"batch_size": 1, "threads": 2, "mode": "inference",
            "backend": "torch", "device": "cpu"}.
        baseline: the contender the others are compared with.
        round_latencies_s: contender -> its median latency in each round.
        speedups: one paired speedup per candidate.
        stopped_because: "interval narrow enough", "time budget spent" or "max rounds reached".
        elapsed_s: wall time of the rounds.
        load: what else loaded the machine meanwhile.
    """

    setting: dict[str, Any]
    baseline: str
    round_latencies_s: dict[str, list[float]]
    speedups: list[PairedSpeedup]
    stopped_because: str
    elapsed_s: float
    load: MachineLoad

    @property
    def rounds(self) -> int:
        return len(next(iter(self.round_latencies_s.values()), []))

    def speedup_of(self, candidate: str) -> PairedSpeedup:
        """The paired speedup of `candidate`.

        Raises:
            KeyError: if `candidate` was not measured.
        """
        for speedup in self.speedups:
            if speedup.candidate == candidate:
                return speedup
        raise KeyError(f"No contender {candidate!r}; measured: {[s.candidate for s in self.speedups]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": dict(self.setting),
            "baseline": self.baseline,
            "round_latencies_s": {name: list(v) for name, v in self.round_latencies_s.items()},
            "speedups": [s.to_dict() for s in self.speedups],
            "stopped_because": self.stopped_because,
            "elapsed_s": self.elapsed_s,
            "rounds": self.rounds,
            "load": self.load.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideBySideResult:
        return cls(
            setting=dict(data["setting"]),
            baseline=data["baseline"],
            round_latencies_s={name: list(v) for name, v in data["round_latencies_s"].items()},
            speedups=[PairedSpeedup.from_dict(s) for s in data["speedups"]],
            stopped_because=data["stopped_because"],
            elapsed_s=data["elapsed_s"],
            load=MachineLoad.from_dict(data["load"]),
        )


@dataclasses.dataclass
class SideBySideReport:
    """Side-by-side results of several settings (batch sizes, threads, modes, backends)."""

    results: list[SideBySideResult]

    @property
    def busy(self) -> bool:
        """Whether any of the measurements ran on a busy machine."""
        return any(r.load.busy for r in self.results)

    def find(self, candidate: str, **setting: Any) -> PairedSpeedup | None:
        """The speedup of `candidate` in the result whose setting has all of `setting`'s items."""
        for result in self.results:
            if all(result.setting.get(key) == value for key, value in setting.items()):
                for speedup in result.speedups:
                    if speedup.candidate == candidate:
                        return speedup
        return None

    def result_for(self, **setting: Any) -> SideBySideResult | None:
        return next((r for r in self.results if all(r.setting.get(k) == v for k, v in setting.items())), None)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "busy": self.busy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideBySideReport:
        return cls([SideBySideResult.from_dict(r) for r in data["results"]])

    def to_markdown(self) -> str:
        """One row per (setting, candidate): speedup with its interval, verdict, rounds, load."""
        if not self.results:
            return "_No side-by-side measurement._\n"
        confidence = self.results[0].speedups[0].confidence if self.results[0].speedups else 0.95
        keys = list(dict.fromkeys(key for r in self.results for key in r.setting))
        header = [
            *keys, "baseline", "candidate", f"speedup [{confidence:.0%} CI]", "verdict", "rounds",
            "baseline ms", "candidate ms", "machine",
        ]  # fmt: skip
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for result in self.results:
            for s in result.speedups:
                row = [str(result.setting.get(key, "")) for key in keys]
                row += [
                    s.baseline, s.candidate, s.label(), s.verdict, str(s.rounds),
                    f"{s.baseline_median_s * 1e3:.3f}", f"{s.candidate_median_s * 1e3:.3f}",
                    "**busy**" if result.load.busy else "idle",
                ]  # fmt: skip
                lines.append("| " + " | ".join(row) + " |")
        lines += ["", side_by_side_note(self.results)]
        return "\n".join(lines) + "\n"


def side_by_side_note(results: Sequence[SideBySideResult]) -> str:
    """The Markdown note under a side-by-side table: the method, and any busy measurement."""
    note = (
        "Speedup: baseline / candidate latency, paired per round (the contenders alternate in rounds in one "
        "process); geometric mean over rounds with a bootstrap confidence interval; verdict: faster / slower "
        "when the whole interval is above / below 1."
    )
    busy = [r for r in results if r.load.busy]
    if busy:
        note += (
            f"\n\n**Measured on a busy machine** ({len(busy)} of {len(results)} settings): "
            + "; ".join(f"{_setting_label(r.setting)}: {r.load.summary()}" for r in busy)
            + ". Paired rounds cancel load that slows both sides alike, not load that comes and goes within a round."
        )
    return note


def format_speedup(estimate: float, low: float | None = None, high: float | None = None) -> str:
    """`1.23x [1.15, 1.31]`, or `1.23x` without an interval."""
    if low is None or high is None:
        return f"{estimate:.2f}x"
    return f"{estimate:.2f}x [{low:.2f}, {high:.2f}]"


def paired_speedup(
    baseline_s: Sequence[float],
    candidate_s: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    baseline: str = "baseline",
    candidate: str = "candidate",
) -> PairedSpeedup:
    """The speedup `baseline_s / candidate_s` from paired rounds, with a bootstrap interval and verdict.

    Args:
        baseline_s: the baseline's latency in each round (seconds, > 0).
        candidate_s: the candidate's latency in the same rounds.
        confidence: the interval's level, in (0, 1).
        resamples: bootstrap resamples of the rounds.
        seed: of the bootstrap's generator (a report is reproducible).
        baseline: the baseline's name, for the result.
        candidate: the candidate's name.

    Raises:
        ValueError: for fewer than 2 rounds, lists of different lengths, a latency <= 0,
            `confidence` outside (0, 1) or `resamples` < 100.
    """
    base, cand = np.asarray(baseline_s, dtype=float), np.asarray(candidate_s, dtype=float)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError(
            f"`baseline_s` and `candidate_s` must be paired lists of equal length, got {base.shape} and {cand.shape}."
        )
    if len(base) < 2:
        raise ValueError(f"A confidence interval needs at least 2 paired rounds, got {len(base)}.")
    if not (np.all(base > 0) and np.all(cand > 0)):
        raise ValueError("Latencies must be > 0 seconds; got a zero or negative one.")
    _check_confidence(confidence)
    check_int("resamples", resamples, 100)
    log_ratios = np.log(base / cand)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(log_ratios), size=(resamples, len(log_ratios)))
    means = log_ratios[indices].mean(axis=1)
    # Hesterberg's "expanded percentile" interval: the plain percentile bootstrap is too narrow
    # for a handful of rounds (it uses the divide-by-n spread and normal tails); widening the
    # percentile levels by sqrt(n / (n - 1)) and Student-t tails restores the coverage.
    rounds = len(log_ratios)
    tail = stats.t.ppf((1.0 + confidence) / 2.0, df=rounds - 1) * math.sqrt(rounds / (rounds - 1))
    alpha = float(stats.norm.cdf(-tail))
    low, high = np.exp(np.quantile(means, [alpha, 1.0 - alpha]))
    estimate = float(np.exp(log_ratios.mean()))
    # The point estimate is inside its interval by construction of the percentiles up to
    # floating point; clamp so a printed "[low, high]" never excludes it.
    low, high = min(float(low), estimate), max(float(high), estimate)
    verdict = FASTER if low > 1.0 else SLOWER if high < 1.0 else NOT_DISTINGUISHABLE
    return PairedSpeedup(
        baseline=baseline,
        candidate=candidate,
        estimate=estimate,
        low=low,
        high=high,
        confidence=confidence,
        verdict=verdict,
        round_speedups=[float(r) for r in np.exp(log_ratios)],
        baseline_median_s=float(np.median(base)),
        candidate_median_s=float(np.median(cand)),
    )


@dataclasses.dataclass
class SideBySide:
    """How to run a side-by-side comparison: timing per round, stopping rules, statistics.

    Args:
        warmup: untimed calls of a contender at the start of each of its turns.
        iters: timed calls per turn (their median is the round's latency).
        min_rounds: rounds before any stopping rule applies (>= 2: an interval needs two).
        max_rounds: rounds at most.
        target_width: stop once every interval's `(high - low) / estimate` is at most this;
            None: no width rule.
        time_budget_s: stop once the rounds of one setting took this long (checked after each
            round, once `min_rounds` are done); None: no budget.
        confidence: the intervals' level.
        resamples: bootstrap resamples.
        seed: of the bootstrap.
        busy_threshold: share of the machine used by other processes that marks it busy.

    Raises:
        ValueError: for `warmup` < 0, `iters` < 1, `min_rounds` < 2, `max_rounds` < `min_rounds`,
            a `target_width` or `time_budget_s` <= 0, `confidence` outside (0, 1), `resamples`
            < 100 or `busy_threshold` outside (0, 1].
    """

    warmup: int = 3
    iters: int = 20
    min_rounds: int = 5
    max_rounds: int = 20
    target_width: float | None = 0.10
    time_budget_s: float | None = 60.0
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    busy_threshold: float = BUSY_THRESHOLD

    def __post_init__(self) -> None:
        for name, minimum in (("warmup", 0), ("iters", 1), ("min_rounds", 2), ("resamples", 100)):
            check_int(name, getattr(self, name), minimum)
        if (
            isinstance(self.max_rounds, bool)
            or not isinstance(self.max_rounds, int)
            or self.max_rounds < self.min_rounds
        ):
            raise ValueError(
                f"`max_rounds` must be an int >= `min_rounds` ({self.min_rounds}), got {self.max_rounds!r}."
            )
        for name in ("target_width", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be None or a number > 0, got {value!r}.")
        _check_confidence(self.confidence)
        check_ratio("busy_threshold", self.busy_threshold)

    def run(
        self,
        contenders: Mapping[str, Callable[[], Any]],
        baseline: str,
        *,
        device: torch.device | str = "cpu",
        setting: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        timer: Callable[[Callable[[], Any]], float] | None = None,
    ) -> SideBySideResult:
        """Alternates `contenders` in rounds and returns each one's paired speedup over `baseline`.

        Args:
            contenders: name -> a zero-argument call to time (inputs already bound); at least two.
            baseline: the name of the contender the others are compared with.
            device: where the calls run (synchronized around each timed call).
            setting: what is being measured, carried into the result.
            progress: False: no progress bar; None: one when stdout is a terminal.
            timer: seconds of one turn of a call; default the median of `iters` timed calls
                after `warmup` untimed ones (`measure_latency`). Tests script latencies here.

        Raises:
            ValueError: for fewer than two contenders or a `baseline` that is not one of them.
        """
        if len(contenders) < 2:
            raise ValueError(f"`contenders` must hold at least two calls to compare, got {list(contenders)}.")
        if baseline not in contenders:
            raise ValueError(f"`baseline` must be one of the contenders {list(contenders)}, got {baseline!r}.")
        if timer is None:

            def timer(fn: Callable[[], Any]) -> float:
                return measure_latency(fn, device=device, warmup=self.warmup, iters=self.iters).median_s

        names = list(contenders)
        latencies: dict[str, list[float]] = {name: [] for name in names}
        monitor = LoadMonitor(self.busy_threshold).start()
        start = time.monotonic()
        stopped = MAX_ROUNDS
        label = _setting_label(setting or {})
        bar = progress_bar(self.max_rounds, f"Side by side {label}".strip(), enabled=progress)
        try:
            for round_index in range(self.max_rounds):
                # Rotate who goes first: a contender that always ran right after another (warm
                # caches, a turbo state) would carry that advantage into every round.
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    latencies[name].append(timer(contenders[name]))
                bar.update(1)
                done = round_index + 1
                if done < self.min_rounds:
                    continue
                speedups = self._speedups(latencies, baseline)
                bar.set_postfix_str(", ".join(f"{s.candidate} {s.label()}" for s in speedups))
                if self.target_width is not None and all(s.relative_width <= self.target_width for s in speedups):
                    stopped = NARROW_ENOUGH
                    break
                if self.time_budget_s is not None and time.monotonic() - start >= self.time_budget_s:
                    stopped = BUDGET_SPENT
                    break
        finally:
            bar.close()
        elapsed = time.monotonic() - start
        load = monitor.stop()
        result = SideBySideResult(
            setting=dict(setting or {}),
            baseline=baseline,
            round_latencies_s=latencies,
            speedups=self._speedups(latencies, baseline),
            stopped_because=stopped,
            elapsed_s=elapsed,
            load=load,
        )
        if load.busy:
            log.warning("Side-by-side %s measured on a busy machine (%s).", label or "comparison", load.summary())
        return result

    def _speedups(self, latencies: Mapping[str, list[float]], baseline: str) -> list[PairedSpeedup]:
        return [
            paired_speedup(
                latencies[baseline],
                times,
                confidence=self.confidence,
                resamples=self.resamples,
                seed=self.seed,
                baseline=baseline,
                candidate=name,
            )
            for name, times in latencies.items()
            if name != baseline
        ]


def compare_models(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    baseline: str,
    *,
    batch_sizes: Sequence[int] = (1,),
    threads: Sequence[int | None] = (None,),
    modes: Sequence[str] = (INFERENCE, TRAIN),
    backends: Sequence[str] = ("torch",),
    device: str | torch.device = "cpu",
    options: SideBySide | None = None,
    progress: bool | None = None,
) -> SideBySideReport:
    """Compares `models` side by side in every (device, threads, batch size, backend, mode) setting.

    Inference: eval mode under `torch.inference_mode`. Train step: train mode, forward +
    cross-entropy against a fixed random target + backward, no optimizer step (the profiler's
    protocol). ONNX Runtime: inference only, each model exported at each batch size. All models
    see the same random input; each model is left as it was found (mode, device, gradients,
    buffers: `profiler.restored`).

    Args:
        models: name -> model; at least two, all taking the same input.
        input_shape: one input without the batch dimension.
        baseline: the name of the model the others are compared with.
        batch_sizes: batch sizes to measure.
        threads: intra-op thread counts (None: the current setting).
        modes: "inference" and/or "train".
        backends: "torch" and/or "onnxruntime".
        device: where to measure.
        options: rounds, stopping rules and statistics; default `SideBySide()`.
        progress: False: no progress bars; None: on a terminal.

    Raises:
        ValueError: for fewer than two models, an unknown `baseline` or mode, and as `profile`
            for the input shape, batch sizes, threads, backends and device.
    """
    options = options or SideBySide()
    if len(models) < 2:
        raise ValueError(f"`models` must hold at least two models to compare, got {list(models)}.")
    check_choice("baseline", baseline, list(models))
    shape = profiler.validate_input_shape(input_shape)
    sizes = profiler.validate_batch_sizes(batch_sizes)
    modes = tuple(dict.fromkeys(modes))
    if not modes or any(mode not in MODES for mode in modes):
        raise ValueError(f"`modes` must be a non-empty list of {list(MODES)}, got {list(modes)!r}.")
    target = resolve_device(device)
    backends = validate_backends(backends, target)
    results = []
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(profiler.restored(model))
            model.to(target)
        stack.enter_context(torch.random.fork_rng(devices=[target.index] if target.type == "cuda" else []))
        dtype = next((p.dtype for m in models.values() for p in m.parameters() if p.is_floating_point()), torch.float32)
        generator = torch.Generator(device=target).manual_seed(0)
        for count in threads:
            with num_threads(count) as active_threads:
                for batch_size in sizes:
                    batch = torch.randn((batch_size, *shape), generator=generator, device=target, dtype=dtype)
                    for backend in backends:
                        for mode in modes:
                            setting = {
                                "device": str(target), "threads": active_threads, "batch_size": batch_size,
                                "backend": backend, "mode": mode,
                            }  # fmt: skip
                            result = _run_setting(
                                models, baseline, batch, setting, target, generator, options, progress
                            )
                            if result is not None:
                                results.append(result)
    return SideBySideReport(results)


def _run_setting(
    models: Mapping[str, nn.Module],
    baseline: str,
    batch: torch.Tensor,
    setting: dict[str, Any],
    device: torch.device,
    generator: torch.Generator,
    options: SideBySide,
    progress: bool | None,
) -> SideBySideResult | None:
    """The side-by-side rounds of one setting; None (logged when it is not obvious) for a train
    step that cannot run: on ONNX Runtime, or a train-mode BatchNorm refusing the batch."""
    mode, backend = setting["mode"], setting["backend"]
    if mode == TRAIN and backend != "torch":
        return None
    if mode == TRAIN and (blocker := _train_blocker(models, batch)) is not None:
        log.warning("Side by side: no train step at batch size %d: %s", setting["batch_size"], blocker)
        return None
    with _calls(models, batch, mode, backend, setting["threads"], generator) as calls:
        result = options.run(calls, baseline, device=device, setting=setting, progress=progress)
    log.info(
        "Side by side %s: %s (%d rounds, %s).", _setting_label(setting),
        ", ".join(f"{s.candidate} {s.label()} {s.verdict}" for s in result.speedups),
        result.rounds, result.stopped_because,
    )  # fmt: skip
    return result


@contextlib.contextmanager
def _calls(
    models: Mapping[str, nn.Module],
    batch: torch.Tensor,
    mode: str,
    backend: str,
    threads: int,
    generator: torch.Generator,
) -> Iterator[dict[str, Callable[[], Any]]]:
    """name -> the call to time for each model in this setting, in the right mode and grad state."""
    calls: dict[str, Callable[[], Any]] = {}
    if mode == INFERENCE:
        for name, model in models.items():
            model.eval()
            if backend == "onnxruntime":
                calls[name] = onnxruntime_runner(model, batch, threads)
            else:
                calls[name] = _inference_call(model, batch)
        yield calls
        return
    for name, model in models.items():
        loss_fn = profiler.train_loss_fn(model, batch, generator)
        model.train()
        calls[name] = _train_call(model, batch, loss_fn)
    with torch.enable_grad():
        yield calls
    for model in models.values():
        model.zero_grad(set_to_none=True)


def _train_blocker(models: Mapping[str, nn.Module], batch: torch.Tensor) -> str | None:
    """Why some model cannot run a train step on `batch` (`profiler.train_mode_batch_norm_blocker`)."""
    for name, model in models.items():
        blocker = profiler.train_mode_batch_norm_blocker(model, batch)
        if blocker is not None:
            return f"{name}: {blocker}"
    return None


def _inference_call(model: nn.Module, batch: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return model(batch)

    return call


def _train_call(model: nn.Module, batch: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch)).backward()

    return call


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {confidence!r}.")


def _setting_label(setting: Mapping[str, Any]) -> str:
    parts = []
    if "batch_size" in setting:
        parts.append(f"bs{setting['batch_size']}")
    if setting.get("threads") is not None:
        parts.append(f"t{setting['threads']}")
    for key in ("backend", "mode", "device"):
        if key in setting:
            parts.append(str(setting[key]))
    parts += [f"{k}={v}" for k, v in setting.items() if k not in ("batch_size", "threads", "backend", "mode", "device")]
    return " ".join(parts)
