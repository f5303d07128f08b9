import torch

from dwlab.data.coco import load_coco
from dwlab.evaluation import coco_evaluate, to_coco_results
from dwlab.models.postprocess import Detections


def test_ground_truth_as_detections_gives_ap_1(synth_root):
    coco = load_coco(synth_root / "instances_val.json")
    cat_ids = sorted(coco.cats)
    dets, ids, scales = [], [], []
    for image_id in sorted(coco.imgs):
        anns = [a for a in coco.imgToAnns.get(image_id, []) if not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        # detections in a 2x-resized frame: to_coco_results must divide by the scale
        labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.long)
        dets.append(Detections(boxes * 2, torch.ones(len(anns)), labels))
        ids.append(image_id)
        scales.append(2.0)
    metrics = coco_evaluate(coco, to_coco_results(dets, ids, scales, cat_ids), ids)
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0 and metrics["AP75"] == 1.0


def test_no_detections_gives_zero_without_error(synth_root):
    coco = load_coco(synth_root / "instances_val.json")
    metrics = coco_evaluate(coco, [], sorted(coco.imgs))
    assert metrics == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm")}  # no GT over 96² px


def test_a_size_without_gt_has_no_ap_rather_than_minus_one(synth_root):
    """pycocotools reports -1 for a size range with no GT; that is left out, not passed on."""
    coco = load_coco(synth_root / "instances_val.json")
    anns = coco.dataset["annotations"]
    assert anns and max(a["area"] for a in anns) < 96**2  # the generated 128 px set has no large GT
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in anns]  # fmt: skip
    metrics = coco_evaluate(coco, results, sorted(coco.imgs))
    assert metrics["AP"] == 1.0 and "APl" not in metrics and all(v >= 0 for v in metrics.values())


def test_wrong_label_mapping_would_be_caught(synth_root):
    """A shifted label -> category mapping scores 0: the evaluation really checks classes."""
    coco = load_coco(synth_root / "instances_val.json")
    cat_ids = sorted(coco.cats)
    shifted = cat_ids[1:] + cat_ids[:1]
    results = []
    for a in coco.dataset["annotations"]:
        results.append({"image_id": a["image_id"], "category_id": shifted[cat_ids.index(a["category_id"])],
                        "bbox": a["bbox"], "score": 1.0})
    assert coco_evaluate(coco, results, sorted(coco.imgs))["AP"] == 0.0
