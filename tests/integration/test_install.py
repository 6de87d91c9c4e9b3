"""What a user installs: the wheel and the sdist, each built from a copy of the sources and installed
(not editable) into a fresh venv outside the source tree, whose commands then work from any folder."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TINY_RUN = [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.wandb=false",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.synthetic.train_samples=64",
    "data.synthetic.val_samples=16",
    "model.embed_dim=32",
    "model.image_encoder.vision_cfg.width=32",
    "model.image_encoder.vision_cfg.layers=1",
    "model.text_encoder.text_cfg.width=32",
    "model.text_encoder.text_cfg.layers=1",
]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built by setuptools' PEP 517 backend (the version pyproject.toml requires,
    installed apart) from a copy of what git tracks: nothing left in the repo, nothing untracked shipped."""
    root = tmp_path_factory.mktemp("build")
    source, backend, dist = root / "source", root / "backend", root / "dist"
    tracked = _run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, tracked):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    requires = PROJECT["build-system"]["requires"]
    _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(backend), *requires])
    hooks = f"import setuptools.build_meta as b; b.build_sdist({str(dist)!r}); b.build_wheel({str(dist)!r})"
    build = _run([sys.executable, "-c", hooks], cwd=source, env=os.environ | {"PYTHONPATH": str(backend)})
    assert "Warning" not in build.stdout + build.stderr, build.stdout + build.stderr
    (sdist,) = dist.glob("vlmtrain-*.tar.gz")
    (wheel,) = dist.glob("vlmtrain-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _fresh_venv(folder: Path) -> Path:
    """A venv whose heavy dependencies (torch, open_clip, ...) are this interpreter's, through a .pth
    that names only site-packages folders without vlmtrain in them: vlmtrain comes from the install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    shared = [p for p in site.getsitepackages() + sys.path if p.endswith("site-packages")]
    assert not any((Path(p) / "vlmtrain").exists() for p in shared), "vlmtrain is installed, not editable"
    (purelib,) = folder.glob("lib/python*/site-packages")
    (purelib / "_vlmtrain_test_deps.pth").write_text("\n".join(dict.fromkeys(shared)) + "\n")
    return folder / "bin"


def _install(built: dict[str, Path], kind: str, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """`kind` installed in a fresh venv under `tmp_path`, imported from a folder with no configs/ and no
    vlmtrain/: (its bin folder, that folder, the environment)."""
    bin_dir = _fresh_venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps"]
    _run([*pip, str(built[kind])], cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = os.environ | {"VLMTRAIN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": "", "WANDB_MODE": "disabled"}
    where = _run(
        [str(bin_dir / "python"), "-c", "import vlmtrain; print(vlmtrain.__file__)"], cwd=work, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout
    return bin_dir, work, env


def _installed_files(venv: Path) -> dict[str, bytes]:
    """vlmtrain's files and its console scripts' entry points, as installed in `venv`."""
    (purelib,) = venv.glob("lib/python*/site-packages")
    (entry_points,) = purelib.glob("vlmtrain-*.dist-info/entry_points.txt")
    installed = {
        path.relative_to(purelib).as_posix(): path.read_bytes()
        for path in (purelib / "vlmtrain").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    return installed | {"entry_points.txt": entry_points.read_bytes()}


def _wheel_files(wheel_path: Path) -> dict[str, bytes]:
    """The same from the wheel itself."""
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        shipped = {name: wheel.read(name) for name in names if name.startswith("vlmtrain/")}
        (entry_points,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
        return shipped | {"entry_points.txt": wheel.read(entry_points)}


@pytest.mark.slow
def test_the_wheel_ships_the_configs_as_a_package(built):
    """configs/ is the package vlmtrain.configs once installed, so the Hydra apps work after `pip install`."""
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
    for config in (
        "train.yaml",
        "eval.yaml",
        "experiment/digits.yaml",
        "model/image_encoder/openclip_vit_micro.yaml",
    ):
        assert f"vlmtrain/configs/{config}" in names
    assert "vlmtrain/configs/__init__.py" in names and "vlmtrain/schema.py" in names


@pytest.mark.slow
def test_the_installed_wheel_trains_evaluates_and_exports_outside_the_source_tree(built, tmp_path):
    bin_dir, work, env = _install(built, "wheel", tmp_path)
    for command in PROJECT["project"]["scripts"]:  # each answers with its own help
        shown = _run([str(bin_dir / command), "--help"], cwd=work, env=env)
        assert "vlmtrain" in shown.stdout.split("\n\n")[0], (command, shown.stdout)
    _run([str(bin_dir / "vlmtrain-train"), "run_dir=run", *TINY_RUN], cwd=work, env=env)
    assert json.loads((work / "run" / "status.json").read_text())["step"] == 3
    _run([str(bin_dir / "vlmtrain-eval"), "checkpoint=run", "out=eval.json"], cwd=work, env=env)
    assert "zeroshot/acc1" in json.loads((work / "eval.json").read_text())["metrics"]
    _run([str(bin_dir / "vlmtrain-export"), "run", "--out", "exported"], cwd=work, env=env)
    assert (work / "exported" / "open_clip_config.json").is_file()


@pytest.mark.slow
def test_the_installed_sdist_holds_the_wheels_files(built, tmp_path):
    """pip builds the sdist into a wheel of its own and installs that: the same files, byte for byte, and
    the same console scripts as the wheel the test above runs every command of, so the same commands run
    the same code."""
    _install(built, "sdist", tmp_path)
    installed, shipped = _installed_files(tmp_path / "venv"), _wheel_files(built["wheel"])
    assert installed.keys() == shipped.keys()
    assert [name for name in shipped if installed[name] != shipped[name]] == []
