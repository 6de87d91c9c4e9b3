"""Every config composes and builds; experiments keep their names and survive tower swaps; a user's own
configs/ is searched; malformed overrides fail early with one line naming the key."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.runs import compose_train, data_overrides, options, run_cli
from vlmtrain import cli
from vlmtrain.build import check_loss_fits_model
from vlmtrain.cli import compose_checked, quote_brace_patterns
from vlmtrain.config_tree import typed_config
from vlmtrain.losses.clip import ClipLoss
from vlmtrain.models.llip_model import LlipModel
from vlmtrain.schema import ConfigError
from vlmtrain.train.trainer import Trainer


def build_trainer(overrides: list[str], run_dir: Path) -> Trainer:
    cfg = compose_checked("train", [*overrides, f"run_dir={run_dir}", "trainer.wandb=false"])
    trainer = Trainer.from_config(cfg)
    trainer.close()
    return trainer


def device_for(choice: str) -> torch.device:
    """The published towers (hundreds of millions of parameters) build on the meta device: no memory."""
    small = ("micro", "nano", "b32", "timm")
    return torch.device("cpu" if any(word in choice for word in small) else "meta")


@pytest.mark.parametrize("choice", options("model/image_encoder"))
def test_every_image_encoder_builds(choice):
    cfg = compose_train([f"model/image_encoder={choice}"])
    with device_for(choice):
        encoder = instantiate(cfg.model.image_encoder)
    assert encoder.image_size > 0


@pytest.mark.parametrize("choice", [c for c in options("model/text_encoder") if c != "hf"])
def test_every_text_encoder_builds(choice, tiny_bert):
    cfg = compose_train([f"model/text_encoder={choice}", f"++model.text_encoder.tokenizer_path={tiny_bert}"])
    if "siglip" not in choice:
        cfg.model.text_encoder.tokenizer_path = None
    with device_for(choice):
        encoder = instantiate(cfg.model.text_encoder)
    assert encoder.tokenizer()(["a caption"]).shape[0] == 1


@pytest.mark.parametrize("group", ["model", "loss", "data", "optim", "schedule", "cluster", "experiment"])
def test_every_group_option_composes_and_builds(group, synthetic_root, tmp_path):
    for choice in options(group):
        overrides = [f"{group}={choice}", *data_overrides(synthetic_root)]
        if (group, choice) == ("model", "llip"):
            overrides.append("loss=llip")  # the Llip model feeds only the Llip loss
        if group == "data" and choice != "synthetic":
            compose_checked("train", overrides)  # needs the user's own shards; composition is the check
            continue
        if (
            group == "cluster" and choice != "local"
        ):  # submits rather than trains: the typed config is the check
            assert (
                typed_config(compose_checked("train", [*overrides, "cluster.time_min=30"])).cluster.name
                == "slurm"
            )
            continue
        trainer = build_trainer(overrides, tmp_path / choice)
        assert trainer.config.trainer.max_steps >= 1 and trainer.config.data.batch_size >= 1


@pytest.mark.parametrize("experiment", options("experiment"))
def test_each_experiment_keeps_its_own_name(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.run_dir == f"runs/{experiment}"


@pytest.mark.parametrize("tower", ["model/image_encoder=timm_vit_tiny", "model/text_encoder=hf"])
@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_survive_a_tower_swap(experiment, tower, synthetic_root, tiny_bert, tmp_path):
    overrides = [f"experiment={experiment}", tower, f"model.text_encoder.path={tiny_bert}"]
    if tower.endswith("timm_vit_tiny"):
        overrides.pop()
    trainer = build_trainer([*overrides, *data_overrides(synthetic_root)], tmp_path)
    kind = "TimmEncoder" if "timm" in tower else "HFTextEncoder"
    assert kind in (type(trainer.model.image_encoder).__name__, type(trainer.model.text_encoder).__name__)


def test_default_config_uses_the_builtin_dataset():
    cfg = compose_train([])
    assert cfg.data.synthetic.train_samples > 0
    assert cfg.data.train_shards.endswith("/train")


def test_component_defaults_come_from_the_code():
    """Options that only select a component get their values from its signature (one source)."""
    cfg = compose_train([])
    assert cfg.optim.lr == 1e-3 and list(cfg.optim.betas) == [0.9, 0.98]
    assert cfg.schedule.warmup_steps == 50 and cfg.schedule.total_steps == cfg.trainer.max_steps
    assert cfg.loss.local_loss is True


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model.embed_dim=abc", "model.embed_dim"),
        ("optim.lr=fast", "optim.lr"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("model.image_encoder.vision_cfg_typo=1", "model.image_encoder.vision_cfg_typo"),
        ("schedule.warmup_steps=many", "schedule.warmup_steps"),
    ],
)
def test_a_wrong_key_or_type_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: ") as error:
        compose_checked("train", [override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.micro_batches=0", "trainer.micro_batches"),
        ("trainer.micro_batches=3", "trainer.micro_batches"),  # does not divide the batch of 128
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_a_bad_value_fails_before_training_naming_the_key(override, key, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        build_trainer([override, *data_overrides(synthetic_root)], tmp_path)


def test_an_added_key_a_constructor_does_not_take_fails_before_training(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"^model: .*unexpected keyword argument 'layers'"):
        build_trainer(["+model.text_encoder.layers=2", *data_overrides(synthetic_root)], tmp_path)


def test_missing_shard_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train_shards: no such shard .*absent"):
        build_trainer(["data=webdataset", f"data.train_shards={tmp_path / 'absent'}"], tmp_path)


def test_brace_patterns_are_quoted_for_hydra():
    assert quote_brace_patterns(
        ["data.train_shards=/d/train-{000..009}.tar", "run_dir=${oc.env:HOME}/r", "a=1"]
    ) == [
        "data.train_shards='/d/train-{000..009}.tar'",
        "run_dir=${oc.env:HOME}/r",
        "a=1",
    ]


def test_loss_llip_selects_the_llip_model_in_one_override(synthetic_root, tmp_path):
    cfg = compose_train(["loss=llip"])
    assert cfg.model._target_ == "vlmtrain.models.llip_model.LlipModel"
    model = build_trainer(["loss=llip", *data_overrides(synthetic_root)], tmp_path).model
    assert isinstance(model, LlipModel) and model.head.num_tokens == 64 and model.logit_bias is not None


def test_loss_the_model_cannot_feed_is_one_clear_line(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match="resnet18 cannot hold Llip mixture tokens"):
        build_trainer(
            ["loss=llip", "model/image_encoder=timm_resnet18", *data_overrides(synthetic_root)], tmp_path
        )
    with pytest.raises(ConfigError, match="ClipLoss needs model outputs image_features"):
        build_trainer(["loss=clip", "model=llip", *data_overrides(synthetic_root)], tmp_path)
    llip = instantiate(compose_train(["loss=llip"]).model)
    with pytest.raises(ConfigError, match="ClipLoss needs model outputs"):
        check_loss_fits_model(ClipLoss(), llip)


def test_a_users_configs_folder_is_searched(tmp_path, monkeypatch):
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nname: mine\ntrainer:\n  max_steps: 7\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = compose_train(["experiment=mine"])
    assert (cfg.name, cfg.trainer.max_steps) == ("mine", 7)


@pytest.mark.slow
def test_the_cli_picks_up_a_users_experiment(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: siglip\nname: mine\n"
    )
    monkeypatch.chdir(tmp_path)
    result = run_cli(cli.train, ["experiment=mine", "--cfg", "job"], capsys)  # the entry point, in-process
    assert result.returncode == 0, result.stderr
    assert "name: mine" in result.stdout and "SigLipLoss" in result.stdout


@pytest.mark.slow
def test_a_multirun_over_every_experiment_composes(tmp_path):
    """Hydra's own sweeper and launcher expand experiment=glob(*); the app records each job's config."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            """
            import sys
            import hydra
            import vlmtrain.cli  # noqa: F401  the same search path and warnings as vlmtrain-train
            from vlmtrain.config_tree import typed_config

            @hydra.main(config_path="pkg://vlmtrain.configs", config_name="train", version_base="1.3")
            def job(cfg):
                config = typed_config(cfg)
                print("composed", config.name, type(config.trainer).__name__, flush=True)

            job()
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(app), "-m", "experiment=glob(*)", f"run_dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    composed = sorted(line.split()[1] for line in result.stdout.splitlines() if line.startswith("composed"))
    assert composed == options("experiment") and len(composed) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.max_stepz=3", "trainer.max_stepz"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("data.train_shards=/nonexistent/train-{000000..000009}.tar", "/nonexistent/train-000000.tar"),
        ("loss=nope", "loss=nope: no such option; loss has clip, llip, siglip"),
        ("model.image_encoder.vision_cfg_typo=1", "model.image_encoder.vision_cfg_typo"),
    ],
)
def test_cli_reports_one_line_and_exits_before_training(override, needle, tmp_path, capsys):
    argv = [override, "data.synthetic=null", "data=webdataset", f"run_dir={tmp_path / 'run'}"]
    result = run_cli(cli.train, argv, capsys)  # the entry point, in this process
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
