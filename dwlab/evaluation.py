"""COCO bbox evaluation through pycocotools: detections -> results json -> COCOeval."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dwlab.box_ops import xyxy_to_xywh
from dwlab.models.postprocess import Detections

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SIZE_RANGES = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, 1e10)}  # area, as COCOeval's


def to_coco_results(
    detections: list[Detections], image_ids: list[int], scales: list[float], cat_ids: list[int]
) -> list[dict]:
    """COCO result entries; boxes mapped back to original pixels (divided by each image's
    resize ``scale``) and labels back to the dataset's category ids."""
    results = []
    for det, image_id, scale in zip(detections, image_ids, scales):
        boxes = xyxy_to_xywh(det.boxes / scale).tolist()
        for box, score, label in zip(boxes, det.scores.tolist(), det.labels.tolist()):
            results.append(
                {"image_id": int(image_id), "category_id": cat_ids[label], "bbox": box, "score": float(score)}
            )
    return results


def coco_evaluate(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (COCO bbox, in [0, 1]). A size without any GT among the
    evaluated images has no AP: its key is left out (pycocotools reports -1 there, which must
    not pass for a measurement). No detections gives zeros, not an error.
    """
    if not results:
        sizes = _sizes_with_gt(coco_gt, image_ids)
        return {name: 0.0 for name in METRIC_NAMES if name not in SIZE_RANGES or name in sizes}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats[: len(METRIC_NAMES)], dtype=float)
    return {name: float(v) for name, v in zip(METRIC_NAMES, stats) if v >= 0}


def _sizes_with_gt(coco_gt: COCO, image_ids: list[int] | None) -> set[str]:
    """The size metrics (``SIZE_RANGES``) that have a non-crowd GT among ``image_ids`` (all: None)."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids or [], iscrowd=False))
    return {name for name, (lo, hi) in SIZE_RANGES.items() if any(lo <= a["area"] < hi for a in anns)}
