"""How normalised mutual information (NMI) in the brain and its sharpness change when a registration is off: the
measurement behind `neuromap.prepare_raw.register.POOR_SHARPNESS`.

Input: output folders of ``neuromap segment CASE --raw --save-prepared`` (the co-registered sequences on the
1 mm working grid, zero outside the brain). For each registered sequence, the script moves it away from the
found alignment by known rigid offsets (translations along x/y/z, rotations about x/y/z, about the brain centre)
and prints NMI against the reference inside the brain and the sharpness (`register.sharpness`) for each.
Results: `docs/experiments/raw_registration.md`.

    python benchmarks/raw_registration.py OUT_DIR [OUT_DIR ...] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.prepare_raw.grid import to_array, to_sitk
from neuromap.prepare_raw.register import sharpness

OFFSETS = [("aligned", (0, 0, 0), (0, 0, 0))] + [
    (f"{d} mm along {a}", tuple(d if i == k else 0 for i in range(3)), (0, 0, 0))
    for d in (2, 5, 10) for k, a in enumerate("xyz")] + [
    (f"{d} deg about {a}", (0, 0, 0), tuple(d if i == k else 0 for i in range(3)))
    for d in (2, 5, 10) for k, a in enumerate("xyz")]


def perturbations(folder: Path) -> dict[str, dict[str, float]]:
    import SimpleITK as sitk

    report = json.loads(next(folder.glob("*_report.json")).read_text())
    raw = report["raw_preparation"]
    prepared = {p.name.split("_")[-2]: p for p in folder.glob("*_prepared.nii.gz")}
    reference = nib.load(prepared[raw["reference"]])
    ref = np.asarray(reference.dataobj, dtype=np.float32)
    mask = ref != 0
    centre = np.argwhere(mask).mean(axis=0)
    centre_mm = (reference.affine @ [*centre, 1])[:3] * [-1, -1, 1]  # LPS, as SimpleITK
    out = {}
    for m in raw["registration"]:
        image = nib.load(prepared[m])
        moving = to_sitk(np.asarray(image.dataobj, dtype=np.float32), image.affine)
        out[m] = {}
        for name, shift, degrees in OFFSETS:
            t = sitk.Euler3DTransform()
            t.SetCenter([float(c) for c in centre_mm])
            t.SetRotation(*[float(np.radians(d)) for d in degrees])
            t.SetTranslation([float(s) for s in shift])
            moved = to_array(sitk.Resample(moving, moving, t, sitk.sitkLinear, 0.0))
            out[m][name] = sharpness(ref, moved, mask)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for folder in args.folders:
        results[folder.name] = perturbations(folder)
        for m, values in results[folder.name].items():
            print(f"{folder.name} {m} (NMI/sharpness): " + ", ".join(
                f"{k} {v['nmi_in_brain']:.3f}/{v['sharpness']:.2f}" for k, v in values.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
