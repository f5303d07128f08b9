"""Fig. 5 of the paper from a trained checkpoint: score, IoU, pos and neg weight over the
anchors of one image, per FPN level. The model and data are rebuilt from the checkpoint's
own config, so the figure shows exactly what that run saw.

With several methods (Fig. 1 / Fig. 5's comparison), each method's (pos, neg) weights are
computed over the same anchors from the same predictions, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dwlab import checkpoint
from dwlab.assign import WEIGHT_METHODS, build_assigner
from dwlab.config import validate_stored
from dwlab.data.coco import SkippedImage, collate
from dwlab.data.transforms import denormalize
from dwlab.errors import DwlabError
from dwlab.plots import plot_weight_maps
from dwlab.runner import build_datasets, eval_detector


def find_image(dataset, image: str | None) -> int:
    """Index in ``dataset`` of an image given by COCO id or file name; None: the image with
    the most annotations (the first such)."""
    if image is None:
        counts = [len(dataset.coco.imgToAnns.get(i, [])) for i in dataset.image_ids]
        return counts.index(max(counts))
    for index, image_id in enumerate(dataset.image_ids):
        info = dataset.coco.imgs[image_id]
        if image in (str(image_id), info["file_name"], Path(info["file_name"]).name):
            return index
    raise DwlabError(f"--image {image!r}: no image with that id or file name in {dataset.ann_file}")


def parse_methods(text: str) -> list[str]:
    """``"gfl,vfl,dw"`` -> ``["gfl", "vfl", "dw"]``; unknown or missing names are a ``DwlabError``."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in WEIGHT_METHODS]
    if unknown or not methods:
        raise DwlabError(
            f"--methods {text!r}: expected comma-separated names among {', '.join(WEIGHT_METHODS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return methods


@torch.no_grad()
def plot_checkpoint_weights(
    checkpoint_path: Path, image: str, out_path: Path, methods: Sequence[str] = ("dw",), label: str | None = None
) -> Path:
    """Draw the weight maps of one val image under each of ``methods`` (with the checkpoint's
    settings for each method's section), beside the image and its GT boxes. ``label`` names the
    run in the title (e.g. its sweep point and seed).

    ``("dw",)``: DW's score, IoU, pos and neg maps (Fig. 5). Several methods: the score and IoU
    columns of the first method, then a (pos, neg) pair of columns per method.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in WEIGHT_METHODS]
    if unknown or not methods:
        raise DwlabError(f"methods {methods}: expected names among {', '.join(WEIGHT_METHODS)}")
    state = checkpoint.load(checkpoint_path)
    cfg = validate_stored(state.get("config", {}), f"{checkpoint_path} (its config)")
    _, val = build_datasets(cfg)
    model = eval_detector(cfg, val.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    index = find_image(val, image)
    item = val[index]
    if isinstance(item, SkippedImage):
        raise DwlabError(item.reason)
    images, _sizes, targets = collate([item], cfg.data.size_divisor)
    outputs = model(images)
    name = val.coco.imgs[targets[0].image_id]["file_name"]
    run = f"{label} ({cfg.assigner.name})" if label else f"{cfg.assigner.name} run"
    title = f"{name}: {len(targets[0].labels)} GTs; {run}, epoch {state.get('epoch')}"
    shown = dict(image=denormalize(images[0]).permute(1, 2, 0), boxes=targets[0].boxes)
    per_method = {
        m: build_assigner(cfg.assigner.model_copy(update={"name": m}), val.num_classes).weight_maps(outputs, targets)
        for m in methods
    }
    if methods == ["dw"]:
        return plot_weight_maps(per_method["dw"], out_path, title=title, **shown)
    first = per_method[methods[0]]
    maps = {
        level: {
            "score": first[level]["score"],
            "iou": first[level]["iou"],
            **{f"{m} {k}": per_method[m][level][k] for m in methods for k in ("pos", "neg")},
        }
        for level in first
    }
    columns = ["score", "iou", *(f"{m} {k}" for m in methods for k in ("pos", "neg"))]
    return plot_weight_maps(maps, out_path, columns=columns, title=f"{title}; weights of {', '.join(methods)}", **shown)
