"""Fig. 5 of the paper from a trained checkpoint: score, IoU, pos and neg weight over the
anchors of one image, per FPN level. The model and data are rebuilt from the checkpoint's
own config, so the figure shows exactly what that run saw."""

from __future__ import annotations

from pathlib import Path

import torch

from dwlab import checkpoint
from dwlab.assign.dw import DWAssigner
from dwlab.config import validate
from dwlab.data.coco import collate
from dwlab.errors import DwlabError
from dwlab.models.detector import build_model
from dwlab.plots import plot_weight_maps
from dwlab.runner import build_datasets


def find_image(dataset, image: str) -> int:
    """Index in ``dataset`` of an image given by COCO id or file name."""
    for index, image_id in enumerate(dataset.image_ids):
        info = dataset.coco.imgs[image_id]
        if image in (str(image_id), info["file_name"], Path(info["file_name"]).name):
            return index
    raise DwlabError(f"--image {image!r}: no image with that id or file name in {dataset.ann_file}")


@torch.no_grad()
def plot_checkpoint_weights(checkpoint_path: Path, image: str, out_path: Path) -> Path:
    """Draw the DW weight maps (with the checkpoint's DW settings) of one val image."""
    state = checkpoint.load(checkpoint_path)
    cfg = validate(state.get("config", {}), f"{checkpoint_path} (its config)")
    _, val = build_datasets(cfg)
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), val.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    index = find_image(val, image)
    images, _sizes, targets = collate([val[index]], cfg.data.size_divisor)
    outputs = model(images)
    assigner = DWAssigner.from_config(cfg.assigner.dw, val.num_classes)
    maps = assigner.weight_maps(outputs, targets)
    name = val.coco.imgs[targets[0].image_id]["file_name"]
    title = f"{name}: {len(targets[0].labels)} GTs, {cfg.assigner.name} run, epoch {state.get('epoch')}"
    return plot_weight_maps(maps, out_path, title=title)
