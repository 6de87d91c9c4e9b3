"""A saved model config builds only vlmtrain's own classes with values of their schema's types; the
eval sets a saved data config names are kept only where they are local paths. (The same payloads
through the entry points, on a trained run: tests/integration/test_saved_configs.py.)"""

import copy
import json
import os

import pytest
import torch

from tests.helpers.tiny import save_tiny_checkpoint, tiny_model_config
from vlmtrain.checkpoint.load import load_pretrained
from vlmtrain.checkpoint.saved_config import UntrustedConfig, check_model_config, eval_sources


def _set(path: str, value):
    def rewrite(config: dict) -> None:
        *parents, key = path.split(".")
        for part in parents:
            config = config[part]
        config[key] = value

    return rewrite


PAYLOADS = {
    "project callable": (
        _set("image_encoder", {"_target_": "vlmtrain.data.urls.open_shard", "_args_": ["pipe:touch M"]}),
        "not a vlmtrain image tower class: vlmtrain.data.urls.open_shard",
    ),
    "standard library": (
        _set("text_encoder", {"_target_": "shutil.copyfile", "src": os.devnull, "dst": "M"}),
        "not a vlmtrain text tower class: shutil.copyfile",
    ),
    "top-level target": (_set("_target_", "os.system"), "not a vlmtrain model class: os.system"),
    "nested target": (
        _set("image_encoder.vision_cfg.layers", {"_target_": "shutil.copyfile"}),
        "model.image_encoder.vision_cfg.layers._target_: refused",
    ),
    "partial": (_set("image_encoder._partial_", True), "model.image_encoder._partial_: refused"),
    "args": (_set("_args_", ["M"]), "model._args_: refused"),
    "recursive": (_set("_recursive_", False), "model._recursive_: refused"),
    "wrong type": (_set("embed_dim", "pipe:touch M"), "embed_dim"),
    "unknown key": (_set("image_encoder.bogus", 1), "bogus"),
    "interpolation": (_set("image_encoder.model_name", "${oc.env:HOME}"), "refused interpolation"),
    "tower swapped": (
        _set("text_encoder._target_", "vlmtrain.models.image_encoders.OpenClipVisionEncoder"),
        "not a vlmtrain text tower class",
    ),
    "a loss as the model": (
        _set("_target_", "vlmtrain.losses.clip.ClipLoss"),
        "not a vlmtrain model class",
    ),
}


@pytest.mark.parametrize("llip", [False, True])
def test_vlmtrain_own_models_pass(llip):
    check_model_config(tiny_model_config(llip=llip), "step.pt")


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_anything_else_is_refused_in_one_line(name):
    rewrite, needle = PAYLOADS[name]
    config = copy.deepcopy(tiny_model_config())
    rewrite(config)
    with pytest.raises(UntrustedConfig) as error:
        check_model_config(config, "run/checkpoints/step_00000002.pt")
    message = str(error.value)
    assert message.startswith("run/checkpoints/step_00000002.pt: saved config model") and needle in message
    assert "\n" not in message


def test_load_pretrained_refuses_before_building(tmp_path):
    config = tiny_model_config()
    path = save_tiny_checkpoint(tmp_path / "step.pt", config)
    saved = torch.load(path, weights_only=True)
    marker = tmp_path / "marker"
    saved["config"]["model"]["image_encoder"] = {
        "_target_": "shutil.copyfile",
        "src": os.devnull,
        "dst": str(marker),
    }
    torch.save(saved, path)
    with pytest.raises(UntrustedConfig, match="shutil.copyfile"):
        load_pretrained(path)
    assert not marker.exists()


def test_eval_sources_keep_local_paths_only():
    data = {
        "val_shards": "pipe:touch M; cat x.tar",
        "zeroshot_dir": "/data/classification",
        "zeroshot": {"local": "/data/more", "remote": "s3://bucket/more"},
        "retrieval": {"joined": "/data/a.tar::https://example.com/b.tar"},
        "train_shards": "pipe:never read by eval",
    }
    kept, left_out = eval_sources(data)
    assert kept == {
        "zeroshot_dir": "/data/classification",
        "zeroshot": {"local": "/data/more"},
        "retrieval": {},
    }
    assert left_out == ["data.val_shards", "data.zeroshot.remote", "data.retrieval.joined"]


@pytest.mark.parametrize(
    "field, value",
    [("weights", "../outside.safetensors"), ("weights", "/etc/passwd"), ("local_dirs", ["embed_dim"])],
)
def test_an_export_names_only_files_inside_itself(tmp_path, field, value):
    from vlmtrain.checkpoint.export import export
    from vlmtrain.checkpoint.load import CONFIG_FILE

    checkpoint = save_tiny_checkpoint(tmp_path / "step.pt", tiny_model_config())
    folder = export(checkpoint, tmp_path / "export", "vlmtrain").path
    meta = json.loads((folder / CONFIG_FILE).read_text())
    (tmp_path / "outside.safetensors").write_bytes((folder / meta["weights"]).read_bytes())
    meta[field] = value
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UntrustedConfig, match="not a path inside the export folder|not a key"):
        load_pretrained(folder)
