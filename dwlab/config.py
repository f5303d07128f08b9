"""The typed configuration of one run: data, model, assigner, train, eval.

Every knob an ablation touches is a field here whose default is the paper's value. YAML files
are flat (no inheritance); ``--set dotted.key=value`` overrides are applied before validation,
so a wrong key or type is reported the same way wherever it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dwlab.assign import ASSIGNERS
from dwlab.errors import DwlabError

PRESETS_DIR = Path(__file__).parent / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(Strict):
    """The embedded generated dataset (used when ``data.root`` is null)."""

    n_train: int = Field(400, ge=1)
    n_val: int = Field(100, ge=1)
    seed: int = 0
    image_size: int = Field(128, ge=32)


class DataConfig(Strict):
    root: str | None = None  # null: generate the embedded dataset into the cache and use it
    train_ann: str = "instances_train.json"
    train_images: str = "train"
    val_ann: str = "instances_val.json"
    val_images: str = "val"
    min_size: int = Field(800, ge=16)  # shorter side after resize (every split; see below)
    max_size: int = Field(1333, ge=16)  # longer side at most
    # multi-scale training: [lo, hi], each train image's shorter side drawn uniformly from the
    # integers lo..hi (MMDetection's 'range' mode; the released DW 2x configs: [480, 960]), the
    # longer side still at most max_size; the val split stays at min_size. null: min_size
    train_min_size_range: tuple[int, int] | None = None
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    size_divisor: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    group_by_aspect: bool = False  # train batches of one orientation (less padding at 1333x800)
    synth: SynthConfig = SynthConfig()

    @field_validator("train_min_size_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 16 <= value[0] <= value[1]:
            raise ValueError("expected [lo, hi] with 16 <= lo <= hi")
        return value


class PretrainConfig(Strict):
    """The domain-pretrained backbone (``model.pretrained: synth``, see ``dwlab.pretrain``): a
    classifier of object crops cut from generated images of their own seed stream. Every field
    is part of the cache key: the same key gives the same bytes (on one CPU instruction set)."""

    images: int = Field(3000, ge=10)  # generated images to cut crops from
    image_size: int = Field(128, ge=32)  # their longer side
    seed: int = 0
    crop: int = Field(64, ge=16)  # crops are resized to crop x crop
    context: float = Field(0.15, ge=0.0)  # box side fraction added on each side of a crop
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0.0)  # AdamW, linear decay to 0
    weight_decay: float = Field(0.05, ge=0.0)
    # torch CPU threads while pretraining: fixed, not the host's count, because the trunk's bytes
    # depend on it (1 and 2 threads differ by up to 0.05 in a weight)
    threads: int = Field(2, ge=1)
    # cuda: seconds instead of minutes on a GPU host, but another trunk (its own cache key) than
    # the CPU's, which CPU hosts and the offline bundle share
    device: Literal["cpu", "cuda"] = "cpu"

    @field_validator("threads", mode="before")
    @classmethod
    def _fixed_threads(cls, value: Any) -> Any:
        """Configs written before the thread count was fixed say null (torch's default)."""
        return 2 if value is None else value


BASIC_BLOCK_BACKBONES = ("resnet10", "resnet18", "resnet34")


class ModelConfig(Strict):
    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d"] = "resnet50"
    # DCNv2 in the 3x3 conv of every bottleneck of C3-C5 (the paper's "ResNet-101-DCN"; the
    # offset convs start at zero, the rest loads the ImageNet trunk); bottleneck backbones only
    backbone_dcn: bool = False
    head_dcn: bool = False  # the last conv of each head tower a DCNv2 (released DW DCN config)
    # True: torchvision's ImageNet weights; "synth": the cached domain-pretrained backbone
    # (``pretrain`` below, built on first use or by ``dwlab pretrain``); another str: a local
    # state_dict path; false: random init
    pretrained: bool | str = True
    pretrain: PretrainConfig = PretrainConfig()
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    frozen_stages: int = Field(1, ge=-1, le=4)  # -1 none, 0 stem, 1 stem + layer1, ...
    fpn_channels: int = Field(256, ge=8)
    head_convs: int = Field(4, ge=0)
    head_norm_groups: int = Field(32, ge=1)
    num_classes: int | None = None  # null: from the dataset's categories
    prior_prob: float = Field(0.01, gt=0.0, lt=1.0)  # cls bias init (released DW code: 0.02)
    reg_bias_init: float = 4.0  # regression bias init (released DW code; keeps the ReLU distances alive)
    anchor_offset: float = Field(0.5, ge=0.0, le=1.0)  # point = stride * (i + offset)
    box_refine: bool = False  # paper Eq. 9-10
    refine_sampler: Literal["deform_conv", "grid_sample"] = "deform_conv"
    # the head: FCOS's two towers (``head_convs`` each), or TOOD's task-aligned head (T-head,
    # ``dwlab/models/thead.py``: ``thead_convs`` shared convs, task decomposition, aligned score
    # and boxes); every assigner runs on either
    head: Literal["fcos", "tood"] = "fcos"
    thead_convs: int = Field(6, ge=1)  # the T-head's stacked convs (released TOOD: 6); head: tood only
    # GFL's general distribution (dwlab.models.head): the reg branch predicts 4 x (reg_max + 1)
    # bin logits per point, distance = their integral x stride. null: as the method decides
    # (gfl, gflv2 ask for their own assigner.<name>.reg_max; a different value here is refused)
    reg_max: int | None = Field(None, ge=1)
    # GFLv2's distribution-guided quality predictor in the centerness branch's place (needs a
    # distribution head); false: as the method decides (gflv2 turns it on)
    dgqp: bool = False

    @model_validator(mode="after")
    def _check_groups(self) -> ModelConfig:
        if self.head_convs and self.fpn_channels % self.head_norm_groups:
            raise ValueError(
                f"fpn_channels={self.fpn_channels} is not divisible by "
                f"head_norm_groups={self.head_norm_groups}"
            )
        if self.backbone_dcn and self.backbone in BASIC_BLOCK_BACKBONES:
            raise ValueError(
                f"backbone_dcn needs a bottleneck backbone (resnet50, resnet101, resnext101_64x4d), "
                f"not {self.backbone}"
            )
        if self.head_dcn and not self.head_convs:
            raise ValueError("head_dcn needs head_convs >= 1 (its last tower conv becomes a DCNv2)")
        if self.head == "tood":
            if self.fpn_channels % self.head_norm_groups:
                raise ValueError(
                    f"head=tood: fpn_channels={self.fpn_channels} is not divisible by "
                    f"head_norm_groups={self.head_norm_groups}"
                )
            for key, why in (
                ("box_refine", "the T-head aligns its boxes itself (Eq. 6 of TOOD); DW's refinement is an FCOS-head option"),
                ("head_dcn", "it replaces the FCOS towers' last conv, which the T-head does not have"),
            ):
                if getattr(self, key):
                    raise ValueError(f"{key}=true needs head=fcos, not head=tood: {why}")
        if self.box_refine and self.reg_max is not None:
            raise ValueError(f"box_refine with reg_max={self.reg_max} (a distribution head) is not implemented")
        return self


class FoveaBoxAssignerConfig(Strict):
    """FoveaBox (Kong et al., TIP 2020): scale ranges and the object fovea; released config's values."""

    # per level P3-P7: the box target's normaliser (ln(distance / base_edge)) and the range of
    # sqrt(w h) the level takes, closed; overlapping (eta = 2): a GT is on up to 2 levels
    base_edge_list: list[float] = [16.0, 32.0, 64.0, 128.0, 256.0]
    scale_ranges: list[list[float]] = [[1.0, 64.0], [32.0, 128.0], [64.0, 256.0], [128.0, 512.0], [256.0, 2048.0]]
    sigma: float = Field(0.4, gt=0.0, le=1.0)  # positives: the box shrunk by sigma about its centre (no ignore band)
    focal_alpha: float = 0.4
    focal_gamma: float = 1.5
    smooth_l1_beta: float = Field(0.11, gt=0.0)  # smooth-L1 on the log-space box target
    box_weight: float = Field(1.0, ge=0.0)


class FCOSAssignerConfig(Strict):
    """FCOS (Tian et al., ICCV 2019) with center sampling."""

    center_radius: float = Field(1.5, gt=0.0)
    # regression ranges per level: level l takes max(l,t,r,b) in [size_ranges[l], size_ranges[l+1]],
    # closed at both ends like MMDetection's FCOS (a value on a bound fits both levels)
    size_ranges: list[float] = [0.0, 64.0, 128.0, 256.0, 512.0, 1e8]
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


class DWAssignerConfig(Strict):
    """Dual Weighting (Li et al., CVPR 2022). Symbols follow the paper: beta, mu, gamma1, gamma2.

    The released-code constants left null stay null here (and in a run's ``config.yaml``); the
    assigner resolves them from ``variant`` when it is built (``dwlab.assign.dw.DWParams``:
    ``official`` takes the released code's choices, METHOD.md "Where the released code
    differs", ``paper`` the paper's), and the run records the resolved values apart
    (``resolved.yaml``). So a saved config re-run with another ``mu`` or ``variant`` resolves
    them anew.
    """

    variant: Literal["paper", "official"] = "paper"
    beta: float = 5.0  # Eq. 3: t = s * iou**beta
    mu: float = 5.0  # Eq. 4: exp(mu * t)
    gamma1: float = 2.0  # Eq. 5-6: P_neg exponent
    gamma2: float = 2.0  # Eq. 7: I_neg = s**gamma2
    neg_variant: Literal["full", "pos_only", "no_pneg", "no_ineg", "one_minus_wpos"] = "full"
    bag: Literal["soft", "threshold", "topk"] = "soft"
    bag_radius: float = Field(2.0, gt=0.0)  # threshold bag: distance / stride < r
    bag_topk: int = Field(9, ge=1)  # top-k bag: k nearest per FPN level
    prior_sigma: float = Field(1.11, gt=0.0)  # soft bag: Gaussian sigma in stride units
    # released-code constants (null: decided by ``variant`` when the assigner is built)
    loc_score: Literal["iou_pow", "exp_giou"] | None = None  # t = s*iou**beta | s*exp(-beta*GIoULoss)
    mu_norm: float | None = None  # exponent in the pos normaliser (paper: mu, official: 3)
    pneg_high: float | None = None  # IoU where P_neg reaches 0 (paper 0.95, official 1.0)
    pneg_bag_minmax: bool | None = None  # min-max normalise P_neg within each bag (official)
    pos_scale: float | None = None  # scale of both pos terms (paper 1.0, official 0.25)
    pneg_low: float = 0.5  # IoU below which P_neg = 1
    # L_neg divided by the in-bag sum of (1 - P_neg) (released code; METHOD.md), or by the number
    # of GTs like the pos terms. The first stays near its clamp of 1 while IoUs are below 0.5,
    # which makes early training from scratch swing (see tests/test_train_dw.py).
    neg_norm: Literal["pneg", "num_gts"] = "pneg"

    @model_validator(mode="after")
    def _check_pneg_range(self) -> DWAssignerConfig:
        # with pneg_high null the bound depends on the variant: DWParams checks it when built
        if self.pneg_high is not None and not self.pneg_low < self.pneg_high:
            raise ValueError(f"pneg_low={self.pneg_low} must be below pneg_high={self.pneg_high}")
        return self


class ATSSAssignerConfig(Strict):
    """ATSS (Zhang et al., CVPR 2020): adaptive IoU threshold over the nearest anchors per level."""

    topk: int = Field(9, ge=1)  # Alg. 1: k anchors nearest to the GT centre on each level
    anchor_scale: float = Field(8.0, gt=0.0)  # one square anchor of side anchor_scale * stride per point
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_weight: float = Field(2.0, ge=0.0)  # GIoU loss weight (released ATSS code)


class QFLAssignerConfig(Strict):
    """GFL's Quality Focal Loss alone (Li et al., NeurIPS 2020) on ATSS assignment, without the
    distribution branch and its DFL (dwlab's ``gfl`` before GFL's DFL was added)."""

    topk: int = Field(9, ge=1)
    anchor_scale: float = Field(8.0, gt=0.0)
    beta: float = Field(2.0, ge=0.0)  # QFL: |y - s|^beta
    box_weight: float = Field(2.0, ge=0.0)  # lambda_0, GIoU loss weight


class GFLAssignerConfig(QFLAssignerConfig):
    """GFL (Li et al., NeurIPS 2020) as published: ATSS assignment, QFL, GIoU and the
    Distribution Focal Loss of the distribution head (``model.reg_max``, 16 unless set)."""

    dfl_weight: float = Field(0.25, ge=0.0)  # lambda_1, DFL weight
    # n: the distribution head's bins 0..n per side in strides (the method builds it: HeadInit)
    reg_max: int = Field(16, ge=1)


class GFLv2AssignerConfig(GFLAssignerConfig):
    """GFLv2 (Li et al., CVPR 2021): GFL with the distribution-guided quality predictor (DGQP) in
    the score; on ATSS's or FCOS's sampling (DW Table 6: "ATSS+GFLv2", "FCOS+GFLv2")."""

    sampling: Literal["atss", "fcos"] = "atss"
    # FCOS sampling's centre radius and size ranges (as ``assigner.fcos``), unused with atss
    center_radius: float = Field(1.5, gt=0.0)
    size_ranges: list[float] = [0.0, 64.0, 128.0, 256.0, 512.0, 1e8]


class VFLAssignerConfig(Strict):
    """VarifocalNet's loss (Zhang et al., CVPR 2021) on ATSS assignment."""

    topk: int = Field(9, ge=1)
    anchor_scale: float = Field(8.0, gt=0.0)
    alpha: float = Field(0.75, ge=0.0)  # VFL: negatives alpha * s^gamma
    gamma: float = Field(2.0, ge=0.0)
    box_weight: float = Field(2.0, ge=0.0)  # GIoU loss weight (lambda_1 of the box that sets q)


class TOODAssignerConfig(Strict):
    """TOOD's task-aligned assignment and loss (Feng et al., ICCV 2021), without the T-head."""

    topk: int = Field(13, ge=1)  # m: anchors with the largest t per GT
    alpha: float = Field(1.0, ge=0.0)  # t = s**alpha * u**beta
    beta: float = Field(6.0, ge=0.0)
    qfl_beta: float = Field(2.0, ge=0.0)  # focusing exponent of the cls loss |t_hat - s|^qfl_beta
    box_weight: float = Field(2.0, ge=0.0)  # GIoU loss weight (released code)
    # warm-up: the first epochs assign with ATSS and train the ATSS loss (released: 4 of 12)
    initial_epochs: int = Field(4, ge=0)
    initial_topk: int = Field(9, ge=1)  # the warm-up's ATSS top-k per level
    anchor_scale: float = Field(8.0, gt=0.0)  # the warm-up's ATSS anchor side, x stride


class MuSuAssignerConfig(Strict):
    """MuSu (Gao et al., ICCV 2021), read from the paper (no released code): classification samples
    chosen by the predicted boxes' IoU, regression samples by the scores, inside each GT's box."""

    cls_topk: int = Field(9, ge=1)  # classification samples per GT: the largest IoU of the predicted box
    reg_topk: int = Field(9, ge=1)  # regression samples per GT: the largest score on the GT's class
    qfl_beta: float = Field(2.0, ge=0.0)  # cls loss: QFL with the IoU as soft target
    box_weight: float = Field(2.0, ge=0.0)  # GIoU loss weight (score-weighted)
    # the first epochs rank both heads' samples by the anchor box's IoU (a geometric prior)
    warmup_epochs: int = Field(1, ge=0)
    anchor_scale: float = Field(8.0, gt=0.0)  # the warm-up's anchor side, x stride


class MALAssignerConfig(Strict):
    """MAL (Ke et al., CVPR 2020): FreeAnchor's bag likelihood with MAL's scheduled anchor
    selection; anchor depression (feature perturbation) is not part of it."""

    bag_size: int = Field(17, ge=1)  # released top-40 of 9 anchors per location: 17 locations
    anchor_scale: float = Field(8.0, gt=0.0)  # the bag's anchor box: side anchor_scale * stride
    loc_lambda: float = Field(4.0, ge=0.0)  # P_loc = exp(-loc_lambda * GIoU loss)
    bbox_threshold: float = Field(0.6, ge=0.0, lt=1.0)  # t1 of the negatives' P{a -> b} (released)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # alpha on the positive bags, 1 - alpha on negatives
    gamma: float = Field(2.0, ge=0.0)  # focal exponent of the negatives
    neg_norm: float = Field(40 / 9, gt=0.0)  # negatives over neg_norm x #GTs (released 40, 9 anchors/location)
    select_epochs: int = Field(12, ge=0)  # the bag shrinks to 1 anchor by this epoch; 0: no selection


class AutoAssignAssignerConfig(Strict):
    """AutoAssign (Zhu et al., 2020), weights detached and applied to the loss (DW paper Table 6)."""

    prior_sigma: float = Field(1.0, gt=0.0)  # centre prior: Gaussian, mean 0, sigma in stride units (fixed)
    tau: float = Field(1.0 / 3.0, gt=0.0)  # confidence weighting exp(P / tau)
    loc_lambda: float = Field(5.0, ge=0.0)  # P_loc = exp(-lambda * GIoU loss)
    neg_gamma: float = Field(2.0, ge=0.0)  # focal exponent of the negative term
    pos_weight: float = Field(0.25, ge=0.0)  # released code's loss weights
    neg_weight: float = Field(0.75, ge=0.0)


class AutoAssignDetachAssignerConfig(Strict):
    """AutoAssign as published but with its positive weights detached (DW Table 6's
    "AutoAssign(detach)"): weights on the scores without gradient, centre prior fixed (0, 1)."""

    tau: float = Field(1.0 / 3.0, gt=0.0)  # w+ = exp(P / tau) G / sum
    loc_lambda: float = Field(5.0, ge=0.0)  # P = s * exp(-lambda * GIoU loss)
    neg_gamma: float = Field(2.0, ge=0.0)  # L- = sum FL(w- s), FL(p) = -p^gamma ln(1 - p)
    pos_weight: float = Field(0.25, ge=0.0)  # released code's loss weights
    neg_weight: float = Field(0.75, ge=0.0)


class AutoAssignPaperAssignerConfig(AutoAssignDetachAssignerConfig):
    """AutoAssign as published (Zhu et al., 2020): weights on the scores with gradient, a learnable
    per-class Gaussian centre prior, ImpObj on the centerness branch."""

    prior_weight: float = Field(0.75, ge=0.0)  # released code's loss on the prior (#GT / sum G)


class PAAAssignerConfig(Strict):
    """PAA (Kim and Lee, ECCV 2020): per-GT 2-component GMM over candidate scores; released defaults."""

    anchor_scale: float = Field(8.0, gt=0.0)  # pre-assignment anchor: side anchor_scale * stride per point
    pre_iou: float = Field(0.1, ge=0.0, le=1.0)  # IoU matcher threshold (plus each GT's best anchor)
    topk: int = Field(9, ge=1)  # candidates per GT and level: the lowest cls + GIoU loss scores
    gmm_iters: int = Field(100, ge=1)  # EM steps (scikit-learn's max_iter; no convergence test)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_weight: float = Field(1.3, ge=0.0)  # IoU-weighted GIoU loss
    iou_weight: float = Field(0.5, ge=0.0)  # IoU-prediction BCE on the centerness branch


class OTAAssignerConfig(Strict):
    """OTA (Ge et al., CVPR 2021): optimal-transport assignment, released FCOS-based defaults."""

    center_radius: float = Field(2.5, gt=0.0)  # centre prior: within radius * stride of the centre, in the box
    topk_iou: int = Field(20, ge=1)  # dynamic k = floor(sum of a GT's top-q IoUs), at least 1
    reg_weight: float = Field(1.5, ge=0.0)  # cost = focal cls + reg_weight * -ln IoU
    penalty: float = Field(1e6, gt=0.0)  # cost of a pair outside the centre prior
    sinkhorn_eps: float = Field(0.1, gt=0.0)  # entropic regularisation
    sinkhorn_iters: int = Field(50, ge=1)  # Sinkhorn-Knopp updates (no convergence test)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_weight: float = Field(2.0, ge=0.0)  # IoU-weighted GIoU loss
    iou_weight: float = Field(0.5, ge=0.0)  # IoU-prediction BCE on the centerness branch


class NoisyAnchorAssignerConfig(Strict):
    """NoisyAnchor (Li et al., CVPR 2020): top-N anchors per GT, cleanliness soft labels and re-weights."""

    topn: int = Field(12, ge=1)  # anchors per GT by anchor IoU (released 30 of 9 anchors per point: ~12 points)
    anchor_scale: float = Field(8.0, gt=0.0)  # one square anchor of side anchor_scale * stride per point
    alpha: float = Field(0.75, ge=0.0, le=1.0)  # cleanliness c = alpha * loc + (1 - alpha) * cls
    focal_alpha: float = 0.5  # released config (not RetinaNet's 0.25)
    focal_gamma: float = 2.0
    box_weight: float = Field(2.0, ge=0.0)  # re-weighted GIoU loss


class SimOTAAssignerConfig(Strict):
    """SimOTA, YOLOX's dynamic-k assigner (Ge et al., 2021), in its current form (YOLOX #1589)."""

    center_radius: float = Field(1.5, gt=0.0)  # candidates: within radius * stride of a GT centre
    topk_iou: int = Field(10, ge=1)  # dynamic k = floor(sum of a GT's top-q IoUs), at least 1
    iou_weight: float = Field(3.0, ge=0.0)  # cost = BCE(sqrt(cls * obj)) + iou_weight * -ln IoU
    penalty: float = Field(1e6, gt=0.0)  # cost of a candidate outside the GT's own centre square
    box_weight: float = Field(5.0, ge=0.0)  # YOLOX's reg_weight


class AssignerConfig(Strict):
    name: Literal[tuple(ASSIGNERS)] = "dw"  # type: ignore[valid-type]  # the methods of ASSIGNERS
    foveabox: FoveaBoxAssignerConfig = FoveaBoxAssignerConfig()
    fcos: FCOSAssignerConfig = FCOSAssignerConfig()
    atss: ATSSAssignerConfig = ATSSAssignerConfig()
    paa: PAAAssignerConfig = PAAAssignerConfig()
    ota: OTAAssignerConfig = OTAAssignerConfig()
    qfl: QFLAssignerConfig = QFLAssignerConfig()
    gfl: GFLAssignerConfig = GFLAssignerConfig()
    gflv2: GFLv2AssignerConfig = GFLv2AssignerConfig()
    vfl: VFLAssignerConfig = VFLAssignerConfig()
    tood: TOODAssignerConfig = TOODAssignerConfig()
    musu: MuSuAssignerConfig = MuSuAssignerConfig()
    mal: MALAssignerConfig = MALAssignerConfig()
    autoassign_paper: AutoAssignPaperAssignerConfig = AutoAssignPaperAssignerConfig()
    autoassign_detach: AutoAssignDetachAssignerConfig = AutoAssignDetachAssignerConfig()
    autoassign: AutoAssignAssignerConfig = AutoAssignAssignerConfig()
    noisyanchor: NoisyAnchorAssignerConfig = NoisyAnchorAssignerConfig()
    simota: SimOTAAssignerConfig = SimOTAAssignerConfig()
    dw: DWAssignerConfig = DWAssignerConfig()


class TrainConfig(Strict):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)  # images per worker
    optimizer: Literal["sgd", "adamw"] = "sgd"  # the paper: SGD; AdamW learns faster from scratch
    lr: float = Field(0.01, gt=0.0)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # not applied to norm layers and biases
    warmup_iters: int = Field(1000, ge=0)
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0)
    lr_steps: list[int] = [8, 11]  # epochs after which lr /= 10
    lr_gamma: float = 0.1
    grad_clip: float | None = None  # max grad norm
    # the forward pass, the same on every device: fp32; fp16 = fp16 autocast + a GradScaler;
    # bf16 = bf16 autocast, no scaler (about 1.3x on a CPU with AVX-512 BF16; an H200's native).
    # null: fp16 on CUDA, fp32 on the CPU; a run records what it used (resolved.yaml).
    # Replaces amp/cpu_bf16 (LEGACY_PRECISION).
    precision: Literal["fp32", "fp16", "bf16"] | None = None
    channels_last: bool = False  # NHWC activations (a little faster on the CPU)
    threads: int | None = None  # torch CPU threads (null: torch's default)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_iters_per_epoch: int | None = Field(None, ge=1)  # cap for quick runs and benchmarks
    progress: bool = True  # rich progress bar
    save_checkpoints: bool = True
    # CUDA: deterministic kernels (cuDNN's deterministic algorithms, no autotuning, torch's
    # deterministic mode), so the same config and seed give the same numbers on the same GPU;
    # an op with no deterministic CUDA kernel warns once and runs anyway. The CPU's kernels
    # are deterministic already: the field changes nothing there. Its speed cost on a GPU has
    # not been measured yet (README "Reproducible runs").
    deterministic: bool = True

    @model_validator(mode="before")
    @classmethod
    def _legacy_precision(cls, raw: Any) -> Any:
        return legacy_precision(raw) if isinstance(raw, dict) else raw


#: ``train.precision`` for the keys it replaced, ``(amp, cpu_bf16)`` (absent: true, false). The
#: old keys chose per device (amp: fp16 on CUDA; cpu_bf16: bf16 on the CPU), so the value is the
#: one that computes as they did on each device: null for amp alone (fp16 on CUDA, fp32 on the
#: CPU), fp32 for neither. One pair has no equal: cpu_bf16 with amp (the mini preset) trained
#: bf16 on the CPU and fp16 on CUDA; it becomes bf16 on both, as no dwlab run had used CUDA yet.
LEGACY_PRECISION: dict[tuple[bool, bool], str | None] = {
    (True, False): None,
    (False, False): "fp32",
    (True, True): "bf16",
    (False, True): "bf16",
}


def legacy_precision(train: dict[str, Any]) -> dict[str, Any]:
    """A ``train`` section written before ``precision`` (with ``amp`` and/or ``cpu_bf16``) in
    today's terms; ``train`` itself is left as it is. ``LEGACY_PRECISION`` gives the rule; an
    explicit ``precision`` that differs from what the old keys meant is a ``ValueError``."""
    old = {k: train[k] for k in ("amp", "cpu_bf16") if k in train}
    if not old:
        return train
    for key, value in old.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r} (replaced by precision)")
    meant = LEGACY_PRECISION[(old.get("amp", True), old.get("cpu_bf16", False))]
    if "precision" in train and train["precision"] != meant:
        given = ", ".join(f"{k}={v}" for k, v in old.items())
        raise ValueError(
            f"precision={train['precision']} contradicts the old keys {given} (they mean precision="
            f"{'null' if meant is None else meant}); keep precision only"
        )
    return {**{k: v for k, v in train.items() if k not in old}, "precision": meant}


class EvalConfig(Strict):
    score_thresh: float = 0.05
    pre_nms_topk: int = 1000  # per level
    nms_thresh: float = 0.6
    max_dets: int = 100
    # PAA's score voting after NMS (dwlab/models/postprocess.py): each kept box becomes the
    # score- and IoU-weighted mean of its class's candidates; scores unchanged. Off: as before.
    score_voting: bool = False
    score_voting_sigma: float = Field(0.025, gt=0)  # PAA's sigma in exp(-(1 - IoU)^2 / sigma)
    batch_size: int = Field(8, ge=1)
    every: int = Field(1, ge=0)  # evaluate every N epochs (0: only after the last)


class Config(Strict):
    name: str = "run"
    scale: Literal["smoke", "mini", "paper", "custom"] = "custom"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    assigner: AssignerConfig = AssignerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {key}: {first['msg']}{shown}"


def validate(raw: dict[str, Any], source: str) -> Config:
    """Validate a raw mapping; any problem becomes a one-line ``DwlabError`` naming ``source``."""
    if not isinstance(raw, dict):
        raise DwlabError(f"{source}: expected a mapping of config sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise DwlabError(_format_validation_error(err, source)) from None


#: Options added after sweeps had run, each at the value that leaves a run as it was before the
#: option existed (its default): a config holding that value hashes as one without the option
#: (``dwlab.sweep.spec.config_hash``), so that ``dwlab sweep --resume`` keeps the finished trials
#: of a sweep that ran before it. A new off-by-default option of the model, data, train or eval
#: sections goes here (a new method's section needs nothing: only the run's own section is hashed).
HASH_NEUTRAL: dict[str, Any] = {
    "eval.score_voting": False,  # PAA's score voting
    "model.head": "fcos",  # TOOD's T-head
    "model.reg_max": None,  # GFL's distribution head (a method that needs it asks through head_init)
    "model.dgqp": False,  # GFLv2's quality predictor
}

#: Options a run reads only in some configurations, each with the test that tells it does not
#: read it (on the flattened config): left out of the config hash there, like the sections of the
#: methods it does not run.
HASH_UNREAD: dict[str, Callable[[dict[str, Any]], bool]] = {
    "eval.score_voting_sigma": lambda flat: not flat["eval.score_voting"],
    "model.thead_convs": lambda flat: flat["model.head"] != "tood",
}

#: Keys that configs written by earlier versions hold and that no longer exist, as (section, key):
#: dropped from a stored config (a checkpoint's), still refused in a config a user writes.
REMOVED_KEYS = (
    ("train", "log_every"),
    ("train", "inject_nan_at_iter"),  # fault injection moved to dwlab.faults ($DWLAB_FAULTS)
    ("train", "inject_error_at_epoch"),
)


def validate_stored(raw: dict[str, Any], source: str) -> Config:
    """``validate`` for a config dwlab wrote itself (e.g. a checkpoint's), which may hold keys in
    ``REMOVED_KEYS``; those are dropped, ``raw`` is left as it is."""
    if isinstance(raw, dict):
        raw = dict(raw)
        for section, key in REMOVED_KEYS:
            if isinstance(raw.get(section), dict) and key in raw[section]:
                raw[section] = {k: v for k, v in raw[section].items() if k != key}
    return validate(raw, source)


class YamlProblem(ValueError):
    """Text that ``yaml.safe_load`` refuses; the message is one line (where and why)."""


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` (never ``yaml.load``: a ``!!python/...`` tag is refused, not
    run); whatever it refuses becomes a one-line ``YamlProblem``.

    Besides ``yaml.YAMLError`` (some with multi-line messages), PyYAML's safe constructors raise
    ValueError, KeyError or AttributeError on bad tagged scalars (``!!int x``, ``!!bool x``,
    ``!!timestamp x``), and deep nesting raises RecursionError.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err)
        raise YamlProblem(where + _first_line(reason)) from None
    except Exception as err:  # see the docstring
        raise YamlProblem(f"bad value ({type(err).__name__}: {_first_line(str(err))})") from None


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file, with one-line errors for a missing or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DwlabError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise DwlabError(f"{path}: not valid YAML (not UTF-8 text: {err.reason} at byte {err.start})") from None
    try:
        return parse_yaml(text)
    except YamlProblem as err:
        raise DwlabError(f"{path}: not valid YAML ({err})") from None


def resolve_path(name_or_path: str) -> Path:
    """A config argument is a file path, or the name of a preset in ``dwlab/configs``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise DwlabError(f"config '{name_or_path}' is neither a file nor a preset ({known})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=2"`` -> (["train", "epochs"], 2); the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise DwlabError(f"override '{item}': expected dotted.key=value")
    try:
        value = parse_yaml(text) if text.strip() else None
    except YamlProblem:
        value = text  # validation then reports it as a string where it does not fit
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides set; unknown keys are refused.

    ``overrides`` is a list of ``"a.b=v"`` strings (the CLI's ``--set``) or a mapping
    ``{"a.b": v}`` (sweep points).
    """
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items()]
    )
    out = _deep_copy(raw)
    for keys, value in items:
        label = ".".join(keys)
        node: dict[str, Any] = out
        model: type[BaseModel] = Config
        for i, key in enumerate(keys):
            fields = model.model_fields
            if model is TrainConfig and key in ("amp", "cpu_bf16"):  # a file may still hold them
                raise DwlabError(f"override '{label}': replaced by train.precision (fp32 | fp16 | bf16)")
            if key not in fields:
                where = ".".join(keys[:i]) or "the top level"
                raise DwlabError(
                    f"override '{label}': unknown key '{key}' in {where} "
                    f"(known: {', '.join(fields)})"
                )
            if i == len(keys) - 1:
                node[key] = value
                break
            annotation = fields[key].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise DwlabError(f"override '{label}': '{key}' is a value, not a section")
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node, model = child, annotation
    return out


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def load_config(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a config file or preset, apply dotted overrides, validate."""
    path = resolve_path(name_or_path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DwlabError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate(raw, str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.01, ...}``: the resolved config as dotted keys (MLflow params, diffs)."""
    raw = to_dict(cfg) if isinstance(cfg, Config) else cfg
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
