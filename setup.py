"""The packages, found by setuptools' discovery (the rest of the metadata is in pyproject.toml).

pyproject.toml's `packages.find` only names folders below the project root by their own path, so it cannot
install the top-level configs/ as vlmtrain.configs; each group folder (configs/model/image_encoder, ...) is a
package too, so that its yaml files ship as package data without a build warning."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIG_GROUPS = [
    f"vlmtrain.configs.{group}" for group in find_namespace_packages("configs", exclude=["*__pycache__*"])
]

setup(packages=[*find_packages(include=["vlmtrain", "vlmtrain.*"]), "vlmtrain.configs", *CONFIG_GROUPS])
