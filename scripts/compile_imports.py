"""Compile the bytecode of what vlmtrain imports, by importing it once: every vlmtrain module, and the
libraries its code imports where they are used (installed extras included). scripts/setup.sh runs this
with bytecode writing on, in place of compiling the whole environment (a quarter of its files, in under
half the time): where PYTHONDONTWRITEBYTECODE is set, nothing compiled on import is kept, and every
process would compile torch again."""

from __future__ import annotations

import importlib
import pkgutil
import warnings

import vlmtrain

# imported inside the functions that use them (the optional ones only where installed)
LIBRARIES = [
    "open_clip",
    "timm",
    "transformers",
    "wandb",
    "submitit",
    "safetensors.torch",
    "matplotlib.backends.backend_agg",
    "torch.distributed.run",
    "sklearn.datasets",
    "clip_benchmark.cli",
    "unibench",
]


def main() -> None:
    modules = [info.name for info in pkgutil.walk_packages(vlmtrain.__path__, "vlmtrain.")]
    warnings.simplefilter("ignore")  # the libraries' own import-time warnings are not this script's
    for name in [*modules, *LIBRARIES]:
        try:
            importlib.import_module(name)
        except Exception:  # an extra not installed; any other error is for its own import to report
            pass


if __name__ == "__main__":
    main()
