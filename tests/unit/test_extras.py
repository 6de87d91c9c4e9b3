"""Optional packages: present, they are returned; missing, the error is one line naming the extra."""

import json
import sys

import pytest

from vlmtrain.extras import MissingExtra, require


def _hide(monkeypatch, *modules):
    """Make `import module` fail as if the package were not installed (None in sys.modules)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _assert_one_line(error, *parts):
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_require_returns_the_module_when_installed():
    assert require("json", "dev", "a test") is json
    datasets = pytest.importorskip("sklearn.datasets")
    assert require("sklearn.datasets", "examples", "a test", package="scikit-learn") is datasets


def test_missing_module_names_the_feature_package_and_extra(monkeypatch):
    _hide(monkeypatch, "vlmtrain_absent")
    with pytest.raises(MissingExtra) as caught:
        require("vlmtrain_absent.sub", "hf", "model.thing=x")
    assert str(caught.value) == (
        "model.thing=x: needs vlmtrain_absent; install it with: pip install 'vlmtrain[hf]'"
    )
    assert isinstance(caught.value, ImportError) and caught.value.extra == "hf"


def test_import_error_inside_an_installed_package_is_not_reworded(tmp_path, monkeypatch):
    (tmp_path / "vlmtrain_broken_pkg.py").write_text("import vlmtrain_broken_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vlmtrain_broken_pkg", raising=False)
    with pytest.raises(ImportError) as caught:
        require("vlmtrain_broken_pkg", "hf", "a test")
    assert not isinstance(caught.value, MissingExtra)
    assert caught.value.name == "vlmtrain_broken_dependency"


@pytest.mark.parametrize("tower", ["encoder", "tokenizer"])
def test_hf_text_tower_without_transformers(tmp_path, monkeypatch, tower):
    from vlmtrain.models.text_encoders import HFTextEncoder, HFTokenizer

    _hide(monkeypatch, "transformers")
    with pytest.raises(MissingExtra) as caught:
        if tower == "encoder":
            HFTextEncoder(16, str(tmp_path))
        else:
            HFTokenizer(str(tmp_path), 16)
    _assert_one_line(caught.value, "model.text_encoder=hf", "transformers", "pip install 'vlmtrain[hf]'")


def test_digits_writer_without_scikit_learn(tmp_path, monkeypatch):
    from vlmtrain.datasets.digits import write_digits

    _hide(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingExtra) as caught:
        write_digits(tmp_path / "digits")
    _assert_one_line(caught.value, "vlmtrain-data digits", "scikit-learn", "pip install 'vlmtrain[examples]'")
    assert not (tmp_path / "digits").exists()
