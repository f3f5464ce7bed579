"""LCCallback in real Trainer runs: C steps at the right epochs, mu schedule, logging, the
factorization and the rebuilt optimizer, checkpoints mid-algorithm and after, runtime models
measured on the fly or loaded (and refused when measured elsewhere), bad input."""

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from compresslight.callbacks.lc import LCCallback
from helpers import INPUT_SHAPE, TESTS_DIR, classifier, run_ddp_script, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.lc import FlopsCost, LowRankLC, c_step_layer, choose_rank, squared_singular_values
from compresslight.compression.lc_schedule import calibrate_lam
from compresslight.compression.lowrank import compressible_layers
from compresslight.compression.runtime_model import RuntimeModel
from compresslight.registry import create_model

# Tuned on resnet20 at 16x16 so that the C steps choose intermediate ranks for the first stage
# and keep the rest dense: both outcomes are exercised.
FLOPS_LC = dict(lam=1.0, cost="flops", mu_init=1e-2, mu_growth=2.0, epochs_per_step=1)
# Tiny measurements: the point is the plumbing, not the numbers.
FAST_RUNTIME = dict(cost="runtime", grid_points=2, measure_iters=2, threads=1)


class Watcher(Callback):
    """Placed after the LCCallback: sees its state and the module right after each of its hooks."""

    def __init__(self, lc: LCCallback) -> None:
        self.lc = lc
        self.state_at_train_start = None
        self.params_after_edit: dict[str, torch.Tensor] = {}
        self.edit_epoch: int | None = None

    def on_train_start(self, trainer, pl_module):
        if self.lc.lc_state is not None:
            self.state_at_train_start = self.lc.lc_state.state_dict()

    def on_train_epoch_start(self, trainer, pl_module):
        if self.lc.compressed and self.edit_epoch is None:
            self.edit_epoch = trainer.current_epoch
            self.params_after_edit = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


def factorized_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Layers replaced by `Sequential(v, u)`, with (v's out, u's in) = (rank, rank)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and list(dict(module.named_children())) == ["v", "u"]:
            out_v = module.v.out_channels if isinstance(module.v, nn.Conv2d) else module.v.out_features
            in_u = module.u.in_channels if isinstance(module.u, nn.Conv2d) else module.u.in_features
            found[name] = (out_v, in_u)
    return found


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_c_steps_at_l_step_ends_then_factorize_and_fine_tune(tmp_path):
    lc = LCCallback(steps=2, **{**FLOPS_LC, "epochs_per_step": 2})
    watcher = Watcher(lc)
    model = classifier()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = tiny_trainer(tmp_path, max_epochs=6, callbacks=[lc, watcher], logger=logger)
    trainer.fit(model, *tiny_loaders())

    # L steps are epochs [0, 2) and [2, 4); each C step runs as the next epoch starts, mu grows by b.
    assert [entry["epoch"] for entry in lc.history] == [2, 4]
    assert [entry["mu"] for entry in lc.history] == pytest.approx([1e-2, 2e-2])
    assert watcher.edit_epoch == 4
    # The learned ranks are the network's structure now; the dense-kept layers are untouched.
    assert lc.compressed and lc.final_ranks
    assert factorized_layers(model.model) == {name: (rank, rank) for name, rank in lc.final_ranks.items()}
    last = lc.history[-1]
    assert set(lc.final_ranks) | set(last["dense"]) == set(compressible_layers(create_model("resnet20", num_classes=4)))
    assert len(model.compression_records) == 1 and model.compression_records[0].ranks == lc.final_ranks

    # The rebuilt optimizer holds exactly the factorized module's parameters and moved all of them.
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), watcher.params_after_edit[n])]
    assert len(moved) == len(watcher.params_after_edit)
    assert any(name.endswith(".v.weight") for name in moved)
    # The LR schedule kept its place through the rebuild (multistep at 0.5 x 6 = epoch 3, x0.1).
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 * 0.1)

    # Every C step reached the logger and lc_log.jsonl.
    rows = [row for row in read_metrics(logger.log_dir) if row.get("lc/mu")]
    assert [float(row["lc/mu"]) for row in rows] == pytest.approx([1e-2, 2e-2])
    assert all(float(row["lc/predicted_cost"]) > 0 and row["lc/distance"] != "" for row in rows)
    assert float(rows[-1]["lc/rank/layer1.0.conv1"]) == last["ranks"]["layer1.0.conv1"]
    events = [json.loads(line) for line in (Path(logger.log_dir) / "lc_log.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events] == ["c_step", "c_step", "factorize"]
    assert events[-1]["ranks"] == lc.final_ranks


def test_quadratic_penalty_pulls_weights_toward_theta(tmp_path):
    # One L step with a huge mu after a C step: the weights of a factorized layer land near Theta.
    lc = LCCallback(steps=2, **{**FLOPS_LC, "mu_growth": 1000.0}, augmented_lagrangian=False)
    model = classifier(lr=0.01, momentum=0.0, weight_decay=0.0, lr_schedule="constant")
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[lc])
    trainer.fit(model, *tiny_loaders())
    # ||W - Theta|| at C step 1 (after an L step at mu = 10) is far below the one at C step 0.
    assert lc.history[1]["distance"] < 0.5 * lc.history[0]["distance"]


def test_resume_mid_algorithm_and_reload_the_factorized_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    train, val = tiny_loaders()
    lc = LCCallback(steps=3, **FLOPS_LC)
    trainer = tiny_trainer(tmp_path, max_epochs=5, callbacks=[lc, ModelCheckpoint(dirpath=checkpoints, save_top_k=-1)])
    model = classifier()
    trainer.fit(model, train, val)
    assert [entry["epoch"] for entry in lc.history] == [1, 2, 3]

    # The checkpoint written after epoch 1 holds C step 0 (made as epoch 1 started) and not step 1.
    mid = next(checkpoints.glob("epoch=1-*.ckpt"))
    saved = torch.load(mid, weights_only=False)["callbacks"][lc.state_key]
    assert not saved["compressed"] and saved["lc_state"]["step"] == 1

    # A fresh module and callback resume with the same state and finish the algorithm once.
    resumed_lc = LCCallback(steps=3, **FLOPS_LC)
    watcher = Watcher(resumed_lc)
    resumed = classifier()
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=5, callbacks=[resumed_lc, watcher])
    trainer.fit(resumed, train, val, ckpt_path=mid)
    state = watcher.state_at_train_start
    assert state["step"] == 1 and state["mu"] == pytest.approx(saved["lc_state"]["mu"])
    for name, theta in saved["lc_state"]["thetas"].items():
        torch.testing.assert_close(state["thetas"][name], theta)
        torch.testing.assert_close(state["multipliers"][name], saved["lc_state"]["multipliers"][name])
    assert [entry["epoch"] for entry in resumed_lc.history] == [1, 2, 3]  # step 0 restored, 1 and 2 made here
    assert resumed_lc.compressed and watcher.edit_epoch == 3
    assert factorized_layers(resumed.model) == {n: (r, r) for n, r in resumed_lc.final_ranks.items()}

    # After the factorization: the checkpoint reloads without the callback (the record replays)...
    last = next(checkpoints.glob("epoch=4-*.ckpt"))
    saved = torch.load(last, weights_only=False)["callbacks"][lc.state_key]
    assert saved["compressed"] and saved["lc_state"] is None  # no Theta carried after the edit
    loaded = ImageClassifier.load_from_checkpoint(last)
    inputs = torch.randn(2, *INPUT_SHAPE)
    torch.testing.assert_close(loaded.eval()(inputs), model.eval()(inputs))
    # ...and a fit resumed from it with the callback only fine-tunes.
    again = LCCallback(steps=3, **FLOPS_LC)
    trainer = tiny_trainer(tmp_path / "again", max_epochs=6, callbacks=[again])
    trainer.fit(classifier(), train, val, ckpt_path=last)
    assert again.compressed and len(again.history) == 3 and again.lc is None


def test_runtime_model_measured_on_the_fly_saved_and_reused(tmp_path):
    # A lam large enough that some layers are worth factorizing even at these tiny sizes.
    lc = LCCallback(lam=100.0, steps=1, mu_init=1e-2, epochs_per_step=1, **FAST_RUNTIME)
    logger = CSVLogger(tmp_path, name="run", version=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[lc, checkpoints], logger=logger)
    trainer.fit(classifier(), *tiny_loaders())

    path = Path(logger.log_dir) / "runtime_model.json"
    runtime_model = RuntimeModel.load(path)
    assert set(runtime_model.layers) == set(compressible_layers(create_model("resnet20", num_classes=4)))
    assert runtime_model.environment.threads == 1 and runtime_model.environment.batch_size == 1
    assert lc.measured_runtime_model == runtime_model.to_dict()
    entry = lc.history[0]
    assert entry["cost_unit"] == "ms"
    # The logged cost is R(r) of the chosen ranks under that runtime model (rank 0 included).
    costs = {name: runtime_model.layer_costs(name) for name in entry["ranks"]}
    layer_ms = [
        costs[name].dense if name in entry["dense"] else costs[name].factorized[rank]
        for name, rank in entry["ranks"].items()
    ]
    assert entry["cost"] == pytest.approx(sum(layer_ms), rel=1e-9)
    assert len(entry["dense"]) < len(entry["ranks"])  # this lam makes factorizing some layers worth it
    ranks = {name: None if name in entry["dense"] else max(rank, 1) for name, rank in entry["ranks"].items()}
    assert entry["predicted_network_ms"] == pytest.approx(runtime_model.predict_network(ranks) * 1e3)
    rows = [row for row in read_metrics(logger.log_dir) if row.get("lc/runtime_model_seconds")]
    assert len(rows) == 1
    # The checkpoint (with the measured runtime model in the callback state) loads with
    # Lightning's default `weights_only` unpickler, without the callback.
    trainer.save_checkpoint(tmp_path / "rt.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "rt.ckpt")
    assert factorized_layers(loaded.model) == {n: (r, r) for n, r in lc.final_ranks.items()}

    # A fit resumed before the C step prices ranks with the runtime model measured before it.
    resumed = LCCallback(lam=100.0, steps=1, mu_init=1e-2, epochs_per_step=1, **FAST_RUNTIME)
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=2, callbacks=[resumed])
    trainer.fit(classifier(), *tiny_loaders(), ckpt_path=next((tmp_path / "checkpoints").glob("epoch=0-*.ckpt")))
    assert resumed.measured_runtime_model == lc.measured_runtime_model
    events = [json.loads(line)["event"] for line in (tmp_path / "resume" / "lc_log.jsonl").read_text().splitlines()]
    assert events == ["c_step", "factorize"]  # no new measurement

    # The saved file is accepted as `runtime_model` for the same architecture on this machine.
    reused = LCCallback(lam=100.0, runtime_model=str(path), steps=1, mu_init=1e-2, epochs_per_step=1, threads=1)
    trainer = tiny_trainer(tmp_path / "reuse", max_epochs=2, limit_train_batches=1, callbacks=[reused])
    trainer.fit(classifier(), *tiny_loaders())
    assert reused.measured_runtime_model is None  # nothing measured: the file was used
    assert reused.runtime_model.to_dict() == runtime_model.to_dict()
    assert reused.history[0]["cost_unit"] == "ms"


def test_calibrate_lam_finds_the_smallest_lam_that_reaches_the_latency_target(runtime_model_file):
    model = create_model("resnet20", num_classes=4)
    runtime_model = RuntimeModel.load(runtime_model_file)
    layers = list(compressible_layers(model))
    # A target between what lam = 0 and a huge lam give (these tiny layers' measured times differ
    # run to run: a full-rank factorization can be faster than the dense layer, rank 1 not 10x).
    dense = runtime_model.predict({})
    at_zero, at_huge = (
        calibrate_lam_prediction(model, layers, runtime_model, runtime_model, mu=1e-2, lam=lam) for lam in (0, 1e6)
    )
    assert at_huge < at_zero
    target = (at_zero + at_huge) / 2 / dense
    found = calibrate_lam(model, layers, runtime_model, runtime_model, mu=1e-2, target=target)
    assert found.dense_s == pytest.approx(dense)
    assert found.predicted_s <= target * dense and found.lam > 0
    # The smallest such lam: a hair less reaches the target no more.
    below = calibrate_lam_prediction(model, layers, runtime_model, runtime_model, mu=1e-2, lam=found.lam * (1 - 1e-6))
    assert below > target * dense
    with pytest.raises(ValueError, match=r"`target` must be a fraction in \(0, 1\], got 0"):
        calibrate_lam(model, layers, runtime_model, runtime_model, mu=1e-2, target=0)


def calibrate_lam_prediction(model, layers, prices, runtime_model, *, mu, lam) -> float:
    """The runtime model's time of the ranks one C step at (mu, lam) chooses, by `choose_rank` directly."""
    ranks = {}
    for name in layers:
        choice = choose_rank(
            squared_singular_values(model.get_submodule(name).weight), prices.layer_costs(name), mu=mu, lam=lam
        )
        ranks[name] = None if choice.dense else max(choice.rank, 1)
    return runtime_model.predict(ranks)


def test_latency_target_calibrates_lam_for_the_flops_cost_and_a_resumed_fit_keeps_it(runtime_model_file, tmp_path):
    lc = LCCallback(
        latency_target=0.7, cost="flops", runtime_model=str(runtime_model_file), threads=1,
        steps=2, mu_init=1e-2, mu_growth=2.0, epochs_per_step=1,
    )  # fmt: skip
    logger = CSVLogger(tmp_path, name="run", version=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[lc, checkpoints], logger=logger)
    trainer.fit(classifier(), *tiny_loaders())
    entries = [json.loads(line) for line in (Path(logger.log_dir) / "lc_log.jsonl").read_text().splitlines()]
    assert [e.get("event") for e in entries] == ["lam_calibration", "c_step", "c_step", "factorize"]
    calibration = entries[0]
    assert calibration["lam"] == lc.lam and calibration["mu"] == 1e-2 and calibration["target"] == 0.7
    # Aimed at 70% of the dense time (or as close as the largest lam gets, for FLOPs on these tiny layers).
    assert calibration["predicted_s"] <= 0.7 * calibration["dense_s"] or calibration["lam"] == 1e6
    assert entries[1]["cost_unit"] != "ms"  # the ranks were priced by FLOPs; the runtime model only aimed lam
    assert any(row.get("lc/lam") for row in read_metrics(logger.log_dir))
    # Resumed after the first epoch (other weights now), the fit keeps the calibrated lam.
    resumed = LCCallback(
        latency_target=0.7, cost="flops", runtime_model=str(runtime_model_file), threads=1,
        steps=2, mu_init=1e-2, mu_growth=2.0, epochs_per_step=1,
    )  # fmt: skip
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=3, callbacks=[resumed])
    trainer.fit(classifier(), *tiny_loaders(), ckpt_path=next((tmp_path / "checkpoints").glob("epoch=0-*.ckpt")))
    assert resumed.lam == lc.lam
    events = [json.loads(line).get("event") for line in (tmp_path / "resume" / "lc_log.jsonl").read_text().splitlines()]
    assert "lam_calibration" not in events


@pytest.fixture(scope="module")
def runtime_model_file(tmp_path_factory) -> Path:
    model = create_model("resnet20", num_classes=4)
    built = RuntimeModel.build(model, torch.zeros(1, *INPUT_SHAPE), threads=1, grid_points=2, warmup=1, iters=2)
    path = tmp_path_factory.mktemp("runtime") / "rm.json"
    built.save(path)
    return path


def edited_copy(path: Path, tmp_path: Path, edit) -> str:
    data = json.loads(path.read_text())
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return str(out)


@pytest.mark.parametrize(
    ("edit", "kwargs", "message"),
    [
        (
            lambda d: d["environment"].update(device_name="Some Other CPU"),
            {},
            r"measured on device 'cpu' \(Some Other CPU\)",
        ),
        (lambda d: None, dict(threads=2), r"measured with threads=1, not threads=2"),
        (lambda d: None, dict(batch_size=8), r"measured with batch_size=1, not batch_size=8"),
    ],
    ids=["other_device", "other_threads", "other_batch_size"],
)
def test_runtime_model_from_another_device_or_setting_is_refused(runtime_model_file, tmp_path, edit, kwargs, message):
    path = edited_copy(runtime_model_file, tmp_path, edit)
    lc = LCCallback(lam=1.0, runtime_model=path, steps=1, epochs_per_step=1, **kwargs)
    model = classifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        tiny_trainer(tmp_path, max_epochs=2, callbacks=[lc]).fit(model, *tiny_loaders())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_runtime_model_of_another_architecture_is_refused(runtime_model_file, tmp_path):
    lc = LCCallback(lam=1.0, runtime_model=str(runtime_model_file), steps=1, epochs_per_step=1)
    with pytest.raises(ValueError, match=r"another architecture: layer 'fc' differs"):
        trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[lc])
        trainer.fit(classifier(num_classes=5), *tiny_loaders(num_classes=5))
    # `check_device=False` accepts a file from another machine (e.g. the deployment target).
    foreign = edited_copy(runtime_model_file, tmp_path, lambda d: d["environment"].update(device_name="Jetson CPU"))
    lc = LCCallback(lam=1.0, runtime_model=foreign, check_device=False, steps=1, epochs_per_step=1)
    tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=1, callbacks=[lc]).fit(classifier(), *tiny_loaders())
    assert lc.compressed


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(lam=-1.0), ValueError, r"`lam` must be a number >= 0, got -1.0"),
        (dict(lam=1.0, cost="ms"), ValueError, r"`cost` must be one of \['runtime', 'flops', 'storage'\], got 'ms'"),
        (dict(lam=1.0, mu_init=0.0), ValueError, r"`mu_init` \(a of mu_t = a \* b\^t\) must be > 0, got 0.0"),
        (dict(lam=1.0, mu_growth=0.5), ValueError, r"`mu_growth` \(b of mu_t = a \* b\^t\) must be >= 1"),
        (dict(lam=1.0, steps=0), ValueError, r"`steps` must be an int >= 1, got 0"),
        (dict(lam=1.0, epochs_per_step=1.5), ValueError, r"`epochs_per_step` must be an int >= 1, got 1.5"),
        (dict(lam=1.0, tolerance=-1), ValueError, r"`tolerance` must be >= 0, got -1"),
        (dict(lam=1.0, grid_points=1), ValueError, r"`grid_points` must be an int >= 2, got 1"),
        (dict(lam=1.0, threads=0), ValueError, r"`threads` must be an int >= 1, got 0"),
        (dict(lam=1.0, backend="tvm"), ValueError, r"`backend` must be one of \['torch', 'onnxruntime'\] or None"),
        (dict(lam=1.0, statistic="mean"), ValueError, r"`statistic` must be one of \['median', 'min'\]"),
        (
            dict(lam=1.0, cost="flops", runtime_model="rm.json"),
            ValueError,
            r"needs `cost`='runtime' \(or a `latency_target`\), got cost='flops'",
        ),
        (dict(), ValueError, r"Give `lam` .* or `latency_target` .*exactly one; got lam=None, latency_target=None"),
        (dict(lam=1.0, latency_target=0.5), ValueError, r"exactly one; got lam=1.0, latency_target=0.5"),
        (dict(latency_target=0.0), ValueError, r"`latency_target` must be a fraction in \(0, 1\], got 0.0"),
        (dict(latency_target=1.5), ValueError, r"`latency_target` must be a fraction in \(0, 1\], got 1.5"),
        (dict(lam=1.0, runtime_model="missing.json"), FileNotFoundError, r"'missing.json' does not exist"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, error, message):
    with pytest.raises(error, match=message):
        LCCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "message"),
    [
        (dict(steps=2, epochs_per_step=2), 4, r"`trainer.max_epochs` > `steps` x `epochs_per_step` = 2 x 2 = 4 .*=4"),
        (dict(layers=["layer9.*"]), 3, r"`layers` pattern 'layer9.\*' matches no compressible layer"),
        (dict(ignored_layers=["nothing"]), 3, r"`ignored_layers` pattern 'nothing' matches no compressible layer"),
        (dict(layers=["fc"], ignored_layers=["f*"]), 3, r"leaves no layer to compress"),
    ],
)
def test_bad_setup_fails_before_training_and_leaves_model_untouched(tmp_path, kwargs, max_epochs, message):
    lc = LCCallback(**{**FLOPS_LC, "steps": 1, **kwargs})
    model = classifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        tiny_trainer(tmp_path, max_epochs=max_epochs, callbacks=[lc]).fit(model, *tiny_loaders())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_layers_patterns_restrict_the_compression(tmp_path):
    lc = LCCallback(steps=1, layers=["layer1.*"], ignored_layers=["layer1.2.*"], **FLOPS_LC)
    model = classifier()
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[lc]).fit(model, *tiny_loaders())
    assert set(lc.history[0]["ranks"]) == {f"layer1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)}
    assert set(factorized_layers(model.model)) <= set(lc.history[0]["ranks"])


def test_tolerance_stops_early_and_factorizes(tmp_path):
    # A huge tolerance: the first C step already counts as converged.
    lc = LCCallback(steps=5, tolerance=1e9, **FLOPS_LC)
    model = classifier()
    watcher = Watcher(lc)
    tiny_trainer(tmp_path, max_epochs=6, limit_train_batches=1, callbacks=[lc, watcher]).fit(model, *tiny_loaders())
    assert len(lc.history) == 1 and lc.compressed and watcher.edit_epoch == 1


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests_dir!r})
    import pytorch_lightning as pl
    from helpers import classifier, tiny_loaders
    from compresslight.callbacks.lc import LCCallback

    out_dir = Path(sys.argv[1])
    pl.seed_everything(0)
    # The runtime model is measured on rank 0 only and broadcast; the optimizers restart per L step.
    lc = LCCallback(
        lam=100.0, cost="runtime", grid_points=2, measure_iters=2, threads=1, mu_init=1e-2, mu_growth=2.0,
        steps=2, epochs_per_step=1, restart_lr=True,
    )
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out_dir), callbacks=[lc],
    )
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode() + param.detach().contiguous().numpy().tobytes())
    report = dict(
        history=[e["ranks"] for e in lc.history], ranks=lc.final_ranks, hash=digest.hexdigest(),
        runtime_model=lc.measured_runtime_model,
    )
    (out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(report))
    """
)


@pytest.mark.slow
def test_ddp_ranks_agree_on_runtime_model_c_steps_and_factorized_weights(tmp_path):
    reports = run_ddp_script(tmp_path, DDP_SCRIPT.format(tests_dir=str(TESTS_DIR)))
    assert reports[0]["history"] == reports[1]["history"] and len(reports[0]["history"]) == 2
    assert reports[0]["ranks"] and reports[0]["ranks"] == reports[1]["ranks"]
    assert reports[0]["hash"] == reports[1]["hash"]
    assert reports[0]["runtime_model"] == reports[1]["runtime_model"] is not None


def test_restart_lr_gives_each_l_step_and_the_fine_tuning_a_fresh_schedule(tmp_path):
    lc = LCCallback(steps=2, restart_lr=True, **{**FLOPS_LC, "epochs_per_step": 2})
    seen = {}

    class LearningRates(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            seen[trainer.current_epoch] = (optimizer.param_groups[0]["lr"], len(optimizer.state))

    model = classifier(lr=0.1, lr_schedule="exponential", gamma=0.5)
    trainer = tiny_trainer(tmp_path, max_epochs=6, limit_train_batches=1, callbacks=[lc, LearningRates()])
    trainer.fit(model, *tiny_loaders())
    # x0.5 per epoch, back to 0.1 as L step 1 (epoch 2) and the fine-tuning (epoch 4) start.
    assert [seen[epoch][0] for epoch in range(6)] == pytest.approx([0.1, 0.05, 0.1, 0.05, 0.1, 0.05])
    # A fresh optimizer: no momentum carried into the new phase.
    assert seen[1][1] > 0 and seen[2][1] == 0 and seen[3][1] > 0 and seen[4][1] == 0
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("lam", [0.0, 0.05, 1.0, 100.0])
def test_choose_rank_on_the_spectrum_is_the_c_step(lam):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4)
    costs = FlopsCost(model, torch.zeros(1, *INPUT_SHAPE))
    for name in ("conv1", "layer2.0.conv1", "layer3.2.conv2", "fc"):
        weight = model.get_submodule(name).weight
        step = c_step_layer(weight, costs.layer_costs(name), mu=0.05, lam=lam)
        choice = choose_rank(squared_singular_values(weight), costs.layer_costs(name), mu=0.05, lam=lam)
        assert (choice.rank, choice.dense) == (step.rank, step.dense)
        assert choice.cost == pytest.approx(step.cost) and choice.error == pytest.approx(step.error, rel=1e-4)


def test_penalty_gradient_for_some_layers_only():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4)
    lc = LowRankLC(model, FlopsCost(model, torch.zeros(1, *INPUT_SHAPE)), lam=1.0, mu_init=0.1, mu_growth=2.0, steps=2)
    state = lc.init_state(model)  # Theta = 0: the gradient is mu W
    lc.add_penalty_gradient(model, state, layers=["fc"])
    torch.testing.assert_close(model.fc.weight.grad, 0.1 * model.fc.weight.detach())
    assert model.conv1.weight.grad is None
    with pytest.raises(ValueError, match=r"`layers` must be among the compressed layers .* got \['nothing'\]"):
        lc.add_penalty_gradient(model, state, layers=["nothing"])
