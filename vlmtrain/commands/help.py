"""`vlmtrain-train --help` and `vlmtrain-eval --help`: what vlmtrain is, the config groups a user picks
from with their options, and how to change any field. Read from the config files themselves, without
importing vlmtrain.configs (whose schemas import torch and every model library), so it answers at once."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import yaml

INTRO = "vlmtrain: contrastive vision-language pretraining (CLIP, SigLIP, Llip) on one trainer."
# One line per group a user selects; a group folder missing here is a test failure, not a silent gap.
GROUPS = {
    "preset": "a published model by name: towers, loss and training recipe",
    "experiment": "a whole run (model, data, schedule) by name",
    "model": "how the towers are combined (two-tower CLIP/SigLIP, or Llip)",
    "model/image_encoder": "the image tower",
    "model/text_encoder": "the text tower (hf: a local Hugging Face model at model.text_encoder.path)",
    "loss": "the contrastive loss",
    "data": "the training data (synthetic: the built-in shapes, written on first use)",
    "optim": "the optimizer",
    "schedule": "the learning-rate schedule",
    "cluster": "where it runs: here (local) or submitted to SLURM",
}
EXAMPLE = {"train": "data.batch_size=64 trainer.max_steps=1000", "eval": "batch_size=64"}
USAGE = {
    "train": "vlmtrain-train [GROUP=OPTION ...] [KEY=VALUE ...]\n"
    "       vlmtrain-train -m KEY=A,B ...      a sweep: one run per value (run_dir/0, run_dir/1, ...)",
    "eval": "vlmtrain-eval checkpoint=RUN_DIR_OR_CHECKPOINT_OR_EXPORT [KEY=VALUE ...]\n"
    "Evaluates a model on zero-shot classification, retrieval and relation sets (by default the run's own:\n"
    "data.zeroshot_dir, data.val_shards) and writes the results JSON beside it.",
}
WIDTH = 100


def config_dir() -> Path:
    """The installed configs folder, found without running its __init__."""
    spec = importlib.util.find_spec("vlmtrain.configs")
    return Path(next(iter(spec.submodule_search_locations)))


def chosen_defaults(config: Path) -> dict[str, str | None]:
    """Group -> default option, from a config's defaults list (schemas and `_self_` left out)."""
    entries = (yaml.safe_load(config.read_text()) or {}).get("defaults", [])
    found = {}
    for entry in entries:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not group.startswith(("override ", "hydra/", "/")):
                    found[group] = option
    return found


def group_lines(folders: list[Path], defaults: dict[str, str | None]) -> list[str]:
    """`GROUP  what it is: [default], other, ...` for each group, wrapped under its own column."""
    lines = []
    for group, default in defaults.items():
        options = sorted({path.stem for folder in folders for path in (folder / group).glob("*.yaml")})
        shown = ", ".join(f"[{name}]" if name == default else name for name in options)
        if default is None:
            shown += " (default: none)"
        text = f"{GROUPS.get(group, group)}: {shown}"
        lines += textwrap.wrap(
            text, WIDTH, initial_indent=f"  {group:<21}", subsequent_indent=" " * 23, break_on_hyphens=False
        )
    return lines


def app_help(app: str) -> str:
    """The help text of vlmtrain-train (`app="train"`) or vlmtrain-eval (`"eval"`)."""
    folder = config_dir()
    defaults = chosen_defaults(folder / f"{app}.yaml")
    text = [INTRO, "", f"usage: {USAGE[app]}", ""]
    if defaults:
        folders = [folder, Path("configs")]  # train.yaml searches ./configs too: a user's own options
        text += ["Config groups (GROUP=OPTION picks one; [default]):", *group_lines(folders, defaults), ""]
    text += [
        f"Any field: KEY=VALUE ({EXAMPLE[app]}); vlmtrain-{app} --cfg job prints the whole composed",
        "config; every field's type, default and meaning: vlmtrain/schema.py.",
    ]
    if defaults:
        text.append(
            "Your own options: ./configs/GROUP/NAME.yaml (experiment=NAME: ./configs/experiment/NAME.yaml)."
        )
    text.append("Hydra's own flags (--cfg, --resolve, --multirun, ...): --hydra-help.")
    return "\n".join(text)
