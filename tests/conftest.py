import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test process (and the processes it starts): the workers share the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist 3.8 hands out the units of `--dist loadgroup` by their number of tests unless told not
    to, which would undo the order set below (the SLURM tests, 19 of them, started after files of 40)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (scripts/test.sh: `-n auto --dist loadgroup`) a worker takes a whole file, so
    that a module's fixtures are built once; the SLURM tests share one cluster and go to one worker
    together. The longest units start first: the SLURM tests, then files with slow tests."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    kind: dict[str, int] = {}
    for item in items:
        slurm = item.get_closest_marker("slurm") is not None
        group = "slurm" if slurm else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        rank = 0 if slurm else 1 if item.get_closest_marker("slow") else 2
        kind[group] = min(kind.get(group, 2), rank)
    items.sort(key=lambda item: kind[item.get_closest_marker("xdist_group").args[0]])


def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist groups by a suffix it appends to each test's id; where it does not show (a pytest
    that names tests by another field), the groups would silently split: the SLURM tests would start
    their cluster in several workers at once."""
    if session.config.getoption("loadgroup", False) and session.items:
        if not any("@" in item.nodeid for item in session.items):
            raise pytest.UsageError(
                f"pytest-xdist's --dist loadgroup does not group tests under pytest {pytest.__version__}: "
                "install the dev extra's pytest"
            )


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset shared by the tests that train or evaluate."""
    from vlmtrain.datasets.synthetic import write_synthetic

    return write_synthetic(
        tmp_path_factory.mktemp("data") / "synthetic", train_samples=3000, val_samples=300, seed=1
    )


@pytest.fixture
def tiny_bert(tmp_path) -> Path:
    """A one-layer BERT with its tokenizer, saved as a local Hugging Face folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "blue",
        "circle",
        "square",
        "at",
        "the",
        "top",
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder
