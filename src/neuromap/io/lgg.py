"""`LggSliceLayout`: LGG MRI Segmentation (Kaggle "kaggle_3m") patient folders, read as one volume per patient
and written back as slices.

A patient folder holds ``<prefix>_<N>.tif`` (rows x cols x 3 uint8: pre-contrast, FLAIR, post-contrast) and
``<prefix>_<N>_mask.tif`` (rows x cols uint8, 0/255 FLAIR abnormality). Slices are stacked in the order of the
integer N; lexicographic order would put 10 before 2 and scramble the volume.

Axis convention: a slice array is (rows, cols); the volume is X = row, Y = column, Z = position in the
slice order, so ``image[c, r, k, z]`` is pixel (r, k) of channel c in the z-th slice. `write_masks` inverts
exactly this. The pixel spacing and slice thickness are not stored in the files, so the reference grid has an
identity affine (1 x 1 x 1 "voxels") and ``spacing_known`` is False: reports give sizes in voxels, evaluation
gives HD95 in voxels.

Outputs: ``<case>/<slice stem>_pred_mask.tif`` (a folder per case, so a parent folder of patients keeps their
slices apart), a slice montage instead of three views (the slice spacing is unknown, so coronal and sagittal
views would be distorted), and the slice numbers with abnormality in the report. Evaluation pairs such a
folder with the patient folder slice by slice on N and also scores each slice in 2D.

Naming problems (orphans, duplicates, gaps, unknown names) are recorded at discovery in ``case.problems`` and
raised by `load` together with every other problem, so one broken patient does not stop discovery of the others.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case, ImageRef, Volume, visible_files
from neuromap.io.layout import LabelFile, LabelPair, Layout, Prediction
from neuromap.io.lgg_files import (
    PRED_NAME,
    PRED_SUFFIX,
    SLICE_NAME,
    TIF_SUFFIXES,
    predicted_mask_files,
    read_masks,
    read_tif,
    write_masks,
)
from neuromap.io.plausibility import check_sequence
from neuromap.labels import as_integral
from neuromap.pictures import montage_png

# The three channels of a kaggle_3m slice. Pre-contrast is T1-weighted and post-contrast is gadolinium T1, so
# they are exposed as t1 and t1ce; dict order is the package's canonical channel order (t1, t1ce, t2, flair).
CHANNELS: dict[str, int] = {"t1": 0, "t1ce": 2, "flair": 1}
FLAIR_CHANNEL = CHANNELS["flair"]


class LggSliceLayout(Layout):
    name = "lgg"
    description = "LGG slice folders"
    task = "binary"
    scored_as = ("binary",)
    label_key = "masks"
    spacing_known = False
    scores_slices = True

    # ------------------------------------------------------------------------------------- discovery

    def claims(self, folder: Path) -> bool:
        return any(p.suffix.lower() in TIF_SUFFIXES for p in folder.iterdir())

    def discover(self, folder: Path) -> list[Case]:
        return [self.case_from_folder(folder)]

    def case_from_folder(self, folder: Path) -> Case:
        """Describe one kaggle_3m patient folder without reading pixels: ``slices`` lists (N, image, mask or
        None) sorted by N; ``problems`` what `load` must report (orphan masks or images, duplicate numbers,
        gaps, unrecognised .tif names)."""
        folder = Path(folder)
        images: dict[int, list[Path]] = {}
        masks: dict[int, list[Path]] = {}
        prefixes: set[str] = set()
        unknown: list[str] = []
        for path in visible_files(folder):  # hidden files include macOS "._name.tif" forks, which are not images
            if path.suffix.lower() not in TIF_SUFFIXES:
                continue
            match = SLICE_NAME.match(path.name)
            if match is None:
                unknown.append(path.name)
                continue
            prefixes.add(match["prefix"])
            (masks if match["mask"] else images).setdefault(int(match["number"]), []).append(path)

        problems: list[str] = []
        if unknown:
            problems.append(
                f"{folder}: .tif files not named <case>_<N>.tif or <case>_<N>_mask.tif: {', '.join(unknown)}. "
                "Fix: move them out of the patient folder (predicted masks belong in a separate output folder)."
            )
        if len(prefixes) > 1:
            problems.append(
                f"{folder}: slices of more than one case (prefixes {', '.join(sorted(prefixes))}). "
                "Fix: put each patient's slices in its own folder."
            )
        for kind, found in (("image", images), ("mask", masks)):
            for number, paths in sorted(found.items()):
                if len(paths) > 1:
                    problems.append(
                        f"{folder}: slice {number} has {len(paths)} {kind} files "
                        f"({', '.join(p.name for p in paths)}). Fix: keep one."
                    )
        orphan_masks = [masks[n][0].name for n in sorted(masks) if n not in images]
        if orphan_masks:
            problems.append(
                f"{folder}: masks without their image: {', '.join(orphan_masks)}. "
                "Fix: restore the missing image slices or remove these masks."
            )
        if images:
            gaps = sorted(set(range(min(images), max(images) + 1)) - set(images) - set(masks))
            if gaps:
                problems.append(
                    f"{folder}: slice numbers {gaps} are missing between {min(images)} and {max(images)}, so the "
                    "stack would not be contiguous. Fix: restore the missing slices."
                )
        else:
            problems.append(f"{folder}: no image slices (<case>_<N>.tif) found.")

        return Case(
            case_id=folder.name, root=folder, images={m: ImageRef(folder, channel=c) for m, c in CHANNELS.items()},
            layout=self, naming="kaggle_3m", seg=ImageRef(folder) if masks else None, label_convention="binary",
            slices=[(n, images[n][0], masks[n][0] if n in masks else None) for n in sorted(images)],
            problems=problems,
        )

    # ------------------------------------------------------------------------------------- loading

    def load(self, case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> Volume:
        """Stack every slice into image (C, rows, cols, N) and seg (rows, cols, N).

        Every slice must be readable, rows x cols x 3 uint8 with one common size; masks 2D of that size and
        binary. Channels that are exact copies of FLAIR (the dataset's stand-in for a missing sequence) are
        named in the volume's warnings, so a reader knows a model input is not the real sequence.
        """
        modalities = list(modalities or case.modalities)
        missing = [m for m in modalities if m not in CHANNELS]
        if missing:
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): LGG slices hold only pre-contrast (t1), FLAIR and "
                f"post-contrast (t1ce); {missing} requested. Fix: choose a model that needs only t1, t1ce and/or "
                "flair."
            )
        problems = list(case.problems)
        want_seg = case.seg is not None and with_seg is not False
        if with_seg and case.seg is None:
            problems.append(
                f"case '{case.case_id}': no segmentation (expected <case>_<N>_mask.tif next to the slices)."
            )
        if want_seg:
            unmasked = [image.name for _, image, mask in case.slices if mask is None]
            if unmasked:
                problems.append(
                    f"{case.root}: images without their mask: {', '.join(unmasked)}. "
                    "Fix: restore the missing masks, or load without the segmentation."
                )

        size: tuple[int, int] | None = None
        arrays: list[np.ndarray] = []
        for _, image_path, _ in case.slices:
            try:
                image = read_tif(image_path)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise NeuroMapError(
                        f"{image_path}: shape {image.shape} {image.dtype}; expected rows x cols x 3 uint8 "
                        "(pre-contrast, FLAIR, post-contrast). Fix: use the original kaggle_3m slice."
                    )
                size = size or image.shape[:2]
                if image.shape[:2] != size:
                    raise NeuroMapError(f"{image_path}: size {image.shape[:2]} differs from the first slice {size}.")
                arrays.append(image)
            except NeuroMapError as exc:
                problems.append(str(exc))
        seg = None
        if want_seg:
            try:
                seg = read_masks({n: mask for n, _, mask in case.slices if mask is not None}, size)
            except NeuroMapError as exc:
                problems.append(str(exc))
        if problems:
            raise NeuroMapError("\n".join(problems))

        stack = np.stack(arrays, axis=-1)  # (rows, cols, 3, N) uint8
        warnings = self._warnings(stack, modalities)
        # Each channel alone is judged by the rules every loader uses (empty, constant, a mask saved as a slice,
        # saturated); not pairwise, since FLAIR copies standing in for a missing sequence are the dataset's own
        # convention and `_warnings` names them.
        for m in modalities:
            findings = check_sequence(stack[:, :, CHANNELS[m]], m, f"case '{case.case_id}' ({case.root}), {m} channel")
            problems += findings.problems
            warnings += findings.warnings
        if problems:
            raise NeuroMapError("\n".join(problems))
        image = stack[:, :, [CHANNELS[m] for m in modalities]].transpose(2, 0, 1, 3).astype(np.float32)
        # A zero-strided view gives the reference its shape without allocating a volume nobody reads.
        reference = nib.Nifti1Image(np.broadcast_to(np.uint8(0), stack.shape[:2] + stack.shape[3:]), np.eye(4))
        reference.header["descrip"] = b"LGG kaggle_3m slices: spacing unknown, units are voxels"
        return Volume(case=case, image=image, modalities=modalities, reference=reference, seg=seg,
                      spacing_known=False, warnings=warnings)

    @staticmethod
    def _warnings(stack: np.ndarray, modalities: list[str]) -> list[str]:
        """Unknown spacing, and channels that are copies of FLAIR among those ``modalities`` (the model's) read."""
        warnings = ["pixel spacing unknown: volumes in voxels"]
        flair = stack[:, :, FLAIR_CHANNEL]
        copies = [m for m, c in CHANNELS.items() if c != FLAIR_CHANNEL and np.array_equal(stack[:, :, c], flair)]
        if copies:
            used = [m for m in copies if m in modalities]
            warnings.append(
                f"the {', '.join(copies)} channel(s) are copies of FLAIR (sequence missing in the dataset); "
                + (f"the model read {', '.join(used)} as if it were real" if used else "the model does not use them")
            )
        return warnings

    def read_sequence(self, case: Case, modality: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        raise NeuroMapError(
            f"case '{case.case_id}' ({case.root}): --raw prepares 3D scans (NIfTI files or DICOM series); this is a "
            "folder of 2D slice images with no geometry to register. Fix: leave out --raw."
        )

    # ------------------------------------------------------------------------------------- outputs

    def mask_paths(self, case: Case, out_dir: Path) -> list[Path]:
        """Where each slice's predicted mask goes: ``out_dir/<slice stem>_pred_mask.tif``, in slice order.

        The input folder is refused so ground-truth masks and images can never be overwritten, nor predictions
        mixed into a patient folder (where discovery would reject them as unknown names).
        """
        out_dir = Path(out_dir)
        if out_dir.resolve() == Path(case.root).resolve():
            raise NeuroMapError(
                f"{out_dir}: is the input folder of case '{case.case_id}'. Fix: choose a separate output folder."
            )
        return [out_dir / f"{image.stem}{PRED_SUFFIX}" for _, image, _ in case.slices]

    def write_masks(self, labels: np.ndarray, case: Case, out_dir: Path, overwrite: bool = False,
                    stack: contextlib.ExitStack | None = None) -> list[Path]:
        """Write one mask per slice (see `neuromap.io.lgg_files.write_masks`); internal labels 1-3 all count as
        abnormality, as whole tumour is what the FLAIR masks delineate."""
        targets = self.mask_paths(case, out_dir)
        labels = as_integral(labels, source=f"predicted labels for '{case.case_id}'")
        rows, cols = read_tif(case.slices[0][1]).shape[:2]
        if labels.shape != (rows, cols, len(targets)):
            expected = (rows, cols, len(targets))
            raise ValueError(f"label shape {labels.shape} does not match the case's slices {expected}")
        return write_masks(labels, targets, Path(out_dir), overwrite, stack)

    def output_files(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> dict[str, Path]:
        return {self.label_key: out / case.case_id,
                **{k: out / f"{case.case_id}_{k}" for k in ("report.json", "overlay.png")}}

    def planned_writes(self, case: Case, out: Path, optional: tuple[str, ...] = ()) -> list[Path]:
        files = self.output_files(case, out)
        return [*self.mask_paths(case, files[self.label_key]), files["report.json"], files["overlay.png"]]

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        self.write_masks(prediction.internal, prediction.case, files[self.label_key], overwrite, stack=stack)

    def report_extra(self, prediction: Prediction) -> dict:
        numbers = [n for n, _, _ in prediction.case.slices]
        present = prediction.internal.any(axis=(0, 1))
        return {"slices": {"count": len(numbers),
                           "with_abnormality": [n for n, p in zip(numbers, present, strict=True) if p]}}

    def picture(self, prediction: Prediction, background: np.ndarray, title: str,
                radiological: bool = True) -> tuple[bytes, list[str]]:
        """Ground-truth masks, when the folder has them, are outlined; they are read again here (small files)
        because segmentation itself must not depend on them: a folder with some masks missing still segments.
        The .tif slices store no orientation, so they are drawn as stored whatever ``radiological`` says."""
        case, truth, notes = prediction.case, None, []
        if case.seg is not None:
            try:
                truth = self.load(case, ["flair"], with_seg=True).seg
            except NeuroMapError as exc:
                notes.append(f"ground-truth masks not drawn in the overlay: {str(exc).splitlines()[0]}")
        names = [f"slice {n}" for n, _, _ in case.slices]
        task = prediction.task
        png = montage_png(background, prediction.internal, names, title, task.legend, task.colours, truth)
        return png, notes

    # ------------------------------------------------------------------------------------- labels back

    def label_files(self, root: Path, predicted: bool) -> list[LabelFile]:
        """Predictions: case folders of ``<slice>_pred_mask.tif``. Ground truth: patient folders (``root`` itself
        or those below it) that hold masks."""
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if predicted:
            return [LabelFile(sub.name, sub, self, "binary") for sub in folders
                    if any(PRED_NAME.match(p.name) for p in sub.iterdir())]
        patients = [root] if self.claims(root) else [sub for sub in folders if self.claims(sub)]
        cases = [self.case_from_folder(folder) for folder in patients]
        return [LabelFile(c.case_id, c.root, self, "binary") for c in cases if c.seg is not None]

    def _truth_masks(self, folder: Path) -> dict[int, Path]:
        case = self.case_from_folder(folder)
        if case.problems:
            raise NeuroMapError("\n".join(case.problems))
        return {n: mask for n, _, mask in case.slices if mask is not None}

    def check_pair(self, pred: LabelFile, truth: LabelFile) -> None:
        """The same slice numbers on both sides (sizes are checked when read)."""
        pred_numbers, gt_numbers = set(predicted_mask_files(pred.path)), set(self._truth_masks(truth.path))
        if pred_numbers != gt_numbers:
            raise NeuroMapError(
                f"slice mismatch for case '{truth.case_id}': prediction {pred.path} lacks slices "
                f"{sorted(gt_numbers - pred_numbers)}, ground truth {truth.path} lacks masks for slices "
                f"{sorted(pred_numbers - gt_numbers)}. Fix: segment the complete patient folder."
            )

    def read_pair(self, pred: LabelFile, truth: LabelFile, pred_labels: str, gt_labels: str, task) -> LabelPair:
        """Binary (rows, cols, N) stacks; the masks are binary by format, so conventions do not apply."""
        self.check_pair(pred, truth)
        gt_files = self._truth_masks(truth.path)
        gt_arr = read_masks(gt_files)
        pred_arr = read_masks(predicted_mask_files(pred.path))
        if pred_arr.shape != gt_arr.shape:
            raise NeuroMapError(
                f"shape mismatch for case '{truth.case_id}': predicted masks in {pred.path} are {pred_arr.shape[:2]}, "
                f"ground-truth masks in {truth.path} {gt_arr.shape[:2]}. Fix: predict on the original slices."
            )
        return LabelPair(pred_arr, gt_arr, None, {"prediction": "binary", "ground_truth": "binary"}, list(gt_files))
