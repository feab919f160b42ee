"""Whole-tumour-only training cases (LGG kaggle_3m slices in BraTS training): the partial-label loss, the config
rule, and the preparation of real LGG patients (skull stripping, orientation, labels, thick-slice context)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BRATS, LGG, needs_real_data

from neuromap.config import TrainConfig, parse_config
from neuromap.errors import NeuroMapError
from neuromap.labels import ED, ET, NCR, UNKNOWN_TUMOUR
from neuromap.training.losses import make_loss


def _config(**extra) -> TrainConfig:
    data = {"name": "aux", "data_roots": [str(BRATS)], "preprocess": {"modalities": ["t1ce", "flair"], "mode": "2d",
            "slice_size": None, "spacing": [1.0, 1.0, 1.0], "context_slices": 1},
            "model": {"name": "unet2d", "spatial_dims": 2, "out": "regions"}, "patch_size": [64, 64],
            "loss": "dice_ce", "batch_dice": True}
    return parse_config({**data, **extra}, TrainConfig)


def test_unknown_tumour_trains_wt_and_leaves_tc_et_alone():
    """Voxels of unknown class: WT is pulled towards tumour; the TC and ET outputs there get exactly no gradient,
    and the loss equals the loss of the same batch with those outputs cut out of the picture."""
    loss_fn = make_loss(_config())
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[0, 0, 2:6, 2:6] = NCR
    target[0, 0, 6:9, 2:6] = ED
    target[0, 0, 3:5, 3:5] = ET
    target[1, 0, 8:14, 8:14] = UNKNOWN_TUMOUR
    loss = loss_fn(logits, target)
    loss.backward()
    unknown = target[:, 0] == UNKNOWN_TUMOUR
    assert torch.all(logits.grad[:, 1:][unknown.unsqueeze(1).expand(-1, 2, -1, -1)] == 0)
    assert torch.all(logits.grad[:, 0][unknown] < 0)  # raising the WT logit lowers the loss
    known = ~unknown
    assert torch.count_nonzero(logits.grad[:, 1][known]) == known.sum()
    # the unknown voxels as WT-only tumour: same loss as an explicit target with TC/ET forced absent there
    regions = torch.stack([target[:, 0] > 0, torch.isin(target[:, 0], torch.tensor([NCR, ET])),
                           target[:, 0] == ET], 1).float()
    masked = logits.detach().clone()
    masked[:, 1:][unknown.unsqueeze(1).expand(-1, 2, -1, -1)] = -1e4
    assert float(loss.detach()) == pytest.approx(float(loss_fn.loss(masked, regions)), rel=1e-6)


def test_auxiliary_cases_need_a_regions_model():
    with pytest.raises(NeuroMapError, match="auxiliary whole-tumour cases need"):
        _config(model={"name": "unet2d", "spatial_dims": 2, "out": "classes"},
                auxiliary={"data_roots": [str(LGG)]})
    with pytest.raises(NeuroMapError, match="share"):
        _config(auxiliary={"data_roots": [str(LGG)], "share": 1.0})


@needs_real_data
def test_lgg_patients_prepared_as_whole_tumour_cases(tmp_path):
    """Two real patients: one usable (skull stripped by deepbet, in the BraTS cases' orientation, labels only
    UNKNOWN_TUMOUR inside the brain, 2.5D neighbours replaced by the centre slice), one left out because its
    post-contrast channel is a copy of FLAIR."""
    from neuromap.training.auxiliary import load_auxiliary
    from neuromap.training.data import PatchDataset

    root = tmp_path / "lgg"
    root.mkdir()
    for patient in ("TCGA_CS_4941_19960909", "TCGA_HT_8105_19980826"):
        (root / patient).symlink_to(LGG / patient)
    cfg = _config(auxiliary={"data_roots": [str(root)], "share": 0.5})
    cases = load_auxiliary(cfg)
    assert [c.case_id for c in cases] == ["TCGA_CS_4941_19960909"]
    case = cases[0]
    assert case.flat and set(np.unique(case.seg)) == {0, UNKNOWN_TUMOUR}
    brain = np.any(case.image != 0, axis=0)
    assert not np.any((case.seg > 0) & ~brain)  # tumour only inside the stripped brain
    # the stripped brain is a real brain, not the head: the crop is brain-sized (about 140 x 170 mm at ~0.94 mm
    # pixels; the head with skull and scalp fills ~220 x 240 of the 256 pixels) and longer front to back (RAS y)
    x, y, _ = case.image.shape[1:]
    assert 120 <= x <= 200 and 150 <= y <= 230 and y > x
    # every slice the mask holds tumour in is also brain there; the mask is not a thin rim
    assert brain[..., case.image.shape[-1] // 2].mean() > 0.5
    dataset = PatchDataset(cases, cfg, auxiliary=cases)
    image, label = dataset[0]
    t1ce = image[:3]  # (sequence, slice) channels: the t1ce stack first
    assert torch.equal(t1ce[0], t1ce[1]) and torch.equal(t1ce[1], t1ce[2])
    assert set(label.unique().tolist()) <= {0, UNKNOWN_TUMOUR}
