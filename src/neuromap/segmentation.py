"""`neuromap.segment()` (this module): case files in, label map in the input's grid + report + overlay out.

One code path for the CLI, the Python API and the web app: load (validated) -> prepare -> model(s) ->
probabilities -> labels -> postprocess -> back to the input grid -> write atomically. Only the last step
depends on the layout: NIfTI cases get a label NIfTI, LGG slice folders per-slice mask TIFFs (`OUTPUTS`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from neuromap.checkpoint import ModelSpec, load_model
from neuromap.config import InferenceConfig
from neuromap.errors import NeuroMapError
from neuromap.inference import postprocess, predict_probs, probs_to_labels
from neuromap.io import Case, Volume, duplicate_ids, label_image, load_case
from neuromap.io.atomic import atomic_path
from neuromap.io.dicom import dicom_cases
from neuromap.io.dicom_seg import DicomOutputs
from neuromap.io.lgg import lgg_mask_paths, write_lgg_masks
from neuromap.labels import from_internal
from neuromap.prepare_raw.outputs import RawOptions, RawOutputs
from neuromap.preprocess import Inverse, prepare
from neuromap.report import LEGENDS, RESEARCH_NOTICE, montage_png, overlay_png, volume_voxels

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_models() -> dict[str, dict]:
    """Name -> entry of the models shipped in ``neuromap/weights/models.json``."""
    index = WEIGHTS_DIR / "models.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def case_task(case: Case) -> str:
    """The task a case is annotated for, which picks the default shipped model: "binary" for binary label
    conventions (LGG FLAIR abnormality), else "brats"."""
    return "binary" if case.label_convention == "binary" else "brats"


def resolve_model_paths(
    model: str | Path | list[str | Path] | None, available: list[str], task: str = "brats"
) -> list[Path]:
    """A shipped name, a checkpoint path, several of them (an ensemble), or None: among the shipped models of
    ``task`` whose sequences this case has, the one using the most sequences, ties broken by the measured
    validation Dice recorded in models.json. So a case without T1/T2 gets the FLAIR+T1ce model and a full case
    the four-sequence model (on the 6 held-out BraTS cases both scored the same on average; the four-sequence
    model did better on the 2 never-seen test cases: see the model cards)."""
    shipped = shipped_models()
    if model is None:
        usable = [(len(e["modalities"]), _mean_val_dice(e), name) for name, e in shipped.items()
                  if e.get("task", "brats") == task and set(e["modalities"]) <= set(available)]
        if not usable:
            if task == "binary" and not any(e.get("task") == "binary" for e in shipped.values()):
                raise NeuroMapError(
                    "no binary (LGG FLAIR abnormality) model is shipped, so slice folders need an explicit model. "
                    "Fix: pass --model PATH to a binary checkpoint (e.g. best.pt of `neuromap train "
                    "configs/lgg_unet2d.yaml`)."
                )
            needs = "; ".join(f"{n}: {', '.join(e['modalities'])}" for n, e in shipped.items()
                              if e.get("task", "brats") == task) or "none shipped"
            raise NeuroMapError(
                f"no shipped model works with the sequences found ({', '.join(available)}). Models need: {needs}. "
                "Fix: add the missing sequence files or pass --model PATH to a checkpoint."
            )
        return [WEIGHTS_DIR / shipped[max(usable)[-1]]["file"]]
    models = model if isinstance(model, list) else [model]
    paths = []
    for item in models:
        name = str(item)
        paths.append(WEIGHTS_DIR / shipped[name]["file"] if name in shipped else Path(name))
    return paths


def _mean_val_dice(entry: dict) -> float:
    scores = list(entry.get("val_dice", {}).values())
    return sum(scores) / len(scores) if scores else 0.0


@lru_cache(maxsize=8)
def _cached_model(path: str, mtime: float) -> tuple[torch.nn.Module, ModelSpec]:
    return load_model(path)


def get_models(paths: list[Path], device: torch.device) -> list[tuple[torch.nn.Module, ModelSpec]]:
    out = []
    for path in paths:
        if not path.is_file():
            raise NeuroMapError(f"{path}: model not found. Shipped models: {sorted(shipped_models()) or 'none'}.")
        model, spec = _cached_model(str(path.resolve()), path.stat().st_mtime)
        memory_format = torch.channels_last if spec.model.spatial_dims == 2 else torch.preserve_format
        out.append((model.to(device, memory_format=memory_format), spec))
    specs = [s for _, s in out]
    if len({(tuple(s.modalities), s.task, s.model.out) for s in specs}) > 1:
        raise NeuroMapError("ensemble members must share modalities, task and output type.")
    return out


@dataclass
class SegmentResult:
    case_id: str
    labels: nib.Nifti1Image  # in the input's grid, in the requested label convention
    report: dict
    files: dict[str, Path] = field(default_factory=dict)  # label output, "report.json", "overlay.png"

    @property
    def labels_output(self) -> Path | None:
        """The written labels: the NIfTI file, or the folder of per-slice masks of an LGG case."""
        return self.files.get("seg.nii.gz", self.files.get("masks"))


@dataclass
class Prediction:
    """What the shared path computed for one case: all that a layout's outputs are made from."""

    case: Case
    spec: ModelSpec
    inverse: Inverse
    internal: np.ndarray  # internal labels in the input grid
    labels: nib.Nifti1Image  # ``internal`` in the output label convention, input grid and header


class NiftiOutputs:
    """Outputs of NIfTI cases: ``<case>_seg.nii.gz`` in the input grid, report, three-view overlay.

    Layouts differ only in these methods; loading, prediction, postprocessing and the report are shared.
    """

    def files(self, case: Case, out: Path) -> dict[str, Path]:
        """The outputs by name, as `SegmentResult.files` gives them."""
        return {k: out / f"{case.case_id}_{k}" for k in ("seg.nii.gz", "report.json", "overlay.png")}

    def written(self, case: Case, out: Path) -> list[Path]:
        """Every file that will be created, checked against inputs and existing files before any work."""
        return list(self.files(case, out).values())

    def report_extra(self, prediction: Prediction) -> dict:
        return {}

    def picture(self, prediction: Prediction, background: np.ndarray, title: str) -> tuple[bytes, list[str]]:
        """The overlay PNG and any warnings about it."""
        inv = prediction.inverse
        return overlay_png(inv.ras(background), inv.ras(prediction.internal), inv.ras_spacing, title,
                           legend=LEGENDS[prediction.spec.task]), []

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        """Write the labels under temporary names that ``stack`` renames with the other outputs."""
        nib.save(prediction.labels, str(stack.enter_context(atomic_path(files["seg.nii.gz"], overwrite))))


class LggOutputs(NiftiOutputs):
    """LGG kaggle_3m slice folders: masks as the dataset stores them, ``<case>/<slice stem>_pred_mask.tif``
    (a folder per case, so a parent folder of patients keeps their slices apart), a slice montage instead of
    three views (the slice spacing is unknown, so coronal and sagittal views would be distorted), and the
    slice numbers with abnormality in the report."""

    def files(self, case: Case, out: Path) -> dict[str, Path]:
        return {"masks": out / case.case_id, **{k: out / f"{case.case_id}_{k}" for k in ("report.json", "overlay.png")}}

    def written(self, case: Case, out: Path) -> list[Path]:
        files = self.files(case, out)
        return [*lgg_mask_paths(case, files["masks"]), files["report.json"], files["overlay.png"]]

    def report_extra(self, prediction: Prediction) -> dict:
        numbers = [n for n, _, _ in prediction.case.extra["slices"]]
        present = prediction.internal.any(axis=(0, 1))
        return {"slices": {"count": len(numbers), "with_abnormality": [n for n, p in zip(numbers, present,
                                                                                          strict=True) if p]}}

    def picture(self, prediction: Prediction, background: np.ndarray, title: str) -> tuple[bytes, list[str]]:
        """Ground-truth masks, when the folder has them, are outlined; they are read again here (small files)
        because segmentation itself must not depend on them: a folder with some masks missing still segments."""
        case, truth, notes = prediction.case, None, []
        if case.seg is not None:
            try:
                truth = load_case(case, ["flair"], with_seg=True).seg
            except NeuroMapError as exc:
                notes.append(f"ground-truth masks not drawn in the overlay: {str(exc).splitlines()[0]}")
        names = [f"slice {n}" for n, _, _ in case.extra["slices"]]
        png = montage_png(background, prediction.internal, names, title, truth, LEGENDS[prediction.spec.task])
        return png, notes

    def stage_labels(self, prediction: Prediction, files: dict[str, Path], stack: contextlib.ExitStack,
                     overwrite: bool) -> None:
        write_lgg_masks(prediction.internal, prediction.case, files["masks"], overwrite, stack=stack)


OUTPUTS: dict[str, NiftiOutputs] = {"lgg": LggOutputs()}  # by case layout; every other layout is NIfTI


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise NeuroMapError("--device cuda requested but no CUDA GPU is available. Fix: use --device cpu.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _guard_outputs(case: Case, targets: list[Path], overwrite: bool) -> None:
    """Refuse targets that are input files or lie in an input folder (slice-folder cases), and existing
    targets unless ``overwrite``."""
    inputs = {Path(r.path).resolve() for r in case.images.values()}
    if case.seg:
        inputs.add(Path(case.seg.path).resolve())
    folders = {p for p in inputs if p.is_dir()}
    for target in targets:
        if target.resolve() in inputs or target.resolve().parent in folders:
            raise NeuroMapError(
                f"{target}: would overwrite an input file or write into an input slice folder. "
                "Fix: choose another output folder."
            )
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise NeuroMapError(f"output exists: {', '.join(existing[:3])}{more}. Fix: another -o folder or --overwrite.")


def _input_warnings(volume: Volume, spec: ModelSpec) -> list[str]:
    """What the reader must know about the input and what the model saw: unknown spacing, sequences that are
    stand-ins, slices left out."""
    warnings = []
    if not volume.spacing_known:
        warnings.append("pixel spacing unknown: volumes in voxels")
    copies = volume.case.extra.get("flair_copies", [])
    if copies:
        used = [m for m in copies if m in spec.modalities]
        warnings.append(
            f"the {', '.join(copies)} channel(s) are copies of FLAIR (sequence missing in the dataset); "
            + (f"the model read {', '.join(used)} as if it were real" if used else "the model does not use them")
        )
    if spec.preprocess.mode == "2d" and spec.preprocess.slice_range is not None:
        warnings.append(f"2D model: only axial slices {spec.preprocess.slice_range} were segmented.")
    return warnings + volume.case.extra.get("warnings", [])


def segment_case(
    case: Case, output_dir: str | Path | None = None, model: str | Path | list | None = None,
    cfg: InferenceConfig | None = None, labels: str = "brats", overwrite: bool = False, dicom_seg: bool = False,
    raw: RawOptions | None = None,
) -> SegmentResult:
    """Segment one case. With ``output_dir``, write its layout's label output (``<case>_seg.nii.gz`` in the
    input grid; for LGG slice folders ``<case>/<slice stem>_pred_mask.tif``), ``<case>_report.json`` and
    ``<case>_overlay.png``: all checked before any work, staged under temporary names and renamed together.
    DICOM studies also list the series used and ignored in the report, and with ``dicom_seg`` write
    ``<case>_seg.dcm`` (DICOM SEG on the reference series). With ``raw`` (`neuromap.prepare_raw`), sequences on
    their own grids are co-registered, brain-extracted and resampled first, and the labels go back onto the
    reference sequence's grid.

    Binary models write the "binary" label convention (1 = abnormality) whatever ``labels`` says; BraTS
    conventions would call their label 1 necrotic core.
    """
    cfg = cfg or InferenceConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = _device(cfg.device)
    model_paths = resolve_model_paths(model, case.modalities, case_task(case))
    models = get_models(model_paths, device)
    spec = models[0][1]
    outputs = OUTPUTS.get(case.layout, NiftiOutputs())
    if dicom_seg or case.layout == "dicom":
        outputs = DicomOutputs(case, outputs, dicom_seg)
    if raw is not None:
        outputs = RawOutputs(outputs, raw, spec.modalities)
    files: dict[str, Path] = {}
    if output_dir is not None:
        files = outputs.files(case, Path(output_dir))
        _guard_outputs(case, outputs.written(case, Path(output_dir)), overwrite)
    volume: Volume = outputs.prepare(case, spec.modalities) if raw else load_case(case, spec.modalities, with_seg=False)
    timings["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    prepared = prepare(volume, spec.preprocess)
    timings["preprocess_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    probs = predict_probs(models, prepared.image, cfg, device=device)
    timings["inference_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # Probabilities go back to the crop at input resolution before the decision, so borders stay smooth; only the
    # label map is then placed into the full grid (outside the crop is background either way).
    inverse = prepared.inverse
    internal = inverse.to_original(probs_to_labels(inverse.to_crop(probs.cpu(), linear=True), spec))
    internal, notes = postprocess(internal, volume.voxel_ml if volume.spacing_known else None, cfg)
    if raw is not None:  # from the 1 mm working grid onto the reference sequence's own grid
        internal, volume = outputs.to_reference(internal)
    convention = "binary" if spec.task == "binary" else labels
    prediction = Prediction(case, spec, prepared.inverse, internal,
                            label_image(from_internal(internal, convention), volume.reference))
    warnings = [*notes, *_input_warnings(volume, spec)]
    voxels = volume_voxels(internal, spec.task)
    if not internal.any():
        warnings.append("no abnormality found." if spec.task == "binary" else "no tumour found.")
    timings["postprocess_s"] = time.perf_counter() - t1
    report = {
        "case_id": case.case_id,
        "notice": RESEARCH_NOTICE,
        "research_use_only": True,
        "inputs": {m: str(case.images[m]) for m in spec.modalities},
        "model": {"files": [str(p) for p in model_paths], "task": spec.task,
                  "architecture": spec.model.name, "modalities": spec.modalities, "tta": cfg.tta,
                  "ensemble_size": len(models), "validation": spec.info.get("val_dice")},
        "label_convention": convention,
        "voxel_spacing_mm": list(volume.spacing) if volume.spacing_known else None,
        "volumes_ml": {k: round(n * volume.voxel_ml, 3) if volume.spacing_known else None for k, n in voxels.items()},
        "volume_voxels": voxels,
        **outputs.report_extra(prediction),
        "warnings": warnings,
        "device": str(device),
    }
    result = SegmentResult(case.case_id, prediction.labels, report)
    if files:
        t1 = time.perf_counter()
        shown = "flair" if "flair" in volume.modalities else volume.modalities[0]
        png, picture_notes = outputs.picture(prediction, volume.image[volume.modalities.index(shown)],
                                             f"{case.case_id} ({shown}) - {spec.model.name}")
        warnings += picture_notes
        timings["overlay_s"] = time.perf_counter() - t1
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
        # Every output is staged under a temporary name and renamed only when all are complete, so an error
        # leaves no partial set of outputs behind.
        with contextlib.ExitStack() as stack:
            outputs.stage_labels(prediction, files, stack, overwrite)
            stack.enter_context(atomic_path(files["overlay.png"], overwrite)).write_bytes(png)
            stack.enter_context(atomic_path(files["report.json"], overwrite)).write_text(json.dumps(report, indent=2))
        result.files = files
    else:
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return result


def segment(
    inputs: str | Path | list[str | Path] | dict[str, str | Path | nib.Nifti1Image],
    output_dir: str | Path | None = None, model: str | Path | list | None = None, tta: bool | None = None,
    device: str | None = None, labels: str = "brats", overwrite: bool = False, progress: bool = False,
    cfg: InferenceConfig | None = None, series_map: dict[str, str] | None = None, dicom_seg: bool = False,
    raw: bool | RawOptions = False,
) -> list[SegmentResult]:
    """Segment one or many cases (the Python face of ``neuromap segment``).

    ``inputs``: a case folder, a parent folder of cases, a list of those, or a mapping
    ``{"t1ce": path_or_nibabel_image, "flair": ...}`` for one case. Returns one result per case with the label
    image (input grid, ``labels`` convention) and the report dict; files are written when ``output_dir`` is set.
    ``tta`` and ``device``, when given, override the same fields of ``cfg``. A DICOM study folder is a case too:
    ``series_map`` ({"t1ce": SERIES_UID, number or description}) overrides its automatic choice of series and
    ``dicom_seg`` adds a DICOM SEG output. ``raw=True`` (or a `RawOptions`: reference, skull_stripped, n4,
    save_brain_mask, save_prepared) prepares raw scans first: sequences on their own grids, skull on, thick slices.
    """
    given = {"tta": tta, "device": device}
    cfg = (cfg or InferenceConfig()).model_copy(update={k: v for k, v in given.items() if v is not None})
    from tqdm import tqdm

    # In-memory images are written once to a private temp folder (uncompressed: no gzip work) so the one
    # validated loader reads them; the folder is removed when segmentation ends.
    with tempfile.TemporaryDirectory(prefix="neuromap-") as tmp:
        cases = dicom_cases(inputs, series_map) if series_map else _cases_from_inputs(inputs, Path(tmp))
        raw_options = (raw if isinstance(raw, RawOptions) else RawOptions(threads=cfg.threads)) if raw else None
        return [segment_case(case, output_dir, model, cfg, labels, overwrite, dicom_seg, raw_options)
                for case in tqdm(cases, desc="segmenting", disable=not progress or len(cases) < 2, unit="case")]


def _cases_from_inputs(inputs, scratch: Path) -> list[Case]:
    from neuromap.io import case_from_mapping, discover_cases

    if isinstance(inputs, dict):
        mapping = {}
        for key, value in inputs.items():
            if isinstance(value, nib.spatialimages.SpatialImage):
                mapping[key] = scratch / f"{key}.nii"
                nib.save(value, str(mapping[key]))
            else:
                mapping[key] = value
        in_memory = any(isinstance(v, nib.spatialimages.SpatialImage) for v in inputs.values())
        return [case_from_mapping(mapping, case_id="case" if in_memory else None)]
    paths = inputs if isinstance(inputs, list) else [inputs]
    cases: list[Case] = []
    for path in paths:
        cases.extend(discover_cases(path))
    dupes = duplicate_ids(cases)
    if dupes:
        raise NeuroMapError(f"several inputs have the same case id {dupes}; their outputs would collide.")
    return cases

