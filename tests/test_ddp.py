"""PruningCallback under 2-process CPU DDP (gloo): a pruning step mid-fit (and one-shot in `setup`)
finishes, both ranks end with the same architecture and weights, the rebuilt optimizer steps the
pruned parameters, and the checkpoint reloads in another process without the callback.

The fit runs as a script in a subprocess: Lightning's DDP launcher re-executes the script once
per extra rank, which needs a real script file (not `python -c`) and keeps pytest unforked.
"""

import hashlib
import textwrap

import pytest
import torch
from helpers import INPUT_SHAPE, TESTS_DIR, conv_widths, run_ddp_script
from torch import nn

from compresslight.classifier import ImageClassifier

# Each rank writes `rank{N}.json` after fit: conv widths, a hash of its parameters right after the
# prune and after fit, and whether its optimizer holds exactly the module's parameters.
DDP_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests_dir!r})
    import torch
    from torch import nn
    from helpers import classifier, tiny_loaders
    from test_ddp import parameter_hash
    from compresslight.callbacks.pruning import PruningCallback

    out_dir = Path(sys.argv[1])
    prune_epoch = int(sys.argv[2])
    pl = importlib.import_module(sys.argv[3])  # the user's Lightning namespace
    Callback, ModelCheckpoint = pl.callbacks.Callback, pl.callbacks.ModelCheckpoint

    class Watcher(Callback):
        # After the PruningCallback in the list: sees the module right after the edit.
        hash_after_prune = None
        ddp_wraps_module = None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == prune_epoch:
                self.hash_after_prune = parameter_hash(pl_module)

        def on_train_epoch_end(self, trainer, pl_module):
            # Lightning unwraps the model at teardown: look while training.
            wrapped = trainer.strategy.model
            is_ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
            self.ddp_wraps_module = is_ddp and wrapped.module is pl_module

    pl.seed_everything(0)
    watcher = Watcher()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
        callbacks=[
            PruningCallback(amount=0.25, epochs=[prune_epoch]),
            watcher,
            ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True),
        ],
    )
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    optimizer_params = {{id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}}
    report = dict(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        widths={{name: m.out_channels for name, m in model.model.named_modules() if isinstance(m, nn.Conv2d)}},
        hash_after_prune=watcher.hash_after_prune,
        hash_after_fit=parameter_hash(model),
        optimizer_holds_module_params=optimizer_params == {{id(p) for p in model.parameters()}},
        ddp_wraps_module=watcher.ddp_wraps_module,
        records=len(model.compression_records),
    )
    (out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(report))
    """
)


def parameter_hash(module: nn.Module) -> str:
    """Names and exact values of every parameter."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("prune_epoch", [1, 0], ids=["mid_fit", "one_shot"])
def test_ddp_pruning_ranks_agree_optimizer_steps_and_checkpoint_reloads(tmp_path, prune_epoch, lightning_namespace):
    script = DDP_SCRIPT.format(tests_dir=str(TESTS_DIR))
    reports = run_ddp_script(tmp_path, script, str(prune_epoch), lightning_namespace, timeout=240)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    # The edit happened, identically, on both ranks.
    assert reports[0]["widths"] == reports[1]["widths"]
    assert reports[0]["widths"]["layer1.0.conv1"] == 12  # 16 - 25%
    assert reports[0]["widths"]["layer3.2.conv1"] == 48  # 64 - 25%
    assert all(r["records"] == 1 for r in reports)
    # DDP was re-wrapped around the pruned module and the optimizer rebuilt over its parameters.
    assert all(r["ddp_wraps_module"] and r["optimizer_holds_module_params"] for r in reports)
    # Same weights on both ranks right after the edit and after fit (gradients were all-reduced
    # through the new wrapper), and training moved them after the edit.
    assert reports[0]["hash_after_prune"] == reports[1]["hash_after_prune"]
    assert reports[0]["hash_after_fit"] == reports[1]["hash_after_fit"]
    assert all(r["hash_after_fit"] != r["hash_after_prune"] for r in reports)

    # The checkpoint saved by rank 0 reloads here, without the callback, as the trained pruned model.
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    assert conv_widths(loaded.model) == reports[0]["widths"]
    assert parameter_hash(loaded) == reports[0]["hash_after_fit"]
    assert len(loaded.compression_records) == 1
    assert loaded.eval()(torch.randn(2, *INPUT_SHAPE)).shape == (2, 4)
