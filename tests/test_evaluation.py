import torch

from dwlab.config import validate
from dwlab.data.coco import load_coco
from dwlab.evaluation import coco_evaluate, to_coco_results
from dwlab.models.postprocess import Detections
from dwlab.runner import build_datasets, detect, eval_detector
from tests.conftest import tiny_config


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


def test_eval_score_voting_moves_boxes_and_nothing_else(synth_root):
    """``eval.score_voting`` reaches the evaluation's detections: the same detections (image,
    category, score, in order) with voted boxes; a random-init head at score threshold 0 keeps
    100 overlapping boxes per image."""
    cfg = validate(tiny_config(synth_root, eval={"score_thresh": 0.0}), "t")
    _, val = build_datasets(cfg)
    torch.manual_seed(0)
    model = eval_detector(cfg, val.num_classes)
    plain, ids, _ = detect(model, val, cfg, torch.device("cpu"))
    on = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"score_voting": True})})
    voted, voted_ids, _ = detect(model, val, on, torch.device("cpu"))
    assert voted_ids == ids and len(voted) == len(plain) == 100 * len(ids)
    same = ("image_id", "category_id", "score")
    assert [[r[k] for k in same] for r in voted] == [[r[k] for k in same] for r in plain]
    assert sum(r["bbox"] != p["bbox"] for r, p in zip(voted, plain)) > 0
    for r in voted:  # a weighted mean of clipped boxes: still inside the image
        x, y, w, h = r["bbox"]
        image = val.coco.imgs[r["image_id"]]
        assert min(x, y, w, h) >= 0 and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
