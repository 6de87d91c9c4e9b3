"""Every config composes and builds; malformed overrides fail early with one line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

import vlmtrain.configs
from vlmtrain.cli import build_run, quote_brace_patterns
from vlmtrain.config import ConfigError

CONFIG_DIR = Path(vlmtrain.configs.__file__).parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def data_overrides(root: Path) -> list[str]:
    return [
        "data.synthetic=null",
        f"data.train_shards={root / 'train'}",
        f"data.val_shards={root / 'val'}",
        f"data.zeroshot_dir={root / 'classification'}",
    ]


@pytest.mark.parametrize("choice", options("model/image_encoder"))
def test_every_image_encoder_builds(choice):
    cfg = compose_train([f"model/image_encoder={choice}"])
    encoder = instantiate(cfg.model.image_encoder)
    assert encoder.image_size > 0


@pytest.mark.parametrize("choice", [c for c in options("model/text_encoder") if c != "hf"])
def test_every_text_encoder_builds(choice):
    cfg = compose_train([f"model/text_encoder={choice}"])
    encoder = instantiate(cfg.model.text_encoder)
    assert encoder.tokenizer()(["a caption"]).shape[0] == 1


@pytest.mark.parametrize(
    "group", ["model", "loss", "data", "optim", "schedule", "trainer", "cluster", "experiment"]
)
def test_every_group_option_composes_and_builds(group, synthetic_root):
    for choice in options(group):
        cfg = compose_train([f"{group}={choice}", *data_overrides(synthetic_root)])
        if group == "data" and choice != "synthetic":
            continue  # needs the user's own shards; composition is the check
        run = build_run(cfg)
        assert run["trainer"].max_steps >= 1 and run["data"].batch_size >= 1


def test_default_config_uses_the_builtin_dataset():
    cfg = compose_train([])
    assert cfg.data.synthetic.train_samples > 0
    assert cfg.data.train_shards.endswith("/train")


def test_wrong_type_names_the_key(synthetic_root):
    for override, key in [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.embed_dim=abc", "model.embed_dim"),
        ("optim.lr=fast", "optim.lr"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.micro_batches=0", "trainer.micro_batches"),
        ("trainer.micro_batches=3", "trainer.micro_batches"),  # does not divide the batch of 128
    ]:
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            build_run(compose_train([override, *data_overrides(synthetic_root)]))


def test_missing_shard_directory_names_the_path(tmp_path):
    cfg = compose_train(["data=webdataset", f"data.train_shards={tmp_path / 'absent'}"])
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: no such shard .*absent"):
        build_run(cfg)


def test_unknown_key_fails_at_composition():
    with pytest.raises(Exception, match="trainer.max_stepz"):
        compose_train(["trainer.max_stepz=3"])


def test_brace_patterns_are_quoted_for_hydra():
    assert quote_brace_patterns(
        ["data.train_shards=/d/train-{000..009}.tar", "run_dir=${oc.env:HOME}/r", "a=1"]
    ) == [
        "data.train_shards='/d/train-{000..009}.tar'",
        "run_dir=${oc.env:HOME}/r",
        "a=1",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.max_stepz=3", "trainer.max_stepz"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("data.train_shards=/nonexistent/train-{000000..000009}.tar", "/nonexistent/train-000000.tar"),
        ("loss=nope", "loss/nope"),
    ],
)
def test_cli_reports_one_line_and_exits_before_training(override, needle, tmp_path):
    script = Path(sys.executable).parent / "vlmtrain-train"
    result = subprocess.run(
        [str(script), override, "data.synthetic=null", "data=webdataset", f"run_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_loss_llip_selects_the_llip_model_in_one_override(synthetic_root):
    run = build_run(compose_train(["loss=llip", *data_overrides(synthetic_root)]))
    assert type(run["model"]).__name__ == "LlipModel" and run["model"].head.num_tokens == 64
    assert run["model"].logit_bias is not None


def test_loss_the_model_cannot_feed_is_one_clear_line(synthetic_root):
    with pytest.raises(ConfigError, match="resnet18 cannot hold Llip mixture tokens"):
        build_run(
            compose_train(["loss=llip", "model/image_encoder=timm_resnet18", *data_overrides(synthetic_root)])
        )
    from vlmtrain.config import check_loss_fits_model
    from vlmtrain.losses.clip import ClipLoss

    llip = build_run(compose_train(["loss=llip", *data_overrides(synthetic_root)]))["model"]
    with pytest.raises(ConfigError, match="ClipLoss needs model outputs image_features"):
        check_loss_fits_model(ClipLoss(), llip)
