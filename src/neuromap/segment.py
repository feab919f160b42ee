"""`neuromap.segment`: case files in, label map in the input's grid + report + overlay out.

One code path for the CLI, the Python API and the web app: load (validated) -> prepare -> model(s) ->
probabilities -> labels -> postprocess -> back to the input grid -> write atomically.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import torch

from neuromap.checkpoint import ModelSpec, load_model
from neuromap.config import InferenceConfig
from neuromap.errors import NeuroMapError
from neuromap.inference import postprocess, predict_probs, probs_to_labels
from neuromap.io import Case, Volume, label_image, load_case
from neuromap.io.atomic import atomic_path
from neuromap.labels import from_internal
from neuromap.preprocess import prepare
from neuromap.report import RESEARCH_NOTICE, overlay_png, volumes_ml

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_models() -> dict[str, dict]:
    """Name -> entry of the models shipped in ``neuromap/weights/models.json``."""
    index = WEIGHTS_DIR / "models.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def resolve_model_paths(model: str | Path | list[str | Path] | None, available: list[str]) -> list[Path]:
    """A shipped name, a checkpoint path, several of them (an ensemble), or None: the shipped model with the
    most sequences that this case has (e.g. FLAIR+T1ce when T1/T2 are missing)."""
    shipped = shipped_models()
    if model is None:
        usable = [(len(e["modalities"]), name) for name, e in shipped.items()
                  if e.get("task", "brats") == "brats" and set(e["modalities"]) <= set(available)]
        if not usable:
            needs = "; ".join(f"{n}: {', '.join(e['modalities'])}" for n, e in shipped.items()) or "none shipped"
            raise NeuroMapError(
                f"no shipped model works with the sequences found ({', '.join(available)}). Models need: {needs}. "
                "Fix: add the missing sequence files or pass --model PATH to a checkpoint."
            )
        return [WEIGHTS_DIR / shipped[max(usable)[1]]["file"]]
    models = model if isinstance(model, list) else [model]
    paths = []
    for item in models:
        name = str(item)
        paths.append(WEIGHTS_DIR / shipped[name]["file"] if name in shipped else Path(name))
    return paths


@lru_cache(maxsize=8)
def _cached_model(path: str, mtime: float) -> tuple[torch.nn.Module, ModelSpec]:
    return load_model(path)


def get_models(paths: list[Path], device: torch.device) -> list[tuple[torch.nn.Module, ModelSpec]]:
    out = []
    for path in paths:
        if not path.is_file():
            raise NeuroMapError(f"{path}: model not found. Shipped models: {sorted(shipped_models()) or 'none'}.")
        model, spec = _cached_model(str(path.resolve()), path.stat().st_mtime)
        out.append((model.to(device), spec))
    specs = [s for _, s in out]
    if len({(tuple(s.modalities), s.task, s.model.out) for s in specs}) > 1:
        raise NeuroMapError("ensemble members must share modalities, task and output type.")
    return out


@dataclass
class SegmentResult:
    case_id: str
    labels: nib.Nifti1Image  # in the input's grid, in the requested label convention
    report: dict
    files: dict[str, Path] = field(default_factory=dict)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise NeuroMapError("--device cuda requested but no CUDA GPU is available. Fix: use --device cpu.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _guard_outputs(case: Case, targets: list[Path]) -> None:
    inputs = {Path(r.path).resolve() for r in case.images.values()}
    if case.seg:
        inputs.add(Path(case.seg.path).resolve())
    for target in targets:
        if target.resolve() in inputs:
            raise NeuroMapError(f"{target}: would overwrite an input file. Fix: choose another output folder.")


def segment_case(
    case: Case, output_dir: str | Path | None = None, model: str | Path | list | None = None,
    cfg: InferenceConfig | None = None, labels: str = "brats", overwrite: bool = False,
) -> SegmentResult:
    """Segment one case; writes ``<case>_seg.nii.gz``, ``<case>_report.json``, ``<case>_overlay.png`` when
    ``output_dir`` is given (atomically, all checked before any is written)."""
    cfg = cfg or InferenceConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = _device(cfg.device)
    models = get_models(resolve_model_paths(model, case.modalities), device)
    spec = models[0][1]
    targets = {}
    if output_dir is not None:
        out = Path(output_dir)
        targets = {k: out / f"{case.case_id}_{k}" for k in ("seg.nii.gz", "report.json", "overlay.png")}
        _guard_outputs(case, list(targets.values()))
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing and not overwrite:
            raise NeuroMapError(f"output exists: {', '.join(existing)}. Fix: another -o folder or --overwrite.")
    volume: Volume = load_case(case, spec.modalities, with_seg=False)
    timings["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    prepared = prepare(volume, spec.preprocess)
    timings["preprocess_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    probs = predict_probs(models, prepared.image, cfg, device=device)
    timings["inference_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # Probabilities go back to the crop at input resolution before the decision, so borders stay smooth.
    crop_probs = prepared.inverse.to_original(probs.cpu().numpy(), linear=True)
    internal = probs_to_labels(crop_probs, spec)
    internal, notes = postprocess(internal, volume.voxel_ml, cfg)
    out_labels = from_internal(internal, labels)
    label_img = label_image(out_labels, volume.reference)
    warnings = list(notes)
    if spec.preprocess.mode == "2d" and spec.preprocess.slice_range is not None:
        warnings.append(f"2D model: only axial slices {spec.preprocess.slice_range} were segmented.")
    vols = volumes_ml(internal, volume.voxel_ml)
    if vols["WT"] == 0:
        warnings.append("no tumour found.")
    timings["postprocess_s"] = time.perf_counter() - t1
    report = {
        "case_id": case.case_id,
        "notice": RESEARCH_NOTICE,
        "research_use_only": True,
        "inputs": {m: str(case.images[m]) for m in spec.modalities},
        "model": {"files": [str(p) for p in resolve_model_paths(model, case.modalities)],
                  "architecture": spec.model.name, "modalities": spec.modalities, "tta": cfg.tta,
                  "ensemble_size": len(models), "validation": spec.info.get("val_dice")},
        "label_convention": labels,
        "voxel_spacing_mm": list(volume.spacing),
        "volumes_ml": {k: round(v, 3) for k, v in vols.items()},
        "warnings": warnings,
        "device": str(device),
    }
    result = SegmentResult(case.case_id, label_img, report)
    if targets:
        t1 = time.perf_counter()
        inv = prepared.inverse
        shown = "flair" if "flair" in volume.modalities else volume.modalities[0]
        png = overlay_png(inv.ras(volume.image[volume.modalities.index(shown)]), inv.ras(internal), inv.ras_spacing,
                          f"{case.case_id} ({shown}) - {spec.model.name}")
        timings["write_s"] = time.perf_counter() - t1
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
        # All three files are staged under temporary names and renamed only when every one is complete,
        # so an error leaves no partial set of outputs behind.
        with contextlib.ExitStack() as stack:
            tmp = {k: stack.enter_context(atomic_path(p, overwrite)) for k, p in targets.items()}
            nib.save(label_img, str(tmp["seg.nii.gz"]))
            tmp["overlay.png"].write_bytes(png)
            tmp["report.json"].write_text(json.dumps(report, indent=2))
        result.files = targets
    else:
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return result


def segment(
    inputs: str | Path | list[str | Path] | dict[str, str | Path | nib.Nifti1Image],
    output_dir: str | Path | None = None, model: str | Path | list | None = None, tta: bool = False,
    device: str = "auto", labels: str = "brats", overwrite: bool = False, progress: bool = False,
    cfg: InferenceConfig | None = None,
) -> list[SegmentResult]:
    """Segment one or many cases (the Python face of ``neuromap segment``).

    ``inputs``: a case folder, a parent folder of cases, a list of those, or a mapping
    ``{"t1ce": path_or_nibabel_image, "flair": ...}`` for one case. Returns one result per case with the label
    image (input grid, ``labels`` convention) and the report dict; files are written when ``output_dir`` is set.
    """
    cfg = (cfg or InferenceConfig()).model_copy(update={"tta": tta or (cfg.tta if cfg else False), "device": device})
    cases = _cases_from_inputs(inputs)
    results = []
    from tqdm import tqdm

    for case in tqdm(cases, desc="segmenting", disable=not progress or len(cases) < 2, unit="case"):
        results.append(segment_case(case, output_dir, model, cfg, labels, overwrite))
    return results


def _cases_from_inputs(inputs) -> list[Case]:
    from neuromap.io import case_from_mapping, discover_cases

    if isinstance(inputs, dict):
        images = {k: v for k, v in inputs.items() if isinstance(v, nib.spatialimages.SpatialImage)}
        if images:
            import tempfile

            # In-memory images: write them once to a private temp folder so the one validated loader reads them.
            tmp = Path(tempfile.mkdtemp(prefix="neuromap-"))
            mapping = {}
            for key, value in inputs.items():
                if isinstance(value, nib.spatialimages.SpatialImage):
                    nib.save(value, str(tmp / f"{key}.nii.gz"))
                    mapping[key] = tmp / f"{key}.nii.gz"
                else:
                    mapping[key] = value
            return [case_from_mapping(mapping, case_id="case")]
        return [case_from_mapping(inputs)]
    paths = inputs if isinstance(inputs, list) else [inputs]
    cases: list[Case] = []
    for path in paths:
        cases.extend(discover_cases(path))
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise NeuroMapError(f"several inputs have the same case id {dupes}; their outputs would collide.")
    return cases
