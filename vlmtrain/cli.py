"""Entry points, each a thin shell over the layers below: vlmtrain-train and vlmtrain-eval (Hydra apps),
vlmtrain-export and vlmtrain-data (dataset tools), vlmtrain-torchrun (torchrun, exiting with its workers'
code); vlmtrain-runs and vlmtrain-plot are in vlmtrain.commands. Every problem a user can fix is one line
on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmtrain.checkpoint import FORMATS
from vlmtrain.checkpoint.errors import CheckpointWriteError, UnsafeCheckpoint
from vlmtrain.commands import fail as _fail
from vlmtrain.distributed.stop import RunStopped, catch_early
from vlmtrain.extras import MissingExtra
from vlmtrain.report.runs import as_typed
from vlmtrain.schema import ConfigError, check_set_names, one_line
from vlmtrain.train.run_lock import LOCK_FILE, RunInUse, RunLock

if TYPE_CHECKING:
    from vlmtrain.cluster.slurm import Pending

# torch, open_clip and the rest are imported by the functions that use them: --help answers at once.
CONFIGS = "vlmtrain.configs"
EXIT_FAILED, EXIT_CONFIG, EXIT_DATA = 1, 2, 3  # the run went wrong; its config or input; its data mid-run
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, MissingExtra, UnsafeCheckpoint, RunInUse)
# train.yaml searches ./configs for a user's own configs; most working directories have none.
warnings.filterwarnings("ignore", message=r"provider=hydra.searchpath in main, path=configs is not available")


_to_submit: list[Pending] = []  # cluster=slurm: runs (a sweep's points) prepared, submitted together


@hydra.main(config_path=f"pkg://{CONFIGS}", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> dict[str, float] | None:
    hydra_config = HydraConfig.get()  # its output dir is run_dir itself, or run_dir/<job number> in a sweep
    run_dir = Path(hydra_config.runtime.output_dir)
    if cfg.cluster.name == "slurm":  # submitting: the Trainer is the job's to import
        _prepare(cfg, hydra_config.runtime.output_dir, list(hydra_config.overrides.task))
        return None
    from vlmtrain.data.accounting import DataError
    from vlmtrain.data.loader import DataWorkerKilled
    from vlmtrain.train.step import NonFiniteError
    from vlmtrain.train.trainer import Trainer

    try:
        with Trainer.from_config(cfg, run_dir) as trainer:
            return trainer.train()
    except RunInUse as error:  # the folder is another run's: leave it as it is
        _fail(error)
    except USER_ERRORS as error:
        RunLock.release_all()
        remove_if_unused(run_dir)
        _fail(error)
    except DataError as error:  # the data could not feed the run: fix the shards, then resume
        _fail(error, EXIT_DATA)
    except (NonFiniteError, CheckpointWriteError, DataWorkerKilled) as error:  # the run, not its config
        _fail(error, EXIT_FAILED)
    except RunStopped as stopped:
        print(f"{stopped}: run the same command to resume", file=sys.stderr)
        sys.exit(stopped.exit_code)


def _prepare(cfg: DictConfig, run_dir: str, overrides: list[str]) -> None:
    """cluster=slurm: check the cluster config (once per sweep: its points share it) and pin the run."""
    from vlmtrain.cluster.slurm import check_cluster, prepare
    from vlmtrain.config_tree import typed_config

    try:
        config = typed_config(cfg)
        if not _to_submit:
            check_cluster(config.cluster)
        _to_submit.append(prepare(config, run_dir, overrides))
    except USER_ERRORS as error:
        RunLock.release_all()
        remove_if_unused(Path(run_dir))
        _fail(error)


def train() -> None:
    """vlmtrain-train [overrides]: compose configs/train.yaml with the overrides and train here, or with
    cluster=slurm submit the run (`-m`: every point of the sweep, as one job array) and return."""
    if _slurm_task(sys.argv[1:]):
        catch_early()  # before anything slow, as a submitted job's tasks do (vlmtrain.cluster.job)
    if _help_asked("train"):
        return
    _import_only_what_is_named()
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    precheck_overrides("train", sys.argv[1:])
    if any(arg.startswith("cluster=") and arg != "cluster=local" for arg in sys.argv[1:]):
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").addFilter(_submitted_not_local)
    try:
        _train()
        if _to_submit:
            _submit(_to_submit)
    finally:
        _to_submit.clear()
        RunLock.release_all()


def _slurm_task(argv: list[str]) -> bool:
    """A task of a SLURM job step training here (`srun vlmtrain-train ...` in a job script such as
    launch/sbatch_example.sh): SLURM may send it USR2 (a time limit's warning, a preemption) or SIGTERM
    while Python still starts, whose default action would end the job unsaved and not requeued."""
    submits = any(arg.startswith("cluster=") and arg != "cluster=local" for arg in argv)
    return "SLURM_STEP_ID" in os.environ and "WORLD_SIZE" not in os.environ and not submits


class LockRunFolder(Callback):
    """Hydra calls this (train.yaml's hydra.callbacks) before it writes in the run folder (its .hydra/
    files, its log): the launching process (rank 0) takes the folder's lock, or the launch ends in one
    line touching nothing. A sweep's points are locked by their Trainer (after Hydra's own files)."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        from vlmtrain.distributed.env import launch_rank

        if launch_rank(os.environ) != 0:
            return
        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir")
        except OmegaConfBaseException:  # it names Hydra's runtime values: the Trainer locks it
            return
        try:
            RunLock.take(run_dir)
        except RunInUse as error:
            _fail(error)


def _submitted_not_local(record: logging.LogRecord) -> bool:
    """Hydra's launcher says a sweep's points run here ("Launching 4 jobs locally"); on a cluster they
    are only prepared here, then submitted as one job array."""
    message = record.getMessage()
    if message.endswith(" jobs locally"):
        count = message.split()[1]
        record.msg, record.args = f"Preparing {count} runs, submitted as one SLURM job array", ()
    return True


def _submit(runs: list[Pending]) -> None:
    from vlmtrain.cluster.slurm import submit

    sweep = len(runs) > 1 or "-m" in sys.argv or "--multirun" in sys.argv
    base = runs[0].run_dir.parent if sweep else runs[0].run_dir
    log_folder = Path(runs[0].cluster.log_folder or base / "slurm").expanduser().resolve()
    try:
        job_ids = submit(runs, log_folder)
    except USER_ERRORS as error:
        _fail(error)
    for run, job_id in zip(runs, job_ids):
        overrides = " ".join(f"{key}={as_typed(value)}" for key, _, value in map(_split, run.overrides))
        print(f"submitted job {job_id}: {run.run_dir}  {overrides}".rstrip())
    print(f"logs: {log_folder}")


def _split(override: str) -> tuple[str, str, str]:
    return override.partition("=")


def _help_asked(app: str) -> bool:
    """--help (-h) is vlmtrain's own, in its terms and without composing a config; Hydra's: --hydra-help."""
    if not {"--help", "-h"} & set(sys.argv[1:]):
        return False
    from vlmtrain.commands.help import app_help

    print(app_help(app))
    return True


def _import_only_what_is_named() -> None:
    """The command owns this process: the model libraries are imported as its config names them."""
    from vlmtrain.models.libraries import import_only_what_is_named

    import_only_what_is_named()


def remove_if_unused(run_dir: Path) -> None:
    """A run that failed before its first step leaves no directory: only Hydra's own files are there
    (and a lock this process has let go of)."""
    ours = {".hydra", LOCK_FILE}
    if run_dir.is_dir() and all(p.name in ours or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def precheck_overrides(config_name: str, argv: list[str]) -> None:
    """Compose and check every value once before Hydra creates the output directory, so that a bad
    override or value is one line and leaves nothing on disk (single runs only)."""
    if any(arg.startswith("-") for arg in argv):  # --help, --cfg, --multirun: Hydra's own business
        return
    try:
        cfg = compose_checked(config_name, [arg for arg in argv if not arg.startswith(("hydra.", "hydra/"))])
        if config_name == "train":
            from vlmtrain.config_tree import typed_config

            typed_config(cfg)
    except ConfigError as error:
        _fail(error)


def compose_checked(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `config_name` with `overrides`; any composition error is a one-line ConfigError."""
    try:
        with initialize_config_module(CONFIGS, version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except Exception as error:
        cause = f"\n{error.__cause__}" if error.__cause__ else ""
        raise ConfigError(one_line(f"{error}{cause}")) from None


def quote_brace_patterns(argv: list[str]) -> list[str]:
    """Shard patterns like a/{000..009}.tar are not valid Hydra override syntax unquoted; quote them."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and "{" in value and "${" not in value and value[:1] not in "'\"[":
            arg = f"{key}={value!r}" if "'" not in value else f'{key}="{value}"'
        quoted.append(arg)
    return quoted


@hydra.main(config_path=f"pkg://{CONFIGS}", config_name="eval", version_base="1.3")
def _evaluate(cfg: DictConfig) -> dict[str, float]:
    try:
        return run_eval(cfg)
    except (*USER_ERRORS, ValueError) as error:
        _fail(error)


def run_eval(cfg: DictConfig) -> dict[str, float]:
    """vlmtrain-eval's work on a composed eval config: evaluate, write the results JSON (and per-sample
    JSONL, and UniBench's feather files), print the report."""
    from vlmtrain.checkpoint.load import open_pretrained
    from vlmtrain.distributed.env import init_distributed
    from vlmtrain.eval.suite import benchmark_records, format_report, run_evals

    for key in ("zeroshot", "retrieval", "relation"):
        check_set_names(dict(cfg[key]), key)
    if cfg.unibench.enabled:  # a missing extra or unknown benchmark before any evaluation
        from vlmtrain.eval.unibench import check_unibench

        check_unibench(list(cfg.unibench.benchmarks))
    loaded = open_pretrained(cfg.checkpoint)  # a checkpoint file, a run directory or an export folder
    if loaded.left_out:  # a saved config's command or URL runs only if the user names it again
        print(
            f"note: left out the run's {', '.join(loaded.left_out)} (a command or URL in a saved config "
            "is not run; name it on the command line to use it)",
            file=sys.stderr,
        )
    env = init_distributed(cfg.device)  # under torchrun every rank evaluates its share; rank 0 reports
    device = env.device
    zeroshot, retrieval, relation = _eval_sets(cfg, loaded.data_config)
    samples: dict[str, list[dict]] | None = {} if cfg.per_sample else None
    results = run_evals(
        loaded.model.to(device),
        loaded.tokenizer,
        loaded.transform,
        zeroshot,
        retrieval,
        batch_size=cfg.batch_size,
        llip_temperatures=cfg.llip_temperatures,
        relation=relation,
        samples=samples,
    )
    if not env.is_main:
        return results
    path = loaded.source
    records = benchmark_records(results, str(path), zeroshot | retrieval | relation)
    out = Path(cfg.out) if cfg.out else _default_out(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = f"{path}\n{format_report(results)}"
    if samples is not None:
        report += f"\nper-sample results in {write_samples(samples, out)}"
    if cfg.unibench.enabled:
        from vlmtrain.eval.unibench import unibench_report

        found, table = unibench_report(loaded, cfg, zeroshot | relation, out, str(device))
        results |= found
        report += f"\nUniBench:\n{table}"
    out.write_text(json.dumps({"checkpoint": str(path), "metrics": results, "results": records}, indent=1))
    print(f"{report}\nwritten to {out}")
    return results


def _eval_sets(cfg: DictConfig, run_data: dict) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Zero-shot, retrieval and relation sets (prefix -> location): those given, else the run's own."""
    from vlmtrain.eval.suite import eval_sets

    zeroshot = eval_sets(
        cfg.zeroshot_dir or run_data.get("zeroshot_dir"), _named(cfg.zeroshot, run_data, "zeroshot")
    )
    retrieval = eval_sets(
        cfg.val_shards or run_data.get("val_shards"),
        _named(cfg.retrieval, run_data, "retrieval"),
        "retrieval",
    )
    relation = eval_sets(None, dict(cfg.relation), "relation")
    if not (zeroshot or retrieval or relation or cfg.unibench.enabled and cfg.unibench.benchmarks):
        raise ConfigError(
            "zeroshot_dir / val_shards / relation: nothing to evaluate on (an export names no datasets)"
        )
    return zeroshot, retrieval, relation


def _default_out(path: Path) -> Path:
    """<export>-eval.json beside an export folder; <run_dir>/eval/<checkpoint>.json for a checkpoint (a
    file, or a sharded checkpoint's step folder)."""
    from vlmtrain.checkpoint.kinds import METADATA

    if path.is_dir() and not (path / METADATA).is_file():
        return path.parent / f"{path.name}-eval.json"
    return path.parent.parent / "eval" / f"{path.stem}.json"


def write_samples(samples: dict[str, list[dict]], out: Path) -> Path:
    """One JSONL per set (`zeroshot/pets` -> zeroshot-pets.jsonl) in <out stem>-samples/."""
    folder = out.parent / f"{out.stem}-samples"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, records in samples.items():
        lines = "".join(json.dumps(record) + "\n" for record in records)
        (folder / f"{prefix.replace('/', '-')}.jsonl").write_text(lines)
    return folder


def _named(given: DictConfig, run_data: dict, key: str) -> dict[str, str]:
    """Named eval sets: those given to vlmtrain-eval, else the run's own."""
    return dict(given) if given else dict(run_data.get(key) or {})


def evaluate() -> None:
    """vlmtrain-eval checkpoint=RUN_DIR_OR_CHECKPOINT_OR_EXPORT [zeroshot_dir=...] [val_shards=...]"""
    if _help_asked("eval"):
        return
    _import_only_what_is_named()
    sys.argv[1:] = quote_brace_patterns(sys.argv[1:])
    precheck_overrides("eval", sys.argv[1:])
    _evaluate()


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtrain-export",
        description="Export a trained model to a folder open_clip (and CLIP_benchmark) or vlmtrain loads.",
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run directory, checkpoint or export")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="open_clip: open_clip's local-dir folder; vlmtrain: any model; auto: open_clip when possible",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def export(argv: list[str] | None = None) -> None:
    """vlmtrain-export RUN_DIR_OR_CHECKPOINT --out DIR [--format auto|open_clip|vlmtrain]"""
    args = _export_parser().parse_args(argv)
    _import_only_what_is_named()
    from vlmtrain.checkpoint.export import NotExpressible
    from vlmtrain.checkpoint.export import export as export_model

    try:
        result = export_model(args.source, args.out, args.format, args.overwrite)
    except NotExpressible as error:
        _fail(f"open_clip format cannot express {error}; use --format vlmtrain")
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        _fail(error)
    if result.note:
        print(f"note: {result.note}")
    print(f"wrote {result.format} format to {result.path}")
    if result.format == "open_clip":
        print(f"  open_clip: open_clip.create_model_and_transforms('local-dir:{result.path}')")
    print(f"  vlmtrain:  vlmtrain.load_pretrained('{result.path}')")


def data(argv: list[str] | None = None) -> None:
    """vlmtrain-data synthetic|shards|classification|digits ... (--help for each)"""
    parser = argparse.ArgumentParser(prog="vlmtrain-data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write the built-in coloured-shapes dataset as shards")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--train-samples", type=int, default=20000)
    synthetic.add_argument("--val-samples", type=int, default=1000)
    synthetic.add_argument("--seed", type=int, default=0)
    shards = commands.add_parser("shards", help="captioned images -> training shards (img2dataset layout)")
    shards.add_argument("--images", required=True, help="folder of .jpg/.png/.webp, searched recursively")
    shards.add_argument("--captions", help="CSV/TSV of path + caption rows (default: IMAGE.txt files)")
    shards.add_argument("--image-column", default="path")
    shards.add_argument("--caption-column", default="caption")
    classes = commands.add_parser("classification", help="class folders (DIR/<class>/*.jpg) -> zero-shot set")
    classes.add_argument("--images", required=True)
    classes.add_argument("--templates", help="prompts with {c}, one per line (default: photo prompts)")
    digits = commands.add_parser("digits", help="scikit-learn's handwritten digits -> train/val/zero-shot")
    digits.add_argument("--copies", type=int, default=8, help="augmented copies of each training scan")
    digits.add_argument("--size", type=int, default=32, help="image side in pixels")
    digits.add_argument("--seed", type=int, default=0)
    for command in (shards, classes, digits):
        command.add_argument("--out", required=True)
        command.add_argument("--samples-per-shard", type=int, default=1000)
        command.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        from vlmtrain.datasets.synthetic import write_synthetic

        root = write_synthetic(args.out, args.train_samples, args.val_samples, args.seed)
        print(
            f"wrote {args.train_samples} train, {args.val_samples} val and {args.val_samples} classification samples to {root}"
        )
        return
    from vlmtrain.datasets import convert
    from vlmtrain.datasets.digits import write_digits

    common = {"samples_per_shard": args.samples_per_shard, "overwrite": args.overwrite}
    try:
        if args.command == "shards":
            columns = {"image_column": args.image_column, "caption_column": args.caption_column}
            report = convert.write_caption_shards(args.images, args.out, args.captions, **columns, **common)
            print(report.summary())
        elif args.command == "classification":
            print(convert.write_classification_set(args.images, args.out, args.templates, **common).summary())
        else:
            n = write_digits(args.out, copies=args.copies, size=args.size, seed=args.seed, **common)
            print(f"wrote {n['train']} train samples and {n['held_out']} held-out digits to {args.out}")
    except (*USER_ERRORS, ValueError) as error:
        _fail(error)


def torchrun(argv: list[str] | None = None) -> None:
    """vlmtrain-torchrun [torchrun's arguments]: torchrun, ending with its workers' exit code.

    torchrun itself exits 1 whenever its workers did not all end with 0: its agent lets the exception
    that reports them (or the signal it received itself) end the process. This runs the same launcher
    in this process and exits as a shell would for the workers instead: 128 + N after a stop by signal
    N (143 for SIGTERM, once every worker has saved and exited), 2 for a config error."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(sys.argv[1:] if argv is None else argv)
    except SignalException as stopped:  # the agent has already waited for its workers to stop
        sys.exit(128 + stopped.sigval)
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        sys.exit(128 - code if code < 0 else code)  # a worker ended by a signal has a negative code


if __name__ == "__main__":
    train()
