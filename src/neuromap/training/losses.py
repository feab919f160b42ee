"""Loss functions by name (MONAI), for class outputs (softmax) or overlapping BraTS regions (sigmoid)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss

from neuromap.config import TrainConfig
from neuromap.labels import REGIONS, UNKNOWN_TUMOUR


def region_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) internal labels -> (B, 3, ...) float WT/TC/ET masks."""
    return torch.cat([torch.isin(labels, torch.tensor(m, device=labels.device)) for m in REGIONS.values()], 1).float()


def make_loss(cfg: TrainConfig) -> torch.nn.Module:
    """Build the configured loss; the returned module takes (logits, labels (B,1,...))."""
    regions = cfg.model.out == "regions"
    weight = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None
    act = {"sigmoid": True} if regions else {"softmax": True, "to_onehot_y": True}
    batch = {"batch": cfg.batch_dice}
    if cfg.loss == "dice":
        loss = DiceLoss(**act, **batch)
    elif cfg.loss == "weighted_dice":
        loss = DiceLoss(**act, **batch, weight=weight if weight is not None else _inverse_frequency_default(cfg))
    elif cfg.loss == "dice_ce":
        loss = DiceCELoss(**act, **batch, weight=weight)
    elif cfg.loss == "dice_bce":
        loss = _OverlapCE(DiceLoss(**act, **batch, weight=weight), regions, weight)
    elif cfg.loss == "tversky_ce":
        beta = cfg.tversky_beta
        loss = _OverlapCE(TverskyLoss(**act, **batch, alpha=1 - beta, beta=beta), regions, weight)
    elif cfg.loss == "focal":
        loss = FocalLoss(use_softmax=not regions, to_onehot_y=not regions, weight=weight)
    else:
        loss = _CrossEntropy(regions, weight)
    return _RegionAdapter(loss) if regions else loss


def _inverse_frequency_default(cfg: TrainConfig) -> torch.Tensor:
    """Weighted Dice without explicit weights: background counts little, small tumour classes count more."""
    return torch.tensor([0.1] + [1.0] * (cfg.out_channels - 1)) if cfg.model.out == "classes" else torch.ones(3)


class _CrossEntropy(torch.nn.Module):
    """CE on (B,1,...) integer targets (torch wants (B,...)); BCE-with-logits for region outputs."""

    def __init__(self, regions: bool, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.regions = regions
        self.ce = torch.nn.BCEWithLogitsLoss(pos_weight=None) if regions else torch.nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(logits, target) if self.regions else self.ce(logits, target[:, 0].long())


class _OverlapCE(torch.nn.Module):
    """An overlap loss (Dice, Tversky) plus cross-entropy: binary per region for sigmoid outputs, as nnU-Net does.

    Written here because MONAI's DiceCELoss, given several sigmoid channels, applies a softmax cross-entropy across
    them (MONAI 1.6.1 ``DiceCELoss.forward`` uses BCE only for a single channel). With overlapping WT/TC/ET targets
    that term is zero on background voxels, so it never penalises a false positive, and it pulls the three
    regions' logits towards each other inside the tumour. MONAI has no Tversky counterpart of DiceCELoss either.
    """

    def __init__(self, overlap: torch.nn.Module, regions: bool, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.overlap = overlap
        self.ce = _CrossEntropy(regions, weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.overlap(logits, target) + self.ce(logits, target)


class _RegionAdapter(torch.nn.Module):
    """Turn label targets into WT/TC/ET channels before a sigmoid loss.

    Voxels labelled ``UNKNOWN_TUMOUR`` (whole-tumour-only cases) are WT; their TC and ET outputs are replaced by a
    constant logit of "certainly absent" with a target of 0, so they add nothing to either Dice term or to the BCE
    and pass no gradient: MONAI's losses take no per-channel mask, and this works with every loss named here.
    """

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        regions = region_targets(target)
        unknown = target == UNKNOWN_TUMOUR
        if unknown.any():
            regions[:, :1] = torch.maximum(regions[:, :1], unknown.float())
            ignored = torch.cat([torch.zeros_like(unknown)] + [unknown] * (logits.shape[1] - 1), 1)  # not WT
            logits = logits.masked_fill(ignored, -1e4)
        return self.loss(logits, regions)
