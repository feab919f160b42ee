"""Case discovery: map files in the supported layouts to canonical modalities.

Layouts: BraTS 2018-2021 (``<id>_t1ce.nii.gz``), BraTS 2023+ (``<id>-t1c.nii.gz``), BraTS-Toolkit
(``<id>_fla.nii.gz``), plain names (``flair.nii.gz``), MSD Task01 (4D image + dataset.json), LGG kaggle_3m
slice folders (see ``neuromap.io.lgg``), DICOM studies (see ``neuromap.io.dicom``), and an explicit user
mapping (modality -> file).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from neuromap.config import MODALITIES, MODALITY_ALIASES, canonical_modality
from neuromap.errors import NeuroMapError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_TOKENS = {"seg", "label", "labels", "segmentation", "gt"}
MASK_TOKENS = {"brainmask", "mask"}
# Tokens that mark the BraTS 2023 naming; used to choose the label convention of a `-seg` file.
BRATS2023_TOKENS = {"t1n", "t1c", "t2w", "t2f"}


@dataclass(frozen=True)
class ImageRef:
    """A NIfTI file, or one channel of a 4D NIfTI (MSD)."""

    path: Path
    channel: int | None = None

    def __str__(self) -> str:
        return f"{self.path}[channel {self.channel}]" if self.channel is not None else str(self.path)


@dataclass
class Case:
    """One patient's files; nothing is read until `neuromap.io.load_case`."""

    case_id: str
    root: Path
    images: dict[str, ImageRef]
    seg: ImageRef | None = None
    layout: str = "plain"
    label_convention: str | None = None  # None: guessed from the label values when read
    brain_mask: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.images)


def nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def split_name_token(stem: str) -> tuple[str, str]:
    """'Brats18_x_1_t1ce' -> ('Brats18_x_1', 't1ce'); 'flair' -> ('', 'flair')."""
    match = re.match(r"^(.*?)[_\-.]([A-Za-z0-9]+)$", stem)
    if match:
        return match.group(1), match.group(2).lower()
    return "", stem.lower()


def case_from_folder(folder: Path, mapping: dict[str, str | Path] | None = None) -> Case:
    """Build a Case from a folder of NIfTI files (any supported naming), or from an explicit mapping."""
    folder = Path(folder)
    if mapping:
        return case_from_mapping(mapping, base=folder)
    images: dict[str, ImageRef] = {}
    seg: ImageRef | None = None
    mask: Path | None = None
    prefixes: set[str] = set()
    tokens: set[str] = set()
    unknown: list[str] = []
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path)
        if stem is None or path.name.startswith("."):
            continue
        prefix, token = split_name_token(stem)
        if token in SEG_TOKENS:
            seg = ImageRef(path)
        elif token in MASK_TOKENS:
            mask = path
        elif token in MODALITY_ALIASES:
            modality = canonical_modality(token)
            if modality in images:
                raise NeuroMapError(
                    f"{folder}: two files map to modality '{modality}': {images[modality].path.name} and "
                    f"{path.name}. Fix: remove one, or give an explicit mapping (--map t1ce=FILE ...)."
                )
            images[modality] = ImageRef(path)
            tokens.add(token)
            prefixes.add(prefix)
        else:
            unknown.append(path.name)
    if not images:
        hint = f" (unrecognised NIfTI names: {', '.join(unknown[:6])})" if unknown else ""
        raise NeuroMapError(
            f"{folder}: no MRI sequence found{hint}. Expected names ending in t1, t1ce/t1c, t2, flair "
            "(BraTS, BraTS 2023, BraTS-Toolkit or plain naming). Fix: rename the files or pass a mapping "
            "(--map t1=FILE t1ce=FILE ...)."
        )
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    images = {m: images[m] for m in MODALITIES if m in images}  # canonical channel order
    if "fla" in tokens:  # BraTS-Toolkit also writes _t1c, so check its _fla first
        layout, convention = "brats-toolkit", None
    elif prefix and tokens & BRATS2023_TOKENS:
        layout, convention = "brats2023", "brats2023"
    elif prefix:
        layout, convention = "brats", None
    else:
        layout, convention = "plain", None
    return Case(
        case_id=prefix or folder.name, root=folder, images=images, seg=seg, layout=layout,
        label_convention=convention, brain_mask=mask,
    )


def case_from_mapping(mapping: dict[str, str | Path], base: Path | None = None, case_id: str | None = None) -> Case:
    """Explicit mapping {modality or 'seg'/'mask': path}; relative paths are taken from ``base``."""
    images: dict[str, ImageRef] = {}
    seg = mask = None
    for key, value in mapping.items():
        path = Path(value)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        if not path.is_file():
            raise NeuroMapError(f"{path}: file given for '{key}' does not exist. Fix: check the mapping.")
        if key.lower() in SEG_TOKENS:
            seg = ImageRef(path)
        elif key.lower() in MASK_TOKENS:
            mask = path
        else:
            images[canonical_modality(key)] = ImageRef(path)
    if not images:
        raise NeuroMapError("the modality mapping names no image (need e.g. t1ce=FILE flair=FILE).")
    first = next(iter(images.values())).path
    return Case(
        case_id=case_id or (nifti_stem(first) or first.stem), root=first.parent, images=images, seg=seg,
        layout="mapping", brain_mask=mask,
    )


def duplicate_ids(cases: list[Case]) -> list[str]:
    """Case ids that occur more than once (their outputs or splits would collide)."""
    counts = Counter(c.case_id for c in cases)
    return sorted(i for i, n in counts.items() if n > 1)


def read_mapping_file(path: str | Path) -> dict[str, str]:
    """A small YAML file: ``t1: a.nii.gz`` lines (relative paths are relative to the YAML file)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise NeuroMapError(f"{path}: cannot read modality mapping ({exc}).") from None
    if not isinstance(data, dict):
        raise NeuroMapError(f"{path}: mapping must be 'modality: file' lines, e.g. 't1ce: scan_t1c.nii.gz'.")
    return {str(k): str(path.parent / v) if not Path(str(v)).is_absolute() else str(v) for k, v in data.items()}


def msd_cases(root: Path) -> list[Case]:
    """Medical Segmentation Decathlon Task01: imagesTr/imagesTs 4D volumes, labelsTr, dataset.json."""
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
        modality_names = meta["modality"] if "modality" in meta else meta["channel_names"]
    except (OSError, ValueError, KeyError) as exc:
        raise NeuroMapError(f"{meta_path}: not a readable MSD dataset.json ({exc}).") from None
    channels = {canonical_modality(name): int(idx) for idx, name in modality_names.items()}
    cases = []
    for sub in ("imagesTr", "imagesTs"):
        for path in sorted((root / sub).glob("*.nii*")):
            stem = nifti_stem(path)
            if stem is None or path.name.startswith("."):
                continue
            label = root / "labelsTr" / path.name
            cases.append(Case(
                case_id=stem, root=root, images={m: ImageRef(path, c) for m, c in channels.items()},
                seg=ImageRef(label) if label.is_file() else None, layout="msd", label_convention="msd",
            ))
    if not cases:
        raise NeuroMapError(f"{root}: dataset.json found but no images under imagesTr/ or imagesTs/.")
    return cases


def _is_lgg_folder(folder: Path) -> bool:
    return any(p.suffix.lower() in (".tif", ".tiff") for p in folder.iterdir())


def discover_cases(root: str | Path) -> list[Case]:
    """Find all cases under ``root``: a case folder itself, an MSD task, or a folder of case folders."""
    root = Path(root)
    if not root.exists():
        raise NeuroMapError(f"{root}: no such file or folder.")
    if root.is_file():
        raise NeuroMapError(
            f"{root}: is a file; give the case folder, or files with an explicit mapping (--map t1ce=FILE ...)."
        )
    if (root / "dataset.json").is_file():
        return msd_cases(root)
    if any(nifti_stem(p) for p in root.iterdir()):
        return [case_from_folder(root)]
    if _is_lgg_folder(root):
        from neuromap.io.lgg import lgg_case

        return [lgg_case(root)]
    cases: list[Case] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "dataset.json").is_file():
            cases.extend(msd_cases(sub))
        elif any(nifti_stem(p) for p in sub.iterdir()):
            cases.append(case_from_folder(sub))
        elif _is_lgg_folder(sub):
            from neuromap.io.lgg import lgg_case

            cases.append(lgg_case(sub))
    if not cases:
        from neuromap.io.dicom import dicom_cases, is_dicom_tree

        if is_dicom_tree(root):
            return dicom_cases(root)
        raise NeuroMapError(
            f"{root}: no cases found (no NIfTI files, MSD dataset.json or LGG .tif slices here or one level "
            "below, no DICOM files). Fix: point to a case folder, a folder of case folders or a DICOM study."
        )
    return cases
