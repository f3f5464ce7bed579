"""The Trainer helpers every callback shares (`callbacks/_trainer.py`), on a real one-process Trainer.

Their DDP side (rank 0 computes, the others receive its result or its failure) runs in the
slow DDP tests of the callbacks that use them (`test_lc_callback`, `test_ddp`)."""

import json

import pytest
from compresslight.callbacks._trainer import (
    append_jsonl,
    resolve_log_dir,
    run_on_rank_zero,
    target_module,
    target_path,
)
from compresslight.callbacks.structural_edit import AfterCompressionListener, CompressionListener
from helpers import classifier, tiny_trainer
from pytorch_lightning.loggers import CSVLogger
from torch import nn


def test_run_on_rank_zero_in_one_process_is_the_computation(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert run_on_rank_zero(trainer, lambda: {"ranks": [1, 2]}, "a test") == {"ranks": [1, 2]}

    def fails():
        raise KeyError("no such layer")

    # One process: the computation's own error, unchanged (no broadcast to wrap it for).
    with pytest.raises(KeyError, match=r"no such layer"):
        run_on_rank_zero(trainer, fails, "a test")


def test_log_dir_is_the_first_loggers_else_the_root_dir(tmp_path):
    assert resolve_log_dir(tiny_trainer(tmp_path)) == tmp_path
    logger = CSVLogger(tmp_path / "logs", name="run", version=3)
    assert resolve_log_dir(tiny_trainer(tmp_path, logger=logger)) == tmp_path / "logs" / "run" / "version_3"


def test_append_jsonl_creates_the_folder_and_appends_lines(tmp_path):
    path = tmp_path / "new" / "log.jsonl"
    append_jsonl(path, {"event": "c_step", "step": 0})
    append_jsonl(path, {"event": "factorize"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"event": "c_step", "step": 0},
        {"event": "factorize"},
    ]


def test_target_module_defaults_to_model_and_names_the_children_when_wrong():
    module = classifier()
    assert target_path(module, None) == "model" and target_module(module, None) is module.model
    assert target_module(module, "model.fc") is module.model.fc
    with pytest.raises(ValueError, match=r"`module_path` must name a submodule of ImageClassifier .*got 'head'"):
        target_module(module, "head")


def test_listeners_are_recognised_by_their_methods():
    class Before:
        def before_compression(self, trainer, pl_module): ...

    class After:
        def on_compression(self, trainer, pl_module): ...

    assert isinstance(Before(), CompressionListener) and not isinstance(Before(), AfterCompressionListener)
    assert isinstance(After(), AfterCompressionListener) and not isinstance(After(), CompressionListener)
    assert not isinstance(nn.Linear(1, 1), AfterCompressionListener)
