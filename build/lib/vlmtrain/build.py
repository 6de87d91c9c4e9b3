"""Building the components a config names (`_target_` nodes), with every failure one line naming its key."""

from __future__ import annotations

import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vlmtrain.extras import MissingExtra
from vlmtrain.schema import ConfigError


def build(node: Any, key: str) -> Any:
    """`instantiate(node)`; a constructor's ValueError/TypeError becomes a ConfigError naming `key`."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError | FileNotFoundError | MissingExtra):
            raise cause from None
        if isinstance(cause, ValueError | TypeError):
            message = str(cause)
            named = message.startswith(key) or "=" in message.split(":")[0]
            raise ConfigError(message if named else f"{key}: {message}") from None
        raise


def check_loss_fits_model(loss: object, model: object) -> None:
    """The loss's required inputs must be among the model's outputs, or the run could never step."""
    params = inspect.signature(loss.forward).parameters.values()
    needed = [
        p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    given = getattr(model, "output_keys", ())
    missing = [name for name in needed if name not in given]
    if missing:
        raise ConfigError(
            f"loss: {type(loss).__name__} needs model outputs {', '.join(missing)}, which {type(model).__name__} "
            f"does not give ({', '.join(given)})"
        )
