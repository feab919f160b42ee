"""`NiftiLayout`: cases made of NIfTI files, in every naming the package understands.

Namings: BraTS 2018-2021 (``<id>_t1ce.nii.gz``), BraTS 2023+ (``<id>-t1c.nii.gz``), BraTS-Toolkit
(``<id>_fla.nii.gz``), plain names (``flair.nii.gz``), MSD Task01 (4D image + dataset.json), and an explicit
mapping (modality -> file). Outputs are ``<case>_seg.nii.gz`` in the input's exact grid (header copied bit for
bit), the report and a three-view overlay. Label files read back for evaluation are NIfTIs named
``<case_id>_seg.nii.gz`` (what ``neuromap segment`` writes), ``<case_id>.nii.gz``, or case folders holding one
label map; the id of a label file is its name without the NIfTI extension and a trailing ``_seg``, ``-seg`` or
``_pred``, the id of a case folder is the folder name.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.config import MODALITIES, MODALITY_ALIASES, canonical_modality
from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.case import (
    MASK_TOKENS,
    SEG_TOKENS,
    Case,
    ImageRef,
    Volume,
    image_token,
    nifti_stem,
    split_name_token,
    unusable_entry,
    visible_files,
)
from neuromap.io.header_checks import grid_difference, header_warnings
from neuromap.io.layout import MAP_OUTPUTS, LabelFile, LabelPair, Layout, Prediction
from neuromap.io.nifti_files import AFFINE_TOLERANCE, open_nifti, read_nifti, spatial_shape
from neuromap.io.plausibility import check_distinct_files, check_sequences
from neuromap.labels import guess_convention, to_internal
from neuromap.pictures import overlay_png

# Tokens that mark the BraTS 2023 naming; used to choose the label convention of a `-seg` file.
BRATS2023_TOKENS = {"t1n", "t1c", "t2w", "t2f"}
LABEL_SUFFIXES = ("_seg", "-seg", "_pred")


def nifti_files(folder: Path) -> list[Path]:
    return [p for p in visible_files(folder) if nifti_stem(p)]


def case_id_of(path: Path) -> str:
    """'Brats18_x_1_seg.nii.gz' -> 'Brats18_x_1': the name without NIfTI extension and label suffix."""
    stem = nifti_stem(path) or path.name
    for suffix in LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def is_mri_image(path: Path) -> bool:
    """True for an MRI sequence file (t1, t1ce, flair, ... in any supported naming), i.e. not a label map."""
    return split_name_token(nifti_stem(path) or "")[1] in MODALITY_ALIASES


def _refuse_unusable(folder: Path, images: dict[str, ImageRef], seg: ImageRef | None) -> None:
    """A sequence or label file that is named as one but cannot be read (broken link, folder, other format) is an
    error naming it, unless a readable file already provides the same role: otherwise the user would only hear
    that the sequence is missing, or a model would be chosen without it."""
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        token = image_token(entry)
        role = "seg" if token in SEG_TOKENS else canonical_modality(token) if token in MODALITY_ALIASES else None
        provided = seg is not None if role == "seg" else role in images
        if role is None or provided or (reason := unusable_entry(entry)) is None:
            continue
        what = "label map" if role == "seg" else f"{role} sequence"
        raise NeuroMapError(
            f"{entry}: named as the {what} but {reason}. Fix: put the {what} there as a NIfTI file (.nii.gz), "
            "or remove the entry."
        )


class NiftiLayout(Layout):
    name = "nifti"
    description = "label NIfTIs"
    task = "brats"
    scored_as = ("brats", "binary")
    label_key = "seg.nii.gz"
    optional_outputs = MAP_OUTPUTS

    # ------------------------------------------------------------------------------------- discovery

    def claims(self, folder: Path) -> bool:
        return (folder / "dataset.json").is_file() or any(nifti_stem(p) for p in folder.iterdir())

    def discover(self, folder: Path) -> list[Case]:
        return self.msd_cases(folder) if (folder / "dataset.json").is_file() else [self.case_from_folder(folder)]

    def case_from_folder(self, folder: Path) -> Case:
        """A Case from a folder of NIfTI files in any supported naming."""
        images: dict[str, ImageRef] = {}
        seg: ImageRef | None = None
        mask: Path | None = None
        prefixes: set[str] = set()
        tokens: set[str] = set()
        unknown: list[str] = []
        for path in nifti_files(folder):
            prefix, token = split_name_token(nifti_stem(path))
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
        _refuse_unusable(folder, images, seg)
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
            naming, convention = "brats-toolkit", None
        elif prefix and tokens & BRATS2023_TOKENS:
            naming, convention = "brats2023", "brats2023"
        else:
            naming, convention = ("brats" if prefix else "plain"), None
        return Case(case_id=prefix or folder.name, root=folder, images=images, layout=self, naming=naming, seg=seg,
                    label_convention=convention, brain_mask=mask)

    def case_from_mapping(self, mapping: dict[str, Path], case_id: str | None = None) -> Case:
        """An explicit mapping {modality or 'seg'/'mask': existing file} (see `neuromap.io.inputs`)."""
        images: dict[str, ImageRef] = {}
        seg = mask = None
        for key, path in mapping.items():
            if not Path(path).is_file():
                what = "is not a regular file" if Path(path).exists() else "does not exist"
                raise NeuroMapError(f"{path}: file given for '{key}' {what}. Fix: check the mapping.")
            if key.lower() in SEG_TOKENS:
                seg = ImageRef(Path(path))
            elif key.lower() in MASK_TOKENS:
                mask = Path(path)
            else:
                images[canonical_modality(key)] = ImageRef(Path(path))
        if not images:
            raise NeuroMapError("the modality mapping names no image (need e.g. t1ce=FILE flair=FILE).")
        first = next(iter(images.values())).path
        return Case(case_id=case_id or (nifti_stem(first) or first.stem), root=first.parent, images=images,
                    layout=self, naming="mapping", seg=seg, brain_mask=mask)

    def msd_cases(self, root: Path) -> list[Case]:
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
                    case_id=stem, root=root, images={m: ImageRef(path, c) for m, c in channels.items()}, layout=self,
                    naming="msd", seg=ImageRef(label) if label.is_file() else None, label_convention="msd",
                ))
        if not cases:
            raise NeuroMapError(f"{root}: dataset.json found but no images under imagesTr/ or imagesTs/.")
        return cases

    # ------------------------------------------------------------------------------------- loading

    def load(self, case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> Volume:
        """Every requested modality present, each from its own file, 3D, on one voxel grid, and a plausible MRI
        sequence (`neuromap.io.plausibility`); segmentation (if any) integral with known labels; brain mask (if
        any) of the same shape and not empty."""
        modalities = list(modalities or case.modalities)
        problems: list[str] = []
        self.require(case, modalities)
        refs = [case.images[m] for m in modalities]
        check_distinct_files(dict(zip(modalities, refs, strict=True)))
        headers = self._headers(case, modalities)
        first = headers[0]
        shape0 = spatial_shape(first, refs[0])
        for ref, img in zip(refs, headers, strict=True):
            shape = spatial_shape(img, ref)
            if len(shape) != 3:
                problems.append(f"{ref}: image is {len(shape)}D with shape {shape}; a 3D volume is required.")
        if off_grid := _off_grid(refs, headers):
            problems.append(
                f"case '{case.case_id}' ({case.root}): the sequences are on different voxel grids (raw scans, not "
                "co-registered):\n  " + "\n  ".join(off_grid) + "\nFix: run with --raw (co-registration, brain "
                "extraction and resampling to 1 mm; Python: raw=True), or co-register the sequences to one grid "
                "yourself."
            )
        seg_img = None
        if case.seg is not None and with_seg is not False:
            seg_img = open_nifti(case.seg, "segmentation")
            if spatial_shape(seg_img, case.seg) != shape0:
                problems.append(f"{case.seg}: segmentation shape {seg_img.shape} differs from the images {shape0}.")
        elif with_seg:
            problems.append(
                f"case '{case.case_id}': no segmentation file (expected a *_seg.nii.gz next to the images)."
            )
        if problems:
            raise NeuroMapError("\n".join(problems))

        # gzip decompression releases the GIL, so the sequences are read in parallel threads (~2x on 2 cores).
        with ThreadPoolExecutor(max_workers=min(4, len(refs))) as pool:
            channels = list(pool.map(read_nifti, headers, refs))
        findings = check_sequences(channels, modalities, [str(r) for r in refs])
        problems += findings.problems
        seg = None
        if seg_img is not None:
            raw = read_nifti(seg_img, case.seg, integral=True)
            try:
                convention = case.label_convention or guess_convention(np.unique(raw))
                seg = to_internal(raw, convention, source=str(case.seg))
            except NeuroMapError as exc:
                problems.append(str(exc))
        brain_mask = None
        if case.brain_mask is not None:
            mask_ref = ImageRef(case.brain_mask)
            mask_img = open_nifti(mask_ref, "brain mask")
            if spatial_shape(mask_img, mask_ref) != shape0:
                problems.append(
                    f"{case.brain_mask}: brain mask shape {mask_img.shape} differs from the images {shape0}."
                )
            else:
                brain_mask = read_nifti(mask_img, mask_ref, integral=True) > 0
                if not brain_mask.any():
                    problems.append(f"{case.brain_mask}: brain mask is empty.")
        if problems:
            raise NeuroMapError("\n".join(problems))
        doubtful = header_warnings({ref.path: img for ref, img in zip(refs, headers, strict=True)})
        return Volume(case=case, image=np.stack(channels).astype(np.float32, copy=False), modalities=modalities,
                      reference=first, seg=seg, brain_mask=brain_mask, warnings=[*doubtful, *findings.warnings])

    def off_grid(self, case: Case, modalities: list[str]) -> list[str]:
        """3D sequences whose grid differs from the first one's (see `Layout.off_grid`)."""
        self.require(case, modalities)
        return _off_grid([case.images[m] for m in modalities], self._headers(case, modalities))

    @staticmethod
    def _headers(case: Case, modalities: list[str]) -> list[nib.Nifti1Image]:
        return [open_nifti(case.images[m], f"{m} image") for m in modalities]

    def read_sequence(self, case: Case, modality: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        self.require(case, [modality])
        ref = case.images[modality]
        image = open_nifti(ref, f"{modality} image")
        spatial_shape(image, ref)  # a 4D file is accepted only as one channel (MSD)
        return read_nifti(image, ref), image

    # ------------------------------------------------------------------------------------- outputs

    def output_files(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> dict[str, Path]:
        keys = (self.label_key, "report.json", "overlay.png", *(k for k in self.optional_outputs if k in optional))
        return {k: out / f"{case.case_id}_{k}" for k in keys}

    def planned_writes(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> list[Path]:
        return list(self.output_files(case, out, optional).values())

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        nib.save(prediction.labels, str(stack.enter_context(atomic_path(files[self.label_key], overwrite))))

    def picture(self, prediction: Prediction, background: np.ndarray, title: str,
                radiological: bool = True) -> tuple[bytes, list[str]]:
        """Axial, coronal and sagittal views through the tumour centre, in RAS at input resolution, titled with
        their positions in mm and slice numbers in the file, with the headline volumes."""
        task, reference = prediction.task, prediction.volume.reference
        ras_affine = reference.affine @ nib.orientations.inv_ornt_aff(nib.io_orientation(reference.affine),
                                                                       reference.shape[:3])
        voxels = task.volume_voxels(prediction.internal)
        volumes = " · ".join(f"{key} {voxels[key] * prediction.volume.voxel_ml:.1f} mL" for key in task.headline)
        return overlay_png(prediction.ras(background), prediction.ras(prediction.internal), prediction.ras_spacing,
                           title, task.legend, task.colours, ras_affine=ras_affine, file_affine=reference.affine,
                           volumes_text=volumes, radiological=radiological), []

    # ------------------------------------------------------------------------------------- labels back

    def label_files(self, root: Path, predicted: bool) -> list[LabelFile]:
        """Predictions: NIfTIs directly in ``root`` and one label map per case folder. Ground truth: the same,
        except that a folder with MRI images is a case (its segmentation file counts, with the label
        convention its naming fixes) and an MSD task gives its labelsTr."""
        if not predicted and self._has_images(root):
            return self._truth_of(root)
        found = [LabelFile(case_id_of(p), p, self) for p in nifti_files(root)]
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not predicted and self._has_images(sub):
                found += self._truth_of(sub)
                continue
            labels = [p for p in nifti_files(sub) if case_id_of(p) != nifti_stem(p)]
            if len(labels) > 1:
                raise NeuroMapError(
                    f"{sub}: several label maps ({', '.join(p.name for p in labels)}). "
                    "Fix: keep one *_seg.nii.gz per case folder."
                )
            found += [LabelFile(sub.name, p, self) for p in labels]
        return found

    def _has_images(self, folder: Path) -> bool:
        return (folder / "dataset.json").is_file() or any(is_mri_image(p) for p in nifti_files(folder))

    def _truth_of(self, folder: Path) -> list[LabelFile]:
        cases = [c for c in self.discover(folder) if c.seg is not None]
        for case in cases:
            if case.seg.channel is not None:
                raise NeuroMapError(
                    f"{case.seg}: a 4D label file is not supported. Fix: give one 3D label map per case."
                )
        return [LabelFile(c.case_id, c.seg.path, self, c.label_convention) for c in cases]

    def check_pair(self, pred: LabelFile, truth: LabelFile) -> None:
        self._grid(pred, truth)

    def _grid(self, pred: LabelFile, truth: LabelFile) -> tuple[float, ...]:
        """Check from the headers that the prediction lies on the ground truth's voxel grid; the voxel size in mm.

        Shape and voxel size must match (within AFFINE_TOLERANCE). A different affine with the same shape and
        voxel size (e.g. another origin or axis flip) is only warned about: metrics compare the arrays voxel by
        voxel."""
        pred_img, gt_img = open_nifti(pred.path, "prediction"), open_nifti(truth.path, "ground truth")
        pred_shape, gt_shape = spatial_shape(pred_img, ImageRef(pred.path)), spatial_shape(gt_img, ImageRef(truth.path))
        if pred_shape != gt_shape:
            raise NeuroMapError(
                f"shape mismatch for case '{truth.case_id}': prediction {pred.path} is {pred_shape}, ground truth "
                f"{truth.path} is {gt_shape}. Fix: write predictions in the ground truth's voxel grid."
            )
        ndim = len(gt_shape)
        zooms_gt = tuple(float(z) for z in gt_img.header.get_zooms()[:ndim])
        zooms_pred = tuple(float(z) for z in pred_img.header.get_zooms()[:ndim])
        if not np.allclose(zooms_pred, zooms_gt, atol=AFFINE_TOLERANCE, rtol=0):
            raise NeuroMapError(
                f"voxel size mismatch for case '{truth.case_id}': prediction {pred.path} has {zooms_pred} mm, "
                f"ground truth {truth.path} has {zooms_gt} mm. Fix: resample the prediction to the ground-truth grid."
            )
        if difference := grid_difference(pred_img, gt_img, pred_shape, gt_shape, AFFINE_TOLERANCE):
            warnings.warn(
                f"case '{truth.case_id}': the prediction {pred.path} is not placed where the ground truth is "
                f"({difference}); voxels are compared as stored, so the metrics say how the arrays agree, not "
                "where the prediction lies in the patient.", stacklevel=3,
            )
        return zooms_gt

    def read_pair(self, pred: LabelFile, truth: LabelFile, pred_labels: str, gt_labels: str, task) -> LabelPair:
        spacing = self._grid(pred, truth)
        arrays, conventions = [], {}
        for side, item, requested in (("prediction", pred, pred_labels), ("ground_truth", truth, gt_labels)):
            raw = read_nifti(open_nifti(item.path, "label map"), ImageRef(item.path), integral=True)
            labels, conventions[side] = task.read_labels(
                raw, item.convention if requested == "auto" else requested, str(item.path)
            )
            arrays.append(labels)
        return LabelPair(arrays[0], arrays[1], spacing, conventions)


def _off_grid(refs: list[ImageRef], headers: list[nib.Nifti1Image]) -> list[str]:
    """One line per 3D image whose voxel grid differs from the first image's (non-3D images are refused apart)."""
    first_ref, first = refs[0], headers[0]
    shape0 = spatial_shape(first, first_ref)
    lines = []
    for ref, img in zip(refs, headers, strict=True):
        shape = spatial_shape(img, ref)
        if len(shape) == 3 and (difference := grid_difference(img, first, shape, shape0, AFFINE_TOLERANCE)):
            lines.append(f"{ref}: voxel grid differs from {first_ref.path.name}: {difference}")
    return lines
