"""Malformed configs through the real `vlmtrain-train` entry point (in process): each exits 2 with one
line on stderr naming the key, and nothing is written to disk: no run directory, no Hydra output."""

import sys

import pytest
import torch

from tests.helpers.runs import SMALL_MODEL, data_overrides, restored_logging
from vlmtrain import cli

CUDA = torch.cuda.is_available()
MALFORMED = [  # (override, the key the error names)
    ("data.batch_size=-1", "data.batch_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=4096", "data.batch_size"),  # more than the 3000 samples in the shards
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("data.train_shards=''", "data.train_shards"),
    ("data.train_shards=/nonexistent/train", "data.train_shards"),
    ("data.val_shards=/nonexistent/val-{0..3}.tar", "data.val_shards"),
    ("data.zeroshot_dir=/nonexistent", "data.zeroshot_dir"),
    ("data.random_crop_scale=[0.5]", "data.random_crop_scale"),
    ("data.random_crop_scale=[0.9,0.1]", "data.random_crop_scale"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.grad_clip=0", "trainer.grad_clip"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.checkpoint_every=-5", "trainer.checkpoint_every"),
    ("trainer.eval_every=0", "trainer.eval_every"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps"),
    ("trainer.gc_every=-1", "trainer.gc_every"),
    ("trainer.micro_batches=3", "trainer.micro_batches"),  # does not divide the batch of 8
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.parallel=zero3", "trainer.parallel"),
    ("trainer.async_checkpoint=true", "trainer.async_checkpoint"),  # under ddp: rank 0 writes one file
    ("trainer.device=tpu", "trainer.device"),
    pytest.param("trainer.device=cuda", "trainer.device", marks=pytest.mark.skipif(CUDA, reason="has a GPU")),
    ("trainer.device=cuda:7", "trainer.device"),
    ("trainer.wandb=true & trainer.wandb_project=' '", "trainer.wandb_project"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps"),
    ("seed=abc", "seed"),
    ("run_dir=FILE", "run_dir"),  # an existing file
    ("data.synthetic.train_samples=0", "data.synthetic.train_samples"),
    ("model.embed_dim=abc", "model.embed_dim"),
    ("trainer.max_stepz=3", "trainer.max_stepz"),
]


@pytest.mark.parametrize("override,key", MALFORMED)
def test_a_malformed_config_is_one_line_naming_the_key_and_writes_nothing(
    override, key, synthetic_root, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "file").write_text("not a directory")
    overrides = override.replace("run_dir=FILE", f"run_dir={tmp_path / 'file'}").split(" & ")
    synthetic = (
        ["data.synthetic.root=/nonexistent"] if key.startswith("data.synthetic") else ["data.synthetic=null"]
    )
    argv = [*data_overrides(synthetic_root)[1:], *SMALL_MODEL, *synthetic, "data.batch_size=8"]
    argv += ["data.num_workers=0", f"run_dir={work / 'run'}", *overrides]
    monkeypatch.setattr(sys, "argv", ["vlmtrain-train", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_, restored_logging():
        cli.train()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {key}"), lines[0]
    assert list(work.iterdir()) == []  # no run directory, no Hydra output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "work"]
