"""Training data: patient-level splits, cached preprocessed cases, tumour-biased patch sampling, augmentation.

Samples are drawn with a generator seeded by (seed, epoch, rank, index), so a resumed run sees exactly the
batches an uninterrupted run would, and DDP ranks see different samples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms.utils import map_binary_to_indices

from neuromap.config import AugmentConfig, SplitConfig, TrainConfig
from neuromap.errors import NeuroMapError
from neuromap.io import Case, discover_cases, duplicate_ids, load_case
from neuromap.preprocess import prepare
from neuromap.tasks import get_task
from neuromap.training.stand_in import RandStandInd
from neuromap.training.thick_slices import RandThickSlicesd


def site_of(case_id: str) -> str:
    """The acquiring site encoded in a case id, for stratified folds: "Brats18_2013_2_1" -> "2013",
    "Brats18_TCIA01_378_1" -> "TCIA", "TCGA_CS_4941_19960909" -> "CS"; ids without "_" share one site."""
    parts = case_id.split("_")
    if len(parts) < 2:
        return ""
    return re.sub(r"\d+$", "", parts[1]) or parts[1]  # "TCIA01" -> "TCIA"; an all-digit token ("2013") stays


def kfold_assignment(case_ids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Patient-level fold of every case, stratified by site (``site_of``): each site's cases, in a seeded shuffle
    of the sorted ids, are dealt round-robin, the deal continuing across sites so fold sizes differ by at most one.
    Scanner generations (e.g. the older BraTS-2013 patients) thus land in different folds instead of one.
    """
    ids = sorted(case_ids)
    if folds > len(ids):
        raise NeuroMapError(f"k-fold: {folds} folds impossible with {len(ids)} cases.")
    rng = np.random.default_rng(seed)
    sites: dict[str, list[str]] = {}
    for case_id in ids:
        sites.setdefault(site_of(case_id), []).append(case_id)
    order = [sites[site][i] for site in sorted(sites) for i in rng.permutation(len(sites[site]))]
    return {case_id: position % folds for position, case_id in enumerate(order)}


def split_cases(case_ids: list[str], cfg: SplitConfig, seed: int) -> dict[str, list[str]]:
    """Split by patient (never by slice). "kfold": fold ``cfg.fold`` of ``kfold_assignment`` is validation;
    "all": every case trains (final models after cross-validation); "ratio": a seeded shuffle of the sorted ids.
    The shuffle uses ``cfg.seed`` when set, else the run's ``seed``."""
    ids = sorted(case_ids)
    seed = seed if cfg.seed is None else cfg.seed
    if cfg.mode == "all":
        return {"train": ids, "val": [], "test": []}
    if cfg.mode == "kfold":
        if cfg.fold >= cfg.folds:
            raise NeuroMapError(f"k-fold: fold {cfg.fold} does not exist; folds are 0..{cfg.folds - 1}.")
        assignment = kfold_assignment(ids, cfg.folds, seed)
        return {"train": [i for i in ids if assignment[i] != cfg.fold],
                "val": [i for i in ids if assignment[i] == cfg.fold], "test": []}
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n = len(ids)
    n_val = max(1, round(cfg.ratios[1] * n))
    n_test = round(cfg.ratios[2] * n) if len(cfg.ratios) == 3 else 0
    if n - n_val - n_test < 1:
        raise NeuroMapError(f"split {cfg.ratios} leaves no training case out of {n}; add cases or change ratios.")
    split = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {k: sorted(v) for k, v in split.items()}


@dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z)
    seg: np.ndarray  # (X, Y, Z) internal labels
    spacing: tuple[float, float, float]
    fg: np.ndarray  # flat indices of tumour voxels (for biased sampling)
    bg: np.ndarray  # flat indices of brain voxels without tumour
    flat: bool = False  # thick slices (`neuromap.training.auxiliary`): 2.5D neighbours are replaced by the centre

    @classmethod
    def indexed(cls, case_id: str, image: np.ndarray, seg: np.ndarray, spacing: tuple[float, float, float],
                flat: bool = False) -> PreparedCase:
        """The case with the tumour and brain voxel indices that the tumour-biased sampling draws from."""
        fg, bg = map_binary_to_indices(seg[None] > 0, image, image_threshold=0.0)
        return cls(case_id, image, seg, spacing, np.asarray(fg), np.asarray(bg), flat)


def find_training_cases(roots: list[str]) -> list[Case]:
    if not roots:
        raise NeuroMapError(
            "the config names no data_roots (the folders of labelled cases to train on). "
            "Fix: add e.g. 'data_roots: [../shared/data/brats2018]' to the config."
        )
    cases: list[Case] = []
    for root in roots:
        cases.extend(c for c in discover_cases(root) if c.seg is not None)
    if not cases:
        raise NeuroMapError(f"no labelled cases (with a segmentation file) under {roots}.")
    dupes = duplicate_ids(cases)
    if dupes:
        raise NeuroMapError(f"case ids occur twice across data_roots: {dupes}. Fix: remove the duplicates.")
    return cases


def prepare_case(case: Case, cfg: TrainConfig) -> PreparedCase:
    volume = load_case(case, cfg.preprocess.modalities, with_seg=True)
    prepared = prepare(volume, cfg.preprocess)
    seg = get_task(cfg.task).training_target(prepared.seg.astype(np.uint8))
    return PreparedCase.indexed(case.case_id, prepared.image, seg, prepared.spacing)


def augmentations(cfg: AugmentConfig, dims: int, channels: list[str]) -> list[mt.Transform]:
    """MONAI dictionary transforms; images bilinear, labels nearest. The intensity transforms after the spatial
    ones imitate other scanners and older protocols (bias field, contrast, noise, blur, thick slices); the stand-in
    copies come last, so they are exact copies as in the data they imitate. ``channels`` names each input
    channel's sequence."""
    keys, modes = ["image", "label"], ("bilinear", "nearest")
    out: list[mt.Transform] = []
    if cfg.flip:
        out += [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dims)]
    if cfg.rotate_deg > 0:
        angle = np.deg2rad(cfg.rotate_deg)
        # 3D: rotate in the axial plane only: out-of-plane rotation of anisotropic scans adds little and is slow
        out.append(mt.RandRotated(keys, range_x=angle if dims == 2 else 0.0, range_z=angle if dims == 3 else 0.0,
                                  prob=cfg.prob, mode=modes, padding_mode="zeros"))
    if cfg.scale != (1.0, 1.0):
        out.append(mt.RandZoomd(keys, prob=cfg.prob, min_zoom=cfg.scale[0], max_zoom=cfg.scale[1], mode=modes,
                                keep_size=True))
    if cfg.low_resolution is not None:
        out.append(mt.RandSimulateLowResolutiond("image", prob=cfg.prob, zoom_range=cfg.low_resolution,
                                                 upsample_mode="bilinear" if dims == 2 else "trilinear"))
    if cfg.bias_field > 0:
        out.append(mt.RandBiasFieldd("image", coeff_range=(0.0, cfg.bias_field), prob=cfg.prob))
    if cfg.intensity_scale > 0:
        out.append(mt.RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.prob,
                                          channel_wise=cfg.channel_wise))
    if cfg.intensity_shift > 0:
        out.append(mt.RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.prob,
                                          channel_wise=cfg.channel_wise))
    if cfg.gamma is not None:
        out.append(mt.RandAdjustContrastd("image", prob=cfg.prob, gamma=cfg.gamma))
    if cfg.blur_sigma is not None:
        out.append(mt.RandGaussianSmoothd("image", sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma,
                                          sigma_z=cfg.blur_sigma, prob=cfg.prob))
    if cfg.noise_std > 0:
        out.append(mt.RandGaussianNoised("image", prob=cfg.prob, std=cfg.noise_std))
    if cfg.stand_in > 0:
        out.append(RandStandInd("image", channels, cfg.stand_in_source, cfg.stand_in))
    return out


class PatchDataset(torch.utils.data.Dataset):
    """``iterations_per_epoch * batch_size`` random samples per epoch; 2D models get single axial slices. With
    ``auxiliary`` cases, a share ``cfg.auxiliary.share`` of the samples is drawn from them."""

    def __init__(self, cases: list[PreparedCase], cfg: TrainConfig, rank: int = 0,
                 auxiliary: list[PreparedCase] | None = None) -> None:
        self.cases, self.cfg, self.rank, self.epoch = cases, cfg, rank, 0
        self.auxiliary = auxiliary or []
        dims = cfg.model.spatial_dims
        self.context = cfg.preprocess.context_slices
        thickness = cfg.augment.thick_slices
        # 2.5D samples are a few slices: crop a slab tall enough to hold the thickest slices, keep its centre after
        self.extra = int(np.ceil(thickness[1])) if thickness and dims == 2 else 0
        thick_prob = cfg.augment.prob if cfg.augment.thick_slices_prob is None else cfg.augment.thick_slices_prob
        self.thick = RandThickSlicesd("image", thickness, thick_prob) if thickness else None
        size = tuple(cfg.patch_size) if dims == 3 else (*cfg.patch_size, 2 * (self.context + self.extra) + 1)
        self.crop = mt.RandCropByPosNegLabeld(
            ["image", "label"], "label", spatial_size=size, pos=cfg.tumour_sampling,
            neg=1.0 - cfg.tumour_sampling, num_samples=1, fg_indices_key="fg", bg_indices_key="bg",
            allow_smaller=True,
        )
        self.pad = mt.SpatialPadd(["image", "label"], spatial_size=size)
        slices = 2 * self.context + 1 if dims == 2 else 1  # 2D samples: each sequence's slices, consecutive
        channels = [name for name in cfg.preprocess.modalities for _ in range(slices)]
        self.augment = mt.Compose(augmentations(cfg.augment, dims, channels))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cfg.iterations_per_epoch * self.cfg.batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, index])
        if self.auxiliary and rng.random() < self.cfg.auxiliary.share:
            case = self.auxiliary[int(rng.integers(len(self.auxiliary)))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
        self.crop.set_random_state(seed=int(rng.integers(2**31)))
        self.augment.set_random_state(seed=int(rng.integers(2**31)))
        sample = {"image": case.image, "label": case.seg[None], "fg": case.fg, "bg": case.bg}
        sample = self.pad(self.crop(sample)[0])
        sample = {k: sample[k] for k in ("image", "label")}
        if self.thick is not None:
            self.thick.set_random_state(seed=int(rng.integers(2**31)))
            sample = self.thick(sample)
        if self.extra:
            sample = {k: np.asarray(v)[..., self.extra:-self.extra] for k, v in sample.items()}
        if case.flat:
            image = np.asarray(sample["image"])
            sample["image"] = np.repeat(image[..., self.context:self.context + 1], image.shape[-1], axis=-1)
        if self.cfg.model.spatial_dims == 2:  # (C, X, Y, 2k + 1) -> (C * (2k + 1), X, Y), as inference.slice_batch
            image = np.asarray(sample["image"])
            sample = {"image": np.moveaxis(image, -1, 1).reshape(-1, *image.shape[1:3]),
                      "label": np.asarray(sample["label"])[..., self.context]}
        sample = self.augment(sample)
        image = torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32)
        label = torch.as_tensor(np.asarray(sample["label"]), dtype=torch.long)
        return image, label


def write_split(path: Path, split: dict[str, list[str]]) -> None:
    path.write_text(json.dumps(split, indent=2))
