"""The `Segmenter` (like nnU-Net's ``nnUNetPredictor``): options at construction, models and device loaded once,
then cases one by one or in a batch. The CLI, ``neuromap.segment()``, the web app and the benchmarks all build
it the same way, so no option is decided in two places.

One path per case: load (validated, by the case's layout) -> prepare -> model(s) -> probabilities -> labels in
the input grid (`neuromap.export`) -> postprocess (`neuromap.postprocess`) -> quality estimate (`neuromap.quality`)
and requested uncertainty/probability maps (`neuromap.uncertainty`) -> report -> outputs written by the layout,
staged under temporary names and renamed together.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import torch

from neuromap.checkpoint import ModelSpec, load_model
from neuromap.config import InferenceConfig, parse_config
from neuromap.errors import NeuroMapError
from neuromap.export import labels_in_input_grid, output_image
from neuromap.inference import predict_probs
from neuromap.io import Case, atomic_path, cases_from_inputs, duplicate_ids
from neuromap.io.dicom_layout import DICOM_SEG
from neuromap.io.inputs import Inputs
from neuromap.io.layout import Prediction
from neuromap.labels import WRITABLE
from neuromap.postprocess import postprocess
from neuromap.preprocess import prepare
from neuromap.quality import assess, quality_text
from neuromap.report import case_report
from neuromap.tasks import task_of
from neuromap.uncertainty import map_images, report_entries, requested_maps
from neuromap.zoo import resolve_model_paths, shipped_models

ModelChoice = str | Path | list[str | Path] | None


@dataclass
class SegmentResult:
    case_id: str
    labels: nib.Nifti1Image  # in the input's grid, in the output label convention
    report: dict
    files: dict[str, Path] = field(default_factory=dict)  # label output, "report.json", "overlay.png"
    labels_output: Path | None = None  # the written labels: a NIfTI file, or a folder of per-slice masks
    maps: dict[str, nib.Nifti1Image] = field(default_factory=dict)  # requested uncertainty/probability maps


def inference_config(cfg: InferenceConfig | None, options: Mapping[str, object]) -> InferenceConfig:
    """The one way options reach a Segmenter: an InferenceConfig, or its fields as keywords (``tta=True``)."""
    if cfg is not None and options:
        raise NeuroMapError(
            f"segment() got both cfg and the options {sorted(options)}. Fix: set them in the InferenceConfig, or "
            "pass keyword options without cfg."
        )
    return cfg if cfg is not None else parse_config(dict(options), InferenceConfig, source="segment() options")


class Segmenter:
    """Segment cases with one model choice and one InferenceConfig.

    ``model``: a shipped name, a checkpoint path, several (an ensemble), or None for the best shipped model of
    each case's task and sequences (`neuromap.zoo.default_model`). ``labels``: the output label convention for
    BraTS models (binary models always write "binary", see `neuromap.tasks`). ``dicom_seg``: DICOM cases also get
    ``<case>_seg.dcm``, a DICOM SEG on the reference series. Named models are loaded here, so
    a bad path fails before any case; automatic choices are loaded on first use; each model is loaded once.
    """

    def __init__(self, model: ModelChoice = None, cfg: InferenceConfig | None = None, labels: str = "brats",
                 dicom_seg: bool = False) -> None:
        if labels not in WRITABLE:
            raise NeuroMapError(f"labels cannot be written as '{labels}'; choose one of {list(WRITABLE)}.")
        self.cfg = cfg or InferenceConfig()
        self.labels = labels
        self.optional = ((DICOM_SEG,) if dicom_seg else ()) + requested_maps(self.cfg)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.device = self._device(self.cfg.device)
        self._loaded: dict[tuple[Path, float], tuple[torch.nn.Module, ModelSpec]] = {}  # by file and mtime
        self._named = resolve_model_paths(model, []) if model is not None else None
        if self._named is not None:
            self._models(self._named)

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "cuda" and not torch.cuda.is_available():
            raise NeuroMapError("--device cuda requested but no CUDA GPU is available. Fix: use --device cpu.")
        return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")

    def _models(self, paths: list[Path]) -> list[tuple[torch.nn.Module, ModelSpec]]:
        keys = []
        for path in paths:
            if not path.is_file():
                shipped = sorted(shipped_models()) or "none"
                raise NeuroMapError(f"{path}: model not found. Shipped models: {shipped}.")
            keys.append((path, path.stat().st_mtime))  # a replaced file (e.g. a new upload) is loaded again
            if keys[-1] not in self._loaded:
                model, spec = load_model(path)
                memory_format = torch.channels_last if spec.model.spatial_dims == 2 else torch.preserve_format
                self._loaded[keys[-1]] = (model.to(self.device, memory_format=memory_format), spec)
        models = [self._loaded[key] for key in keys]
        if len({(tuple(s.modalities), s.task, s.model.out) for _, s in models}) > 1:
            raise NeuroMapError("ensemble members must share modalities, task and output type.")
        return models

    def model_files(self, case: Case) -> list[Path]:
        """The checkpoints this segmenter uses for ``case``."""
        return self._named or resolve_model_paths(None, case.modalities, case.layout.task)

    def segment(self, cases: list[Case], output_dir: str | Path | None = None, overwrite: bool = False,
                progress: bool = False) -> list[SegmentResult]:
        """Segment a batch; case ids must be unique (their outputs would collide)."""
        from tqdm import tqdm

        dupes = duplicate_ids(cases)
        if dupes:
            raise NeuroMapError(f"several inputs have the same case id {dupes}; their outputs would collide.")
        return [self.segment_case(case, output_dir, overwrite)
                for case in tqdm(cases, desc="segmenting", disable=not progress or len(cases) < 2, unit="case")]

    def segment_case(self, case: Case, output_dir: str | Path | None = None, overwrite: bool = False) -> SegmentResult:
        """Segment one case. With ``output_dir``, write its layout's outputs (label output, ``<case>_report.json``,
        ``<case>_overlay.png``): all checked before any work, staged under temporary names, renamed together."""
        cfg, layout = self.cfg, case.layout
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model_files = self.model_files(case)
        models = self._models(model_files)
        spec = models[0][1]
        task = task_of(spec)
        if DICOM_SEG in self.optional and DICOM_SEG not in layout.optional_outputs:
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): --dicom-seg needs a DICOM input (a DICOM SEG must reference "
                "the source images). Fix: segment the DICOM study, or leave out --dicom-seg."
            )
        if set(self.optional) - set(layout.optional_outputs):
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): --uncertainty and --probabilities write NIfTI maps on the "
                f"input's grid, which {layout.description} inputs do not have. Fix: leave them out for this case."
            )
        files: dict[str, Path] = {}
        if output_dir is not None:
            files = layout.output_files(case, Path(output_dir), self.optional)
            _guard_outputs(case, layout.planned_writes(case, Path(output_dir), self.optional), overwrite)
        volume = layout.load(case, spec.modalities, with_seg=False)
        timings["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        prepared = prepare(volume, spec.preprocess)
        timings["preprocess_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        probs = predict_probs(models, prepared.image, cfg, device=self.device)
        timings["inference_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        inverse = prepared.inverse
        internal, notes = postprocess(labels_in_input_grid(probs, inverse, task),
                                      volume.voxel_ml if volume.spacing_known else None, cfg, task.postprocess_steps())
        convention = task.output_convention(self.labels)
        prediction = Prediction(case, volume, spec, internal, output_image(internal, volume.reference, convention),
                                task, inverse.ras, inverse.ras_spacing)
        warnings = [*notes, *volume.warnings]
        if spec.preprocess.mode == "2d" and spec.preprocess.slice_range is not None:
            warnings.append(f"2D model: only axial slices {spec.preprocess.slice_range} were segmented.")
        if not internal.any():
            warnings.append(task.nothing_found)
        timings["postprocess_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        single_pass = partial(predict_probs, models, cfg=cfg.model_copy(update={"tta": False}), device=self.device)
        quality = assess(prepared, probs, single_pass, cfg.tta, internal, volume, spec, task)
        maps = map_images(probs, inverse, task, volume.reference, requested_maps(cfg))
        timings["quality_s"] = time.perf_counter() - t1
        report = case_report(volume, spec, task, model_files, cfg, convention, internal, warnings, str(self.device),
                             {**layout.report_extra(prediction), **report_entries(task, tuple(maps)),
                              "quality": quality})
        result = SegmentResult(case.case_id, prediction.labels, report, maps=maps)
        if files:
            t1 = time.perf_counter()
            shown = "flair" if "flair" in volume.modalities else volume.modalities[0]
            png, picture_notes = layout.picture(prediction, volume.image[volume.modalities.index(shown)],
                                                f"{case.case_id} ({shown}) - {spec.model.name} - "
                                                f"{quality_text(quality)}")
            warnings += picture_notes
            timings["overlay_s"] = time.perf_counter() - t1
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if files:
            report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
            with contextlib.ExitStack() as stack:
                layout.stage_labels(prediction, files, stack, overwrite)
                for key, image in maps.items():
                    nib.save(image, stack.enter_context(atomic_path(files[key], overwrite)))
                stack.enter_context(atomic_path(files["overlay.png"], overwrite)).write_bytes(png)
                report_file = stack.enter_context(atomic_path(files["report.json"], overwrite))
                report_file.write_text(json.dumps(report, indent=2))
            result.files, result.labels_output = files, files[layout.label_key]
        return result


def _guard_outputs(case: Case, targets: list[Path], overwrite: bool) -> None:
    """Refuse targets that are input files or lie in an input folder (slice-folder cases), and existing
    targets unless ``overwrite``."""
    inputs = case.input_paths()
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


def segment(
    inputs: Inputs, output_dir: str | Path | None = None, model: ModelChoice = None, labels: str = "brats",
    overwrite: bool = False, progress: bool = False, cfg: InferenceConfig | None = None,
    mapping: Mapping[str, str | Path] | None = None, dicom_seg: bool = False, **options,
) -> list[SegmentResult]:
    """Segment one or many cases (the Python face of ``neuromap segment``).

    ``inputs``: a case folder, a parent folder of cases, a list of those, or a mapping
    ``{"t1ce": path_or_nibabel_image, "flair": ...}`` for one case; ``mapping`` is the same with one case folder
    (``--map``), or for a DICOM study its series by modality (`neuromap.io.inputs`). ``dicom_seg`` adds a DICOM
    SEG output to DICOM cases. Inference options
    come as an InferenceConfig (``cfg``) or as its fields (``tta=True, device="cpu"``), not both. Returns one
    result per case with the label image (input grid, ``labels`` convention) and the report dict; files are
    written when ``output_dir`` is set.
    """
    segmenter = Segmenter(model, inference_config(cfg, options), labels, dicom_seg)
    with cases_from_inputs(inputs, mapping) as cases:
        return segmenter.segment(cases, output_dir, overwrite, progress)
