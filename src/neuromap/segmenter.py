"""The `Segmenter` (like nnU-Net's ``nnUNetPredictor``): options at construction, models and device loaded once,
then cases one by one or in a batch. The CLI, ``neuromap.segment()``, the web app and the benchmarks all build
it the same way, so no option is decided in two places.

One path per case, in two stages: reading (model choice, output checks, load validated by the case's layout,
prepare) and the rest (model(s) -> probabilities -> labels in the input grid (`neuromap.export`) -> postprocess
(`neuromap.postprocess`) -> the layout's output grid -> quality estimate (`neuromap.quality`) and requested
uncertainty/probability maps (`neuromap.uncertainty`) -> report -> outputs written by the layout, staged under
temporary names and renamed together). In a batch, background threads read the next cases while the current one
is in the model (``cfg.workers``; like nnU-Net's preprocessing iterator), so decompressing, validating and
preparing a case costs no wall time once the model stage is the longer one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib

from neuromap.checkpoint import ModelSpec
from neuromap.cohort import Part, write_summary
from neuromap.config import InferenceConfig, parse_config
from neuromap.engines import default_threads, load_runner, resolve_device, resolve_engine
from neuromap.engines.runtimes import EngineModel
from neuromap.errors import NeuroMapError
from neuromap.export import labels_in_input_grid, output_image
from neuromap.inference import agreement_sample, predict_probs
from neuromap.io import Case, Volume, atomic_path, cases_from_inputs, duplicate_ids
from neuromap.io.dicom_layout import DICOM_SEG
from neuromap.io.inputs import Inputs
from neuromap.io.layout import Prediction
from neuromap.io.output_checks import check_writable_folder
from neuromap.labels import WRITABLE
from neuromap.pictures import preload as preload_pictures
from neuromap.postprocess import postprocess
from neuromap.prepare_raw import RawOptions, as_raw
from neuromap.preprocess import Prepared, prepare
from neuromap.quality import assess, quality_text
from neuromap.report import case_report
from neuromap.tasks import task_of
from neuromap.uncertainty import map_images, report_entries, requested_maps
from neuromap.zoo import resolve_model_paths, shipped_models

ModelChoice = str | Path | list[str | Path] | None


@dataclass
class SegmentResult:
    case_id: str
    labels: nib.Nifti1Image | None  # in the input's grid, in the output label convention; None when skipped
    report: dict
    files: dict[str, Path] = field(default_factory=dict)  # label output, "report.json", "overlay.png"
    labels_output: Path | None = None  # the written labels: a NIfTI file, or a folder of per-slice masks
    maps: dict[str, nib.Nifti1Image] = field(default_factory=dict)  # requested uncertainty/probability maps
    skipped: bool = False  # resume: its outputs were complete, so it was not segmented again (report read back)

    def show(self, radiological: bool = True, height: int = 480):
        """Show the result in a Jupyter notebook: NiiVue viewer, or the overlay picture (`neuromap.notebook`)."""
        from neuromap.notebook import show

        return show(self, radiological, height)


@dataclass
class _Read:
    """A case read and prepared for its model(s): what a reader hands to the model stage."""

    case: Case  # as segmented (a raw case wears its RawLayout)
    model_files: list[Path]
    models: list[tuple[EngineModel, ModelSpec]]
    files: dict[str, Path]  # its outputs; empty without an output folder
    volume: Volume
    prepared: Prepared
    timings: dict[str, float]
    started: float  # perf_counter() when reading began


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
    ``<case>_seg.dcm``, a DICOM SEG on the reference series. ``raw`` (True or `RawOptions`): every case is read
    as raw scans (`neuromap.prepare_raw.RawLayout`: co-registered, brain-extracted, 1 mm; labels on the
    reference sequence's grid); its threads default to ``cfg.threads``. The engine that runs the network
    (``cfg.engine``, `neuromap.engines`) is resolved here, so a missing package fails before any case, and each
    model is loaded and wrapped in it once. Named models are loaded here, so a bad path fails before any case;
    automatic choices are loaded on first use.
    """

    def __init__(self, model: ModelChoice = None, cfg: InferenceConfig | None = None, labels: str = "brats",
                 dicom_seg: bool = False, raw: bool | RawOptions | None = None) -> None:
        if labels not in WRITABLE:
            raise NeuroMapError(f"labels cannot be written as '{labels}'; choose one of {list(WRITABLE)}.")
        self.cfg = cfg or InferenceConfig()
        self.labels = labels
        self.optional = ((DICOM_SEG,) if dicom_seg else ()) + requested_maps(self.cfg)
        raw = RawOptions() if raw is True else raw or None
        self.raw = dataclasses.replace(raw, threads=raw.threads or self.cfg.threads) if raw else None
        self.threads = self.cfg.threads or default_threads()
        self.device = resolve_device(self.cfg.device)
        self.engine = resolve_engine(self.cfg.engine, self.device)
        # by file and mtime: the model as the engine runs it (the module itself for PyTorch), and its spec
        self._loaded: dict[tuple[Path, float], tuple[EngineModel, ModelSpec]] = {}
        self._loading = threading.Lock()  # reader threads ask for models too: each is loaded once
        self._named = resolve_model_paths(model, []) if model is not None else None
        if self._named is not None:
            self._models(self._named)

    def _models(self, paths: list[Path]) -> list[tuple[EngineModel, ModelSpec]]:
        with self._loading:
            return self._load_models(paths)

    def _load_models(self, paths: list[Path]) -> list[tuple[EngineModel, ModelSpec]]:
        keys = []
        for path in paths:
            if not path.is_file():
                shipped = sorted(shipped_models()) or "none"
                raise NeuroMapError(f"{path}: model not found. Shipped models: {shipped}.")
            keys.append((path, path.stat().st_mtime))  # a replaced file (e.g. a new upload) is loaded again
            if keys[-1] not in self._loaded:
                self._loaded[keys[-1]] = load_runner(path, self.engine, self.device, self.cfg.engine == "auto",
                                                     self.threads)
        models = [self._loaded[key] for key in keys]
        if len({(tuple(s.modalities), s.task, s.model.out) for _, s in models}) > 1:
            raise NeuroMapError("ensemble members must share modalities, task and output type.")
        return models

    def model_files(self, case: Case) -> list[Path]:
        """The checkpoints this segmenter uses for ``case``."""
        return self._named or resolve_model_paths(None, case.modalities, case.layout.task)

    def segment(self, cases: list[Case], output_dir: str | Path | None = None, overwrite: bool = False,
                progress: bool = False, part: Part | None = None, resume: bool = False) -> list[SegmentResult]:
        """Segment a batch (see `iter_segment`) and return every result."""
        return list(self.iter_segment(cases, output_dir, overwrite, progress, part, resume))

    def iter_segment(self, cases: list[Case], output_dir: str | Path | None = None, overwrite: bool = False,
                     progress: bool = False, part: Part | None = None,
                     resume: bool = False) -> Iterator[SegmentResult]:
        """Segment a batch in order, yielding each result when its outputs are written (a caller that does not
        keep them holds one case's labels at a time). Case ids must be unique (their outputs would collide).
        ``progress`` shows a bar over cases with the rate and the time left.

        ``part`` (`neuromap.cohort.Part`): only that deterministic share of the cases, and a part summary
        ``summary_part_K_of_N.json`` in ``output_dir`` when it is done. ``resume``: cases whose outputs are all
        there (`complete`) are not segmented again but yielded first, marked ``skipped``; the others are (re)done,
        replacing any partial outputs of an interrupted run."""
        from tqdm import tqdm

        started = time.perf_counter()
        dupes = duplicate_ids(cases)
        if dupes:
            raise NeuroMapError(f"several inputs have the same case id {dupes}; their outputs would collide.")
        if (resume or part) and output_dir is None:
            raise NeuroMapError("--continue and --num-parts need an output folder (-o).")
        summary = part.summary_file(Path(output_dir)) if part else None
        if summary is not None and summary.exists() and not (overwrite or resume):
            raise NeuroMapError(f"output exists: {summary}. Fix: another -o folder, --continue or --overwrite.")
        selected = part.select(cases) if part else cases
        done = {case.case_id for case in selected if resume and self.complete(case, output_dir)}
        results = [self._skipped(case, Path(output_dir)) for case in selected if case.case_id in done]
        yield from results
        todo = [case for case in selected if case.case_id not in done]
        if todo and output_dir is not None:
            preload_pictures()
        with tqdm(total=len(todo), desc="segmenting", unit="case", disable=not progress or len(todo) < 2) as bar:
            for read in self._reads(todo, output_dir, overwrite or resume):
                bar.set_postfix_str(read.case.case_id, refresh=False)
                result = self._finish(read, overwrite or resume)
                results.append(dataclasses.replace(result, labels=None, maps={}))  # the summary: reports only
                yield result
                bar.update()
        if summary is not None:
            run = {"engine": self.engine, "device": self.device, "workers": self.cfg.workers,
                   "threads": self.threads}
            order = {case.case_id: i for i, case in enumerate(selected)}
            results.sort(key=lambda r: order[r.case_id])
            write_summary(summary, part, len(cases), results, started, run, overwrite=True)

    def complete(self, case: Case, output_dir: str | Path) -> bool:
        """Whether every output this segmenter would write for ``case`` exists and its report names the case
        (outputs are renamed into place together after all were staged, so they are all there or a run was
        cut between renames)."""
        case, _, _ = self._as_segmented(case)
        files = case.layout.planned_writes(case, Path(output_dir), self.optional)
        if not all(p.exists() for p in files):
            return False
        report = case.layout.output_files(case, Path(output_dir), self.optional)["report.json"]
        try:
            return json.loads(report.read_text()).get("case_id") == case.case_id
        except (OSError, ValueError):
            return False

    def _skipped(self, case: Case, output_dir: Path) -> SegmentResult:
        """The result of a case `complete` found done: its report read back, no labels loaded."""
        case, _, _ = self._as_segmented(case)
        files = case.layout.output_files(case, output_dir, self.optional)
        report = json.loads(files["report.json"].read_text())
        return SegmentResult(case.case_id, None, report, files, files[case.layout.label_key], skipped=True)

    def _reads(self, cases: Iterable[Case], output_dir: str | Path | None, overwrite: bool) -> Iterator[_Read]:
        """Each case read and prepared, in order. With ``cfg.workers`` N > 0, N reader threads keep the next N
        cases read ahead while the caller runs the model on the current one (so at most N + 1 cases are in
        memory); a case's error is raised when its turn comes, so a batch fails at the same case as without."""
        workers = self.cfg.workers
        if not workers:
            yield from (self._read(case, output_dir, overwrite) for case in cases)
            return
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="neuromap-reader")
        pending: deque[Future[_Read]] = deque()
        upcoming = iter(cases)
        try:
            # Threads rather than nnU-Net's processes: reading is gzip, numpy and torch work that mostly releases
            # the GIL, and a thread hands the prepared case to the model stage without pickling it.
            for case in upcoming:
                pending.append(pool.submit(self._read, case, output_dir, overwrite))
                if len(pending) == workers:
                    break
            while pending:
                read = pending.popleft().result()
                case = next(upcoming, None)
                if case is not None:
                    pending.append(pool.submit(self._read, case, output_dir, overwrite))
                yield read
        finally:  # an error or an abandoned batch: reads not started are dropped, running ones finish
            pool.shutdown(wait=True, cancel_futures=True)

    def segment_case(self, case: Case, output_dir: str | Path | None = None, overwrite: bool = False,
                     on_stage: Callable[[str], None] | None = None) -> SegmentResult:
        """Segment one case. With ``output_dir``, write its layout's outputs (label output, ``<case>_report.json``,
        ``<case>_overlay.png``): all checked before any work, staged under temporary names, renamed together.
        ``on_stage`` hears each stage as it starts ("reading", "preparing", "model", "writing"; for raw scans also
        each preparation step between reading and preparing, see `neuromap.prepare_raw.prepare_raw`), e.g. for the
        web app's progress bar."""
        stage = on_stage or (lambda name: None)
        return self._finish(self._read(case, output_dir, overwrite, stage), overwrite, stage)

    def _as_segmented(self, case: Case, stage: Callable[[str], None] | None = None
                      ) -> tuple[Case, list[Path], list[tuple[EngineModel, ModelSpec]]]:
        """``case`` as this segmenter reads it (raw scans wear a `RawLayout` for the model's sequences, which
        tells ``stage`` its steps), with the checkpoints and the loaded models it gets."""
        model_files = self.model_files(case)
        models = self._models(model_files)
        if self.raw is not None:
            case = as_raw(case, self.raw, models[0][1].modalities, stage)
        return case, model_files, models

    def _read(self, case: Case, output_dir: str | Path | None, overwrite: bool,
              stage: Callable[[str], None] = lambda name: None) -> _Read:
        """The reading stage: model choice, output checks, then load and prepare (see the module docstring)."""
        t0 = time.perf_counter()
        case, model_files, models = self._as_segmented(case, stage)
        spec, layout = models[0][1], case.layout
        if DICOM_SEG in self.optional and DICOM_SEG not in layout.optional_outputs:
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): --dicom-seg needs a DICOM input (a DICOM SEG must reference "
                "the source images). Fix: segment the DICOM study, or leave out --dicom-seg."
            )
        if set(self.optional) - set(layout.optional_outputs):
            raise NeuroMapError(
                f"case '{case.case_id}' ({case.root}): --uncertainty and --probabilities are not available for "
                f"{layout.name} inputs (they write NIfTI maps on the grid the case was read on). Fix: leave them "
                "out for this case."
            )
        files: dict[str, Path] = {}
        if output_dir is not None:
            check_writable_folder(output_dir, "segmentation outputs")
            files = layout.output_files(case, Path(output_dir), self.optional)
            _guard_outputs(case, layout.planned_writes(case, Path(output_dir), self.optional), overwrite)
        stage("reading")
        volume = layout.load(case, spec.modalities, with_seg=False)
        stage("preparing")
        t1 = time.perf_counter()
        prepared = prepare(volume, spec.preprocess)
        timings = {"load_s": t1 - t0, "preprocess_s": time.perf_counter() - t1}
        return _Read(case, model_files, models, files, volume, prepared, timings, t0)

    def _finish(self, read: _Read, overwrite: bool, stage: Callable[[str], None] = lambda name: None
                ) -> SegmentResult:
        """The model stage and everything after it, for a case `_read` prepared."""
        cfg, case, volume, files, timings = self.cfg, read.case, read.volume, read.files, read.timings
        layout, models = case.layout, read.models
        spec = models[0][1]
        task = task_of(spec)
        stage("model")
        t1 = time.perf_counter()
        spacing = read.prepared.spacing if volume.spacing_known else None  # skip_slices measures in mm
        probs = predict_probs(models, read.prepared.image, cfg, device=self.device, spacing=spacing)
        timings["inference_s"] = time.perf_counter() - t1
        stage("writing")
        t1 = time.perf_counter()
        inverse = read.prepared.inverse
        internal, notes = postprocess(labels_in_input_grid(probs, inverse, task),
                                      volume.voxel_ml if volume.spacing_known else None, cfg, task.postprocess_steps())
        output_volume, internal = layout.output_grid(volume, internal)
        convention = task.output_convention(self.labels)
        prediction = Prediction(case, output_volume, spec, internal,
                                output_image(internal, output_volume.reference, convention), task, inverse.ras,
                                inverse.ras_spacing)
        warnings = [*notes, *volume.warnings]
        if spec.preprocess.mode == "2d" and spec.preprocess.slice_range is not None:
            warnings.append(f"2D model: only axial slices {spec.preprocess.slice_range} were segmented.")
        if not internal.any():
            warnings.append(task.nothing_found)
        timings["postprocess_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        single_pass = partial(predict_probs, models, cfg=cfg.model_copy(update={"tta": False}), device=self.device,
                              spacing=spacing)
        quality = assess(read.prepared, probs, single_pass, cfg.tta, internal, output_volume, spec, task,
                         partial(agreement_sample, cfg=cfg, spacing=spacing))
        maps = layout.output_maps(volume, map_images(probs, inverse, task, volume.reference, requested_maps(cfg)))
        timings["quality_s"] = time.perf_counter() - t1
        report = case_report(output_volume, spec, task, read.model_files, cfg, convention, internal, warnings,
                             self.device, models[0][0].name,
                             {**layout.report_extra(prediction), **report_entries(task, tuple(maps)),
                              "quality": quality})
        result = SegmentResult(case.case_id, prediction.labels, report, maps=maps)
        if files:
            t1 = time.perf_counter()
            shown = "flair" if "flair" in volume.modalities else volume.modalities[0]
            png, picture_notes = layout.picture(prediction, volume.image[volume.modalities.index(shown)],
                                                f"{case.case_id} ({shown}) - {spec.model.name} - "
                                                f"{quality_text(quality)}",
                                                cfg.picture_convention == "radiological")
            warnings += picture_notes
            timings["overlay_s"] = time.perf_counter() - t1
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        if files:
            report["timings_s"]["total_s"] = round(time.perf_counter() - read.started, 3)
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
    """Refuse targets that are input files or lie in a case's input folder, and existing targets unless
    ``overwrite``."""
    inputs = case.input_paths()
    # A case found as a folder (not an explicit file mapping) is that folder: outputs inside it would change the
    # input, and the next run would read them as part of the case (a label map as its ground truth, a DICOM SEG
    # as a series, a mask among the slices of a slice folder).
    root = case.root.resolve() if case.naming != "mapping" and case.root.is_dir() else None
    for target in targets:
        resolved = target.resolve()
        if resolved in inputs:
            raise NeuroMapError(f"{target}: would overwrite an input file. Fix: choose another output folder.")
        if root is not None and resolved.is_relative_to(root):
            raise NeuroMapError(
                f"{target}: lies inside the input folder of case '{case.case_id}' ({case.root}); inputs are never "
                "changed, and a later run would read the outputs as part of the case. Fix: choose an output folder "
                "outside it."
            )
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise NeuroMapError(f"output exists: {', '.join(existing[:3])}{more}. Fix: another -o folder or --overwrite.")


def segment(
    inputs: Inputs, output_dir: str | Path | None = None, model: ModelChoice = None, labels: str = "brats",
    overwrite: bool = False, progress: bool = False, cfg: InferenceConfig | None = None,
    mapping: Mapping[str, str | Path] | None = None, dicom_seg: bool = False, raw: bool | RawOptions = False,
    num_parts: int | None = None, part_id: int | None = None, resume: bool = False, **options,
) -> list[SegmentResult]:
    """Segment one or many cases (the Python face of ``neuromap segment``).

    ``inputs``: a case folder, a parent folder of cases, a list of those, or a mapping
    ``{"t1ce": path_or_nibabel_image, "flair": ...}`` for one case; ``mapping`` is the same with one case folder
    (``--map``), or for a DICOM study its series by modality (`neuromap.io.inputs`). ``dicom_seg`` adds a DICOM
    SEG output to DICOM cases. ``raw=True`` (or `RawOptions`: reference, skull_stripped, n4, save_brain_mask,
    save_prepared) prepares raw scans first: sequences on their own grids, skull on, thick slices. Inference options
    come as an InferenceConfig (``cfg``) or as its fields (``tta=True, device="cpu"``), not both. ``num_parts`` and
    ``part_id`` segment one deterministic share of the cases and write its summary (`neuromap.cohort`); ``resume``
    skips cases whose outputs are complete (``--continue``). Returns one result per case with the label image
    (input grid, ``labels`` convention) and the report dict; files are written when ``output_dir`` is set.
    """
    part = Part.of(num_parts, part_id)
    segmenter = Segmenter(model, inference_config(cfg, options), labels, dicom_seg, raw)
    with cases_from_inputs(inputs, mapping) as cases:
        return segmenter.segment(cases, output_dir, overwrite, progress, part, resume)
