"""Compile the bytecode of what vlmtrain imports, by importing it once: every vlmtrain module, and the
libraries its code imports where they are used (installed extras included). scripts/setup.sh runs this
with bytecode writing on, in place of compiling the whole environment (a quarter of its files, in under
half the time): where PYTHONDONTWRITEBYTECODE is set, nothing compiled on import is kept, and every
process would compile torch again.

Two processes share the work, one per core: vlmtrain with its tower and launch libraries here, the
evaluation and reporting libraries beside it. What both import is compiled by whichever comes first
(each .pyc is written atomically)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import warnings

import vlmtrain

# imported inside the functions that use them (the optional ones only where installed)
WITH_VLMTRAIN = ["open_clip", "timm", "submitit", "safetensors.torch", "torch.distributed.run"]
BESIDE = [
    "transformers",
    "wandb",
    "matplotlib.backends.backend_agg",
    "sklearn.datasets",
    "clip_benchmark.cli",
    "unibench",
]


def import_each(names: list[str]) -> None:
    warnings.simplefilter("ignore")  # the libraries' own import-time warnings are not this script's
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # an extra not installed; any other error is for its own import to report
            pass


def main() -> None:
    if sys.argv[1:] == ["beside"]:
        import_each(BESIDE)
        return
    beside = subprocess.Popen([sys.executable, __file__, "beside"])
    modules = [info.name for info in pkgutil.walk_packages(vlmtrain.__path__, "vlmtrain.")]
    import_each([*modules, *WITH_VLMTRAIN])
    sys.exit(beside.wait())


if __name__ == "__main__":
    main()
