"""The presets' sizes: parameters and forward FLOPs per image-caption pair, counted on the meta device
(nothing is allocated or computed), as in the README's presets table.

FLOPs are torch's FlopCounterMode count of the model's forward (2 per multiply-add) for one image and one
caption (vlmtrain.report.flops.count_flops, the count MFU uses); a training step costs about 3x. Llip's per-pair mixing happens in the loss and grows with the
batch, so it is not included (it is K*H*d*2 + E*E multiply-adds per image-caption pair).

    .venv/bin/python benchmarks/model_presets.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from vlmtrain.report.flops import count_flops

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "preset"
SIZES = ("b32", "b16", "l14", "h14", "bigg14")


def order(path: Path) -> tuple[str, int]:
    family, size = path.stem.split("_")[0], path.stem.split("_")[-1]
    return family, SIZES.index(size) if path.stem.startswith(f"{family}_vit_") else len(SIZES)


def measure(preset: str) -> tuple[float, float, float, float]:
    """Parameters (millions): image tower, text tower, all; forward GFLOPs per pair."""
    with initialize_config_module("vlmtrain.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"preset={preset}", "++model.text_encoder.tokenizer_path=/none"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    flops = count_flops(lambda: model, backward=False).forward
    millions = [
        sum(p.numel() for p in m.parameters()) / 1e6 for m in (model.image_encoder, model.text_encoder, model)
    ]
    return (*millions, flops / 1e9)


def main() -> None:
    print("| preset | image tower (M) | text tower (M) | parameters (M) | GFLOPs/pair (fwd) |")
    print("|---|---:|---:|---:|---:|")
    for path in sorted(PRESETS.glob("*.yaml"), key=order):
        image, text, total, gflops = measure(path.stem)
        print(f"| {path.stem} | {image:.1f} | {text:.1f} | {total:.1f} | {gflops:.1f} |", flush=True)


if __name__ == "__main__":
    main()
