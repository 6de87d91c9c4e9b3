"""Optional dependencies: import one where it is used, or fail with one line naming the extra to install.

The extras are those of the package metadata: `hf` (transformers, for `model/text_encoder=hf`) and
`examples` (scikit-learn, for `vlmtrain-data digits`).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that provides it."""

    def __init__(self, what: str, package: str, extra: str, module: str | None = None) -> None:
        super().__init__(
            f"{what}: needs {package}; install it with: pip install 'vlmtrain[{extra}]'", name=module
        )
        self.what, self.package, self.extra = what, package, extra


def require(module: str, extra: str, what: str, package: str | None = None) -> ModuleType:
    """Import and return `module`; if it (or a package containing it) is not installed, raise MissingExtra.

    `what` names the feature that needs it (a config choice or a command), `extra` the optional
    dependency group that installs it, `package` its distribution name when that differs from the
    top-level module (scikit-learn for sklearn). An ImportError from inside an installed package (a broken
    installation, say) is raised unchanged.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = error.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise
        raise MissingExtra(what, package or module.partition(".")[0], extra, missing) from error
