"""Evaluation results' keys (`zeroshot/pets/acc1`, `retrieval/tau=0.1/image_retrieval_recall@1`) and their
parts: what the runs table and plots read, without the evaluation code and its imports."""

from __future__ import annotations

from typing import NamedTuple

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "relation": "relation"}
# The columns a person compares runs and temperatures by; metrics.jsonl and eval.json keep every metric.
HEADLINE = ("acc1", "acc5", "image_retrieval_recall@1", "text_retrieval_recall@1", "acc")


class MetricKey(NamedTuple):
    task: str  # zeroshot | retrieval
    name: str  # the set's name; "" for the unnamed default
    temperature: float | None  # a Llip sweep's tau; None for the model's own
    metric: str

    @property
    def prefix(self) -> str:
        return f"{self.task}/{self.name}" if self.name else self.task


def parse_key(key: str) -> MetricKey | None:
    """A results key split into its parts; None for keys that are not evaluation metrics."""
    if "/" not in key or (task := key.split("/", 1)[0]) not in TASKS:
        return None
    _, *middle, metric = key.split("/")
    tau = float(middle.pop().removeprefix("tau=")) if middle and middle[-1].startswith("tau=") else None
    return MetricKey(task, "/".join(middle), tau, metric)
