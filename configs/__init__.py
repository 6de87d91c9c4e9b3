"""vlmtrain's base configs (installed as the package `vlmtrain.configs`) and their typed schemas.

Importing this package (Hydra does, to read the YAML here) registers with Hydra's ConfigStore:
  train_schema, eval_schema          the run's typed fields (vlmtrain.schema), the base of train/eval.yaml
  schema/<kind>/<name>               each buildable component's fields, from its constructor's signature;
                                     every YAML option names the one it fills in its defaults list
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from vlmtrain.components import COMPONENTS
from vlmtrain.schema import EvalConfig, RunConfig, target_schema
from vlmtrain.train import optim

# Called by the trainer with the model (optimizer) or the optimizer (schedule) first.
PARTIAL_COMPONENTS = {
    "optim": {"adamw": optim.adamw},
    "schedule": {"warmup_cosine": optim.warmup_cosine, "constant": optim.constant},
}

RUN_LENGTH = "${trainer.max_steps}"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=RunConfig)
    store.store(name="eval_schema", node=EvalConfig)
    for kind, targets in COMPONENTS.items():
        for name, target in targets.items():
            store.store(group=f"schema/{kind}", name=name, node=target_schema(target))
    for kind, targets in PARTIAL_COMPONENTS.items():
        for name, target in targets.items():
            node = target_schema(target, partial=True, total_steps=RUN_LENGTH)
            store.store(group=f"schema/{kind}", name=name, node=node)


register()
