"""LGG MRI Segmentation (Kaggle "kaggle_3m") slice folders: read them as one volume, write masks back as slices.

A patient folder holds ``<prefix>_<N>.tif`` (rows x cols x 3 uint8: pre-contrast, FLAIR, post-contrast) and
``<prefix>_<N>_mask.tif`` (rows x cols uint8, 0/255 FLAIR abnormality). Slices are stacked in the order of the
integer N; lexicographic order would put 10 before 2 and scramble the volume.

Axis convention: a slice array is (rows, cols); the volume is X = row, Y = column, Z = position in the
slice order, so ``image[c, r, k, z]`` is pixel (r, k) of channel c in the z-th slice. `write_lgg_masks`
inverts exactly this. The pixel spacing and slice thickness are not stored in the files, so the reference
grid has an identity affine (1 x 1 x 1 "voxels"), and ``case.extra["spacing_known"]`` is False so reports
can give sizes in voxels instead of millilitres.

Files are read with tifffile, which handles both the uncompressed original download and zlib-compressed
copies. Naming problems (orphans, duplicates, gaps, unknown names) are recorded at discovery and raised by
`load_lgg` together with every other problem, so one broken patient does not stop discovery of the others.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile

from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.cases import Case, ImageRef
from neuromap.io.nifti import Volume
from neuromap.labels import as_integral

# The three channels of a kaggle_3m slice. Pre-contrast is T1-weighted and post-contrast is gadolinium T1, so
# they are exposed as t1 and t1ce; dict order is the package's canonical channel order (t1, t1ce, t2, flair).
CHANNELS: dict[str, int] = {"t1": 0, "t1ce": 2, "flair": 1}
FLAIR_CHANNEL = CHANNELS["flair"]
SLICE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
PRED_SUFFIX = "_pred_mask.tif"
PRED_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)_pred_mask\.tiff?$", re.IGNORECASE)

Slice = tuple[int, Path, Path | None]  # (slice number, image file, mask file or None)


def lgg_case(folder: Path) -> Case:
    """Describe one kaggle_3m patient folder without reading pixels.

    ``extra["slices"]`` lists (N, image, mask or None) sorted by N; ``extra["naming_problems"]`` holds what
    `load_lgg` must report (orphan masks or images, duplicate numbers, gaps, unrecognised .tif names).
    """
    folder = Path(folder)
    images: dict[int, list[Path]] = {}
    masks: dict[int, list[Path]] = {}
    prefixes: set[str] = set()
    unknown: list[str] = []
    for path in sorted(folder.iterdir()):
        # Hidden files include macOS "._name.tif" resource forks, which are not images.
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in (".tif", ".tiff"):
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
                    f"{folder}: slice {number} has {len(paths)} {kind} files ({', '.join(p.name for p in paths)}). "
                    "Fix: keep one."
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

    slices: list[Slice] = [(n, images[n][0], masks[n][0] if n in masks else None) for n in sorted(images)]
    return Case(
        case_id=folder.name, root=folder,
        images={m: ImageRef(folder, channel=c) for m, c in CHANNELS.items()},
        seg=ImageRef(folder) if masks else None, layout="lgg", label_convention="binary",
        extra={"slices": slices, "naming_problems": problems, "spacing_known": False},
    )


def _read_tif(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, zlib.error...) on bad files
        raise NeuroMapError(
            f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc}). Fix: copy the file again."
        ) from None


def _mask_to_binary(mask: np.ndarray, path: Path) -> np.ndarray:
    """0/255 (kaggle_3m) or 0/1 masks -> {0, 1}; any other value set means the file is not a binary mask."""
    if mask.dtype.kind not in "biu":
        raise NeuroMapError(f"{path}: mask has dtype {mask.dtype}; expected uint8 0/255. Fix: re-export the mask.")
    values = {int(v) for v in np.unique(mask)}
    if values <= {0, 1}:
        return mask.astype(np.uint8)
    if values <= {0, 255}:
        return (mask > 127).astype(np.uint8)
    raise NeuroMapError(
        f"{path}: mask values {sorted(values)[:8]} are not binary (expected 0/255, or 0/1); it may be a resized "
        "or JPEG-compressed copy. Fix: use the original mask file."
    )


def load_lgg(
    case: Case, modalities: list[str] | None = None, with_seg: bool | None = None, check_only: bool = False
) -> Volume | None:
    """Validate and stack every slice of an LGG case into image (C, rows, cols, N) and seg (rows, cols, N).

    Every slice must be readable, rows x cols x 3 uint8 with one common size; masks 2D of that size and
    binary. All problems are collected and raised as one NeuroMapError naming the files. Channels that are
    exact copies of FLAIR (the dataset's stand-in for a missing sequence) are listed in
    ``case.extra["flair_copies"]`` so callers can warn that a model input is not the real sequence.
    """
    modalities = list(modalities or case.modalities)
    missing = [m for m in modalities if m not in CHANNELS]
    if missing:
        raise NeuroMapError(
            f"case '{case.case_id}' ({case.root}): LGG slices hold only pre-contrast (t1), FLAIR and post-contrast "
            f"(t1ce); {missing} requested. Fix: choose a model that needs only t1, t1ce and/or flair."
        )
    slices: list[Slice] = case.extra["slices"]
    problems = list(case.extra["naming_problems"])
    want_seg = case.seg is not None and with_seg is not False
    if with_seg and case.seg is None:
        problems.append(f"case '{case.case_id}': no segmentation (expected <case>_<N>_mask.tif next to the slices).")
    if want_seg:
        unmasked = [image.name for _, image, mask in slices if mask is None]
        if unmasked:
            problems.append(
                f"{case.root}: images without their mask: {', '.join(unmasked)}. "
                "Fix: restore the missing masks, or load without the segmentation."
            )

    size: tuple[int, int] | None = None
    arrays: list[np.ndarray] = []
    for _, image_path, _ in slices:
        try:
            image = _read_tif(image_path)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise NeuroMapError(
                    f"{image_path}: shape {image.shape} {image.dtype}; expected rows x cols x 3 uint8 (pre-contrast, "
                    "FLAIR, post-contrast). Fix: use the original kaggle_3m slice."
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
            seg = read_lgg_masks({n: mask for n, _, mask in slices if mask is not None}, size)
        except NeuroMapError as exc:
            problems.append(str(exc))
    if problems:
        raise NeuroMapError("\n".join(problems))

    stack = np.stack(arrays, axis=-1)  # (rows, cols, 3, N) uint8
    empty = [m for m in modalities if not stack[:, :, CHANNELS[m]].any()]
    if empty:
        raise NeuroMapError(f"case '{case.case_id}' ({case.root}): the {empty} channel is all zero in every slice.")
    flair = stack[:, :, FLAIR_CHANNEL]
    case.extra["flair_copies"] = [
        m for m, c in CHANNELS.items() if c != FLAIR_CHANNEL and np.array_equal(stack[:, :, c], flair)
    ]
    if check_only:
        return None
    image = stack[:, :, [CHANNELS[m] for m in modalities]].transpose(2, 0, 1, 3).astype(np.float32)
    # A zero-strided view gives the reference its shape without allocating a volume nobody reads.
    reference = nib.Nifti1Image(np.broadcast_to(np.uint8(0), stack.shape[:2] + stack.shape[3:]), np.eye(4))
    reference.header["descrip"] = b"LGG kaggle_3m slices: spacing unknown, units are voxels"
    return Volume(case=case, image=image, modalities=modalities, reference=reference, seg=seg)


def read_lgg_masks(files: dict[int, Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """Stack mask files (slice number -> file, in slice order) into (rows, cols, N) uint8 {0, 1}.

    Every mask must be 2D, binary (0/255 or 0/1) and of ``size`` (default: the first mask's). All problems are
    raised together, naming the files.
    """
    if not files:
        raise NeuroMapError("no mask files to read.")
    problems: list[str] = []
    masks: list[np.ndarray] = []
    for path in files.values():
        try:
            mask = _read_tif(path)
            size = size or mask.shape
            if mask.ndim != 2 or mask.shape != size:
                raise NeuroMapError(f"{path}: mask shape {mask.shape}; expected 2D {size} like the images.")
            masks.append(_mask_to_binary(mask, path))
        except NeuroMapError as exc:
            problems.append(str(exc))
    if problems:
        raise NeuroMapError("\n".join(problems))
    return np.stack(masks, axis=-1)


def lgg_mask_files(folder: Path, predicted: bool) -> dict[int, Path]:
    """Slice number -> mask file of a slice folder, in slice order: the ``<slice stem>_pred_mask.tif`` files
    that `write_lgg_masks` wrote (``predicted``), or the ground-truth ``<case>_<N>_mask.tif`` of a kaggle_3m
    patient folder, whose naming problems are raised here.
    """
    folder = Path(folder)
    if not predicted:
        case = lgg_case(folder)
        if case.extra["naming_problems"]:
            raise NeuroMapError("\n".join(case.extra["naming_problems"]))
        return {n: mask for n, _, mask in case.extra["slices"] if mask is not None}
    found: dict[int, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = PRED_NAME.match(path.name)
        if match and not path.name.startswith("."):
            found.setdefault(int(match["number"]), []).append(path)
    duplicates = [", ".join(p.name for p in paths) for paths in found.values() if len(paths) > 1]
    if duplicates:
        raise NeuroMapError(f"{folder}: several predicted masks for one slice ({'; '.join(duplicates)}). Keep one.")
    return {n: found[n][0] for n in sorted(found)}


def lgg_mask_paths(case: Case, out_dir: Path) -> list[Path]:
    """Where `write_lgg_masks` puts each slice's mask: ``out_dir/<slice stem>_pred_mask.tif``, in slice order.

    The input folder is refused so ground-truth masks and images can never be overwritten, nor predictions
    mixed into a patient folder (where discovery would reject them as unknown names).
    """
    out_dir = Path(out_dir)
    slices: list[Slice] = case.extra.get("slices", []) if case.layout == "lgg" else []
    if not slices:
        raise NeuroMapError(f"case '{case.case_id}' is not an LGG slice folder; write its labels as NIfTI instead.")
    if out_dir.resolve() == Path(case.root).resolve():
        raise NeuroMapError(
            f"{out_dir}: is the input folder of case '{case.case_id}'. Fix: choose a separate output folder."
        )
    return [out_dir / f"{image.stem}{PRED_SUFFIX}" for _, image, _ in slices]


def write_lgg_masks(
    labels: np.ndarray, case: Case, out_dir: Path, overwrite: bool = False, stack: contextlib.ExitStack | None = None
) -> list[Path]:
    """Write ``<slice stem>_pred_mask.tif`` per slice: rows x cols uint8 0/255, uncompressed like the original
    download so any TIFF reader opens it. Non-zero labels are abnormality (internal labels 1-3 all count, as
    whole tumour is what the FLAIR masks delineate).

    All targets are checked before the first is written. Every file is staged under a temporary name and all
    are renamed together when ``stack`` closes: the caller's stack, so other outputs (report, picture) appear
    with the masks, or else one private to this call. An error before that leaves no mask behind.
    """
    targets = lgg_mask_paths(case, out_dir)
    labels = as_integral(labels, source=f"predicted labels for '{case.case_id}'")
    rows, cols = _read_tif(case.extra["slices"][0][1]).shape[:2]
    if labels.shape != (rows, cols, len(targets)):
        raise ValueError(f"label shape {labels.shape} does not match the case's slices {(rows, cols, len(targets))}")
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise NeuroMapError(
            f"{out_dir}: {len(existing)} mask file(s) already exist ({shown}). "
            "Fix: choose another output folder or pass --overwrite."
        )
    masks = np.where(labels != 0, 255, 0).astype(np.uint8)
    with contextlib.ExitStack() as own:
        staging = stack if stack is not None else own
        for z, target in enumerate(targets):
            tmp = staging.enter_context(atomic_path(target, overwrite))
            tifffile.imwrite(tmp, np.ascontiguousarray(masks[:, :, z]), photometric="minisblack")
    return targets
