"""Which DICOM reader: pydicom + SimpleITK's ImageSeriesReader, or dcm2niix? Correctness and speed, measured.

A DICOM study is written from a shared NIfTI case (`neuromap.io.dicom_export.write_study`: localizer, four
series, random file names, nested and split folders), plus three geometry variants of one sequence: the
AURORA case (RAS-stored, so rows run right-to-left in DICOM), the BraTS T1 on an oblique grid (rotated
20 degrees about two axes, data unchanged) and the T2 stored unsigned with a RescaleIntercept. Each reader
turns every series back into (array, affine); both sides are brought to the closest-RAS voxel order
(nibabel, axis flips/permutations only) and compared with the source NIfTI: largest affine difference (mm)
and whether the arrays are identical. Speed: the four-series study from folder to four arrays + affines,
median of N runs after a warm-up (page cache warm for both), on the four-series study and on the same study
with a diffusion and a perfusion series added (920 more files), as clinical exports come.

    python benchmarks/dicom_reader.py [--case DIR] [--runs 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_CASE = DATA / "brats2018" / "Brats18_2013_2_1"
AURORA = DATA / "unlabelled" / "AURORA-example"


def read_sitk(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """NeuroMap's reader: pydicom headers (discovery, sorting, geometry) + SimpleITK pixels."""
    from neuromap.io.dicom import read_series, scan_dicom

    series, _ = scan_dicom(folder)
    return {s.description: (read_series(s), s.affine) for s in series if s.problem is None}


def read_dcm2niix(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """dcm2niix (the PyPI wheel's binary) to uncompressed NIfTI in a temp folder, then nibabel."""
    import dcm2niix

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([dcm2niix.bin, "-z", "n", "-f", "%s_%d", "-o", tmp, str(folder)], check=True,
                       capture_output=True)
        for path in Path(tmp).glob("*.nii"):
            meta = json.loads(path.with_suffix(".json").read_text())
            if "LOCALIZER" in meta.get("ImageType", []):
                continue
            img = nib.load(path)
            out[meta["SeriesDescription"]] = (np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return out


def read_dcm2niix_with_scan(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """dcm2niix as NeuroMap would have to use it: its sidecars lack the contrast-agent tag that tells T1ce
    from T1, and DICOM SEG needs pydicom datasets, so the pydicom header scan runs as well."""
    from neuromap.io.dicom import scan_dicom

    scan_dicom(folder)
    return read_dcm2niix(folder)


READERS = {"pydicom + SimpleITK": read_sitk, "dcm2niix": read_dcm2niix,
           "dcm2niix + pydicom header scan": read_dcm2niix_with_scan}


def compare(source: nib.Nifti1Image, array: np.ndarray, affine: np.ndarray) -> tuple[float, bool]:
    """(largest affine difference in mm, arrays identical) after both go to the closest-RAS voxel order."""
    a = nib.as_closest_canonical(source)
    b = nib.as_closest_canonical(nib.Nifti1Image(array.astype(np.float32), affine))
    if a.shape != b.shape:
        return float("inf"), False
    return float(np.abs(a.affine - b.affine).max()), bool(np.array_equal(np.asarray(a.dataobj, np.float32),
                                                                         np.asarray(b.dataobj)))


def rotated(image: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    """The same voxels on an oblique grid: the affine rotated about x then z (around the volume centre)."""
    t = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = image.affine.copy()
    centre = affine[:3, :3] @ (np.array(image.shape[:3]) / 2) + affine[:3, 3]
    affine[:3, :3] = rz @ rx @ affine[:3, :3]
    affine[:3, 3] = centre - affine[:3, :3] @ (np.array(image.shape[:3]) / 2)
    return nib.Nifti1Image(np.asanyarray(image.dataobj), affine)


def build(root: Path, case: Path) -> dict[str, tuple[Path, dict[str, nib.Nifti1Image]]]:
    """The study used for speed, and the geometry variants: name -> (folder, {SeriesDescription: source})."""
    from neuromap.io.dicom_export import PROTOCOL, Study, write_series, write_study

    prefix = case / case.name
    images = {m: nib.load(f"{prefix}_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")}
    study = Study()
    write_study(images, root / "study", study)
    sources = {PROTOCOL[m]["description"]: img for m, img in images.items()}
    cases = {"study": (root / "study", sources)}
    shutil.copytree(root / "study", root / "clinical")
    _extra_series(images["t2"], root / "clinical", study)
    cases["clinical"] = (root / "clinical", sources)
    variants = {"oblique": rotated(images["t1"]), "intercept": images["t2"]}
    if AURORA.is_dir():
        variants["RAS-stored"] = nib.load(next(AURORA.glob("*t1c.nii.gz")))
    for name, img in variants.items():
        write_series(img, root / name, Study(), series_number=2, description=name, random_names=True,
                     intercept=-1000.0 if name == "intercept" else None)
        cases[name] = (root / name, {name: img})
    return cases


def _extra_series(t2: nib.Nifti1Image, root: Path, study) -> None:
    """What else a clinical study holds: diffusion (3 volumes x 40 slices) and perfusion (40 phases x 20
    slices) at 128 x 128, written at the same positions within each series, as scanners do."""
    from pydicom.uid import generate_uid

    from neuromap.io.dicom_export import write_series

    small = t2.slicer[::2, ::2, ::4]
    for name, volumes, slices in (("ep2d_diff_3scan_trace", 3, (0, 39)), ("ep2d_perf", 40, (10, 30))):
        uid = generate_uid()
        for v in range(volumes):
            write_series(small, root / name / f"v{v}", study, series_number=20 + len(name), description=name,
                         random_names=True, z_range=slices, series_uid=uid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {"case": args.case.name, "cpu": _cpu(), "runs": args.runs, "readers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cases = build(Path(tmp), args.case)
        for reader_name, reader in READERS.items():
            geometry = {}
            for case_name, (folder, sources) in cases.items():
                read = reader(folder)
                for description, source in sources.items():
                    if description not in read:
                        geometry[f"{case_name}/{description}"] = {"found": False}
                        continue
                    diff, identical = compare(source, *read[description])
                    geometry[f"{case_name}/{description}"] = {"affine_max_diff_mm": diff, "identical": identical}
            result["readers"][reader_name] = {"geometry": geometry}
            for study in ("study", "clinical"):
                times = []
                for _ in range(args.runs + 1):  # the first run warms the page cache and imports
                    t0 = time.perf_counter()
                    reader(cases[study][0])
                    times.append(time.perf_counter() - t0)
                result["readers"][reader_name][f"{study}_seconds"] = [round(t, 3) for t in times[1:]]
                result["readers"][reader_name][f"{study}_median_s"] = round(statistics.median(times[1:]), 3)
            print(reader_name, json.dumps(result["readers"][reader_name], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
