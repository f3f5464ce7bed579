"""`TuckerVBMFCallback`: Tucker-2 decomposition of the convolutions with VBMF ranks (paper 000).

Paper 000's protocol: decompose every conv of a *trained* baseline with Tucker-2, ranks chosen by
empirical VBMF, then fine-tune (100 epochs on CIFAR-10, 30 on Steelpatch). As a config:

    python cli.py fit --config configs/resnet20_tucker_vbmf.yaml --model.init_from <baseline.ckpt>

`epoch: 0` (the default) decomposes once in `setup`, before the optimizer exists; `epoch: k > 0`
decomposes at the start of epoch k, and the shared helper of `StructuralCompressionCallback`
rebuilds the optimizers and LR schedulers (keeping the schedule's position) so the new factor
weights are trained.

Beyond paper 000, which found its Tucker-VBMF ResNet20 0.51x *slower* than the baseline on a GPU
at batch 1 while FLOPs promised 8.73x, `runtime_aware: true` measures every factorized layer side
by side with the original on the device (batch sizes, thread counts, inference and train step;
alternating rounds, paired speedup with a confidence interval) and keeps the original wherever the
factorization is not faster by `margin` in every setting; then (`whole_model`) it measures the whole
decomposed model against the original the same way and puts layers back while it is significantly
slower (the whole interval below 1) in any setting. Each check shows a progress bar when the
Trainer's does.

What it writes (rank 0):

| where | what |
|---|---|
| every logger | `compression/rank/<layer>/out` and `/in` (Tucker-2), `compression/rank/<layer>` (SVD split) |
| every logger | `compression/tucker/decomposed_layers`, `compression/tucker/kept_layers` |
| every logger, `compression_log.jsonl` | params, MACs, channels before/after (`StructuralCompressionCallback`) |
| `tucker_report.json` / `.md` in the log dir | per layer: method, ranks, params/MACs before and after, |
| | latency before and after per setting (runtime-aware), decision, reason; totals |

The decomposition is a replayable `TuckerRecord` in the checkpoint: `ImageClassifier
.load_from_checkpoint(path)` rebuilds the factorized model in any process, without this callback.

The algorithm is `compresslight.compression.tucker.decompose_model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from compresslight.callbacks.structural_edit import StructuralCompressionCallback, find_example_inputs
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.compression.tucker import (
    DEFAULT_HOOI_ITERS,
    RuntimeCheck,
    SVDSplit,
    TuckerConv2d,
    TuckerRecord,
    decompose_model,
    selected_layers,
)
from compresslight.compression.tucker_report import TuckerReport, model_cost
from compresslight.compression.tucker_selection import TuckerOptions
from compresslight.lightning_compat import rank_zero_only

log = logging.getLogger(__name__)

REPORT_NAME = "tucker_report"

__all__ = ["REPORT_NAME", "TuckerVBMFCallback"]


class TuckerVBMFCallback(StructuralCompressionCallback):
    """Replaces the selected convolutions by their Tucker-2 factorization, once, at `epoch`.

    Args:
        rank_method: `"vbmf"` (paper 000: the EVBMF ranks of each weight's two channel
            unfoldings), a fraction in (0, 1] of each mode's size, or explicit ranks per layer
            `{name: [out_rank, in_rank]}` (an int for a 1x1 conv).
        epoch: 0 decomposes once in `setup`, before training (paper 000: a trained baseline given
            by `--model.init_from`, then fine-tuning); k > 0 at the start of epoch k.
        layers: glob patterns over the compressed module's layer names (`"layer1.*.conv1"`); a
            plain name must name a conv.
        skip_first_conv: keep the model's first conv (3 input channels: nothing to compress).
        min_rank: VBMF or fraction ranks below it are raised to it.
        zero_rank: when VBMF finds rank 0 (a mode that looks like pure noise): `"min_rank"` uses
            `min_rank`, `"skip"` keeps the layer.
        pointwise: 1x1 convs (projection shortcuts): `"svd"` splits them in two, `"skip"` keeps them.
        include_linear: also SVD-split the `nn.Linear` layers the patterns select.
        require_reduction: keep a layer whose factorization has no fewer MACs than the original.
        n_iter_max: HOOI sweeps after the HOSVD initialization (0: plain HOSVD).
        runtime_aware: time each factorized layer against the original and keep the original
            unless the factorization is faster by `margin` in every setting below.
        batch_sizes: batch sizes to time at (runtime-aware).
        threads: CPU thread counts to time with; None keeps the current setting (runtime-aware).
        device: where to time; None: the trainer's root device (runtime-aware).
        margin: the relative speedup a factorization must reach, in [0, 1) (runtime-aware).
        train: also time forward + backward, as the `ProfileCallback` does (runtime-aware).
        warmup: untimed calls per measurement (runtime-aware).
        iters: timed calls per measurement, median taken (runtime-aware).
        rounds: side-by-side rounds per setting (paired speedup with a confidence interval;
            >= 2; runtime-aware).
        whole_model: after the per-layer decisions, measure the whole decomposed model side by
            side with the original in the same settings and put layers back until it is not
            significantly slower in any (runtime-aware; see `RuntimeCheck`).
        module_path: the submodule to decompose (see `StructuralCompressionCallback`).

    Raises:
        ValueError: for a bad `rank_method`, `epoch` < 0, empty `layers`, `min_rank` < 1, an
            unknown `zero_rank` / `pointwise`, `n_iter_max` < 0, or bad runtime settings. Layer
            patterns and explicit ranks are checked against the model in `setup` (before any
            training): a pattern matching nothing, a non-conv layer named, ranks larger than a
            layer's channels.
    """

    def __init__(
        self,
        rank_method: Literal["vbmf"] | float | dict[str, list[int] | int] = "vbmf",
        epoch: int = 0,
        layers: Sequence[str] = ("*",),
        skip_first_conv: bool = True,
        min_rank: int = 1,
        zero_rank: Literal["min_rank", "skip"] = "min_rank",
        pointwise: Literal["svd", "skip"] = "svd",
        include_linear: bool = False,
        require_reduction: bool = True,
        n_iter_max: int = DEFAULT_HOOI_ITERS,
        runtime_aware: bool = False,
        batch_sizes: Sequence[int] = (1,),
        threads: Sequence[int] | None = None,
        device: str | None = None,
        margin: float = 0.05,
        train: bool = True,
        warmup: int = 3,
        iters: int = 20,
        rounds: int = 3,
        whole_model: bool = True,
        module_path: str | None = None,
    ) -> None:
        super().__init__(module_path=module_path)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` must be an int >= 0 (0: once in `setup`), got {epoch!r}.")
        if isinstance(layers, str):
            layers = [layers]
        if not layers or not all(isinstance(pattern, str) and pattern for pattern in layers):
            raise ValueError(f"`layers` must be a non-empty list of non-empty glob patterns, got {layers!r}.")
        #: The algorithm's options, checked by it here (before any training).
        self.options = TuckerOptions(
            layer_patterns=list(layers),
            rank_method=dict(rank_method) if isinstance(rank_method, Mapping) else rank_method,
            skip_first_conv=skip_first_conv,
            min_rank=min_rank,
            zero_rank=zero_rank,
            pointwise=pointwise,
            include_linear=include_linear,
            require_reduction=require_reduction,
            n_iter_max=n_iter_max,
        )
        # Built now (on the CPU when the device is the trainer's) so bad settings fail at once.
        RuntimeCheck(
            batch_sizes=batch_sizes, threads=(None,) if threads is None else threads, device=device or "cpu",
            margin=margin, warmup=warmup, iters=iters, train=train, rounds=rounds, whole_model=whole_model,
        )  # fmt: skip
        self.epoch = epoch
        self.runtime_aware = runtime_aware
        self.batch_sizes = list(batch_sizes)
        self.threads = None if threads is None else list(threads)
        self.device = device
        self.margin = margin
        self.train = train
        self.warmup = warmup
        self.iters = iters
        self.rounds = rounds
        self.whole_model = whole_model
        self.decomposed = False
        #: The decomposition report (`TuckerReport`), once decomposed in this process.
        self.report: TuckerReport | None = None
        self._log_dir: Path | None = None
        self._restored = False

    @property
    def layers(self) -> list[str]:
        return list(self.options.layer_patterns)

    @property
    def rank_method(self) -> Any:
        return self.options.rank_method

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module_path=self.module_path, epoch=self.epoch, layers=self.layers)

    # --- schedule ----------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._restored = False  # set by `load_state_dict` if Lightning restores a checkpoint next
        # `trainer.log_dir` broadcasts under DDP: resolve it here, where every rank runs.
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if stage != "fit" or self.decomposed:
            return
        # Patterns and explicit ranks are checked now, whatever the epoch: a typo must not
        # surface after `epoch` epochs of training.
        options = self.options
        selected_layers(
            self.target_module(pl_module), options.layer_patterns, options.rank_method,
            skip_first_conv=options.skip_first_conv, pointwise=options.pointwise, include_linear=options.include_linear,
        )  # fmt: skip
        if self.epoch == 0:
            # On resume, Lightning restores the checkpoint after `setup`: the restore guard of
            # `StructuralCompressionCallback` then undoes this edit and replays the checkpoint's
            # records, and `load_state_dict` marks the decomposition done. The report is only
            # published in `on_fit_start`, once it is known that this edit stands.
            self._decompose(trainer, pl_module, publish=False)

    @override
    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        return [] if self.decomposed else [self.epoch]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.report is None or self._restored:
            return
        if not self._edit_in_place(pl_module):
            # A checkpoint without this callback's state was restored: the restore guard put the
            # model back as it was (and warned); the one-shot decomposition did not happen.
            self.decomposed = False
            self.report = None
            return
        self._publish(trainer, self.report)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch > 0 and trainer.current_epoch == self.epoch and not self.decomposed:
            self._decompose(trainer, pl_module, publish=True)

    def _decompose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, publish: bool) -> None:
        target = self.target_module(pl_module)
        inputs = find_example_inputs(trainer, pl_module)
        check = None
        if self.runtime_aware:
            check = RuntimeCheck(
                batch_sizes=self.batch_sizes, threads=(None,) if self.threads is None else self.threads,
                device=self.device or str(trainer.strategy.root_device), margin=self.margin, warmup=self.warmup,
                iters=self.iters, train=self.train, rounds=self.rounds, whole_model=self.whole_model,
                progress=None if trainer.progress_bar_callback is not None else False,
            )  # fmt: skip
        before = model_cost(target, inputs)
        started = time.perf_counter()
        record: TuckerRecord = self.apply_edit(  # type: ignore[assignment]  # the edit's own record
            trainer,
            pl_module,
            lambda module: decompose_model(
                module, **dataclasses.asdict(self.options), runtime_aware=check, example_inputs=inputs
            ),
            example_inputs=inputs,
        )
        self.decomposed = True
        self.report = TuckerReport(
            rank_method=self.rank_method,
            runtime_check=None if check is None else check.summary(),
            seconds=time.perf_counter() - started,
            before=before,
            after=model_cost(target, inputs),
            decomposed=sorted(record.methods),
            layers=record.report,
            whole_model=record.whole_model,
            callback=type(self).__name__,
            epoch=trainer.current_epoch,
        )
        if publish:
            self._publish(trainer, self.report)

    def _edit_in_place(self, pl_module: pl.LightningModule) -> bool:
        """Whether every layer of this process's decomposition is still factorized."""
        target = self.target_module(pl_module)
        for name in self.report.decomposed if self.report else ():
            try:
                layer = target.get_submodule(name)
            except AttributeError:
                return False
            if not isinstance(layer, (TuckerConv2d, SVDSplit)):
                return False
        return True

    @rank_zero_only
    def _publish(self, trainer: pl.Trainer, report: TuckerReport) -> None:
        metrics: dict[str, float] = {
            "compression/tucker/decomposed_layers": float(len(report.decomposed)),
            "compression/tucker/kept_layers": float(sum(row["decision"] == "kept" for row in report.layers)),
        }
        for row in report.layers:
            if row["decision"] != "decomposed":
                continue
            if row["method"] == "tucker2":
                metrics[f"compression/rank/{row['name']}/out"] = float(row["ranks"][0])
                metrics[f"compression/rank/{row['name']}/in"] = float(row["ranks"][1])
            else:
                metrics[f"compression/rank/{row['name']}"] = float(row["ranks"][0])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{REPORT_NAME}.json").write_text(json.dumps(report.to_dict(), indent=2))
        markdown = report.to_markdown()
        (log_dir / f"{REPORT_NAME}.md").write_text(markdown)
        log.info("TuckerVBMFCallback wrote %s.\n%s", log_dir / f"{REPORT_NAME}.md", markdown)

    # --- checkpoints -------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decomposed": self.decomposed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.decomposed = bool(state_dict.get("decomposed", False))
        # The checkpoint says what the model is: a decomposition made in `setup` of this process
        # has been undone by the restore (see `StructuralCompressionCallback`).
        self._restored = True
