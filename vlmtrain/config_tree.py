"""The composed config tree as a typed `RunConfig` (`typed_config`, checked against the schema); as flat
dotted keys: `vlmtrain.dotted`."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmtrain.schema import ConfigError, RunConfig, check_run, one_line

COMPONENTS = ("model", "loss", "optim", "schedule")  # built from their `_target_`


def typed_config(cfg: DictConfig) -> RunConfig:
    """The composed config as a RunConfig (interpolations resolved, field checks run), or one line.
    Component nodes stay plain dicts holding every key given, so a constructor rejects what it does not take."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run = OmegaConf.to_object(merged)
        for key in COMPONENTS:
            setattr(run, key, OmegaConf.to_container(merged[key], resolve=True))
    except OmegaConfBaseException as error:
        raise ConfigError(one_line(str(error))) from None
    check_run(run)
    return run
