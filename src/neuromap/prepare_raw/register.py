"""Rigid co-registration of one sequence to the reference (SimpleITK), and how good the result is.

Method: Euler 3D (rotation + translation), Mattes mutual information (the sequences have different contrasts,
so intensities are not comparable but their joint histogram is), regular-step gradient descent with scales
from physical shifts, two resolution levels (shrink 2/1, smoothing 2/0 mm, after `coarsen`) so a start a few degrees and
millimetres off is pulled in before the fine level. Samples are drawn at random with a fixed seed, so a run is
repeatable.

Start: the scanner's own coordinates (sequences of one session share a frame of reference) or the centres of
mass aligned (MOMENTS), whichever has the better metric before optimising; the report says which.

Quality: the final Mattes metric (negative; lower is better, but its scale depends on the contrast pair), the
normalised mutual information NMI = (H(A) + H(B)) / H(A, B) of the reference and the registered sequence inside
the brain (1..2), and its `sharpness`: the share of that information lost when the sequence is moved 5 mm, which
is what the poor-registration warning reads (`POOR_SHARPNESS`, chosen from measurements:
`docs/experiments/raw_registration.md`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

SEED = 20250  # metric sampling; fixed so the same inputs give the same transform
HISTOGRAM_BINS = 32
SAMPLING = 0.05  # fraction of reference voxels sampled per evaluation
# Registration quality (`sharpness`) below this: warn that the registration looks poor. Measured: aligned
# sequences 0.47-0.61, 2 mm / 2 degrees off 0.31-0.54, 5 mm off <= 0.23, 5 degrees off 0.23-0.38, 10 degrees off
# <= 0.24 (docs/experiments/raw_registration.md).
POOR_SHARPNESS = 0.30
SHIFT_VOXELS = 5  # 5 mm on the 1 mm working grid
REGISTRATION_MM = 2.0  # voxels finer than this are averaged before registering (see `coarsen`)
SHRINK = 2  # the first level of the registration pyramid (`_method`)
MIN_SAMPLES = 4 * SHRINK  # ITK's smoothing needs >= 4 samples per axis on the shrunk level


@dataclass
class Registration:
    """The transform mapping reference points to the moving sequence, and what the optimiser reported."""

    transform: object  # SimpleITK Euler3DTransform
    start: str  # "scanner coordinates" or "centres of mass"
    metric: float  # final Mattes MI (at full resolution)
    iterations: int
    stop: str
    seconds: float

    def parameters(self) -> dict:
        """Rotation in degrees about x/y/z (LPS scanner axes, about ``centre_mm``) and translation in mm: the
        transform from reference points to the sequence's points, i.e. how far the sequence had moved."""
        values = np.array(self.transform.GetParameters())
        return {"rotation_deg": [round(float(v), 3) for v in np.degrees(values[:3])],
                "translation_mm": [round(float(v), 3) for v in values[3:]],
                "centre_mm": [round(float(v), 3) for v in self.transform.GetCenter()]}


def _method(threads: int | None):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, SEED)
    # Gradients at the sample points by finite differences, not a gradient image of the whole volume first:
    # 3-4x faster per evaluation, and the sampled points are few.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=150, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([SHRINK, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if threads:
        reg.SetNumberOfThreads(threads)
    return reg


def coarse_factors(spacing: tuple[float, ...], target_mm: float = REGISTRATION_MM) -> list[int]:
    """How many neighbouring voxels `coarsen` averages along each axis."""
    return [max(1, int(round(target_mm / s))) for s in spacing]


def too_small_to_register(shape: tuple[int, ...], spacing: tuple[float, ...]) -> str | None:
    """Why a volume is too small for `register_rigid` (None when it is not): after `coarsen` every axis needs
    ``MIN_SAMPLES`` samples, e.g. 16 slices of 1 mm, 8 of 5 mm; fewer make ITK fail deep inside the pyramid."""
    samples = [n // f for n, f in zip(shape, coarse_factors(spacing), strict=True)]
    short = [f"axis {axis + 1}: {n} voxels of {s:.2g} mm" for axis, (n, s, k) in
             enumerate(zip(shape, spacing, samples, strict=True)) if k < MIN_SAMPLES]
    if not short:
        return None
    return (f"too small to co-register ({'; '.join(short)}); co-registration needs at least {MIN_SAMPLES} samples "
            f"of {REGISTRATION_MM:g} mm or more along every axis (e.g. {MIN_SAMPLES} slices of 5 mm, "
            f"{int(MIN_SAMPLES * REGISTRATION_MM)} of 1 mm)")


def coarsen(image, target_mm: float = REGISTRATION_MM):
    """Average neighbouring voxels (bin shrink) along the axes finer than ``target_mm``; thick-slice axes stay.

    A rigid fit to 5 mm slices gains nothing from 0.9 mm pixels, and every evaluation costs 4x less."""
    import SimpleITK as sitk

    factors = coarse_factors(image.GetSpacing(), target_mm)
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def register_rigid(reference, moving, threads: int | None = None) -> Registration:
    """Register ``moving`` to ``reference`` (both float32 SimpleITK images on their own grids)."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    reference, moving = coarsen(reference), coarsen(moving)
    starts = {
        "scanner coordinates": sitk.Euler3DTransform(),
        "centres of mass": sitk.CenteredTransformInitializer(
            reference, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS),
    }
    # The rotation centre goes to the reference's centre of mass for both starts, so rotations stay small numbers.
    centre = sitk.CenteredTransformInitializer(
        reference, reference, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS).GetCenter()
    scores = {}
    for name, start in starts.items():
        start = sitk.Euler3DTransform(start)
        offset = np.array(start.GetTranslation()) if name != "scanner coordinates" else np.zeros(3)
        start.SetCenter(centre)
        start.SetTranslation([float(v) for v in offset])
        starts[name] = start
        probe = _method(threads)
        probe.SetInitialTransform(start, inPlace=False)
        probe.SetShrinkFactorsPerLevel([SHRINK])
        probe.SetSmoothingSigmasPerLevel([1.0])
        scores[name] = probe.MetricEvaluate(reference, moving)
    best = min(scores, key=scores.get)
    reg = _method(threads)
    reg.SetInitialTransform(starts[best], inPlace=False)
    final = reg.Execute(reference, moving)
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(final).GetNthTransform(0)) \
        if final.GetName() == "CompositeTransform" else sitk.Euler3DTransform(final)
    return Registration(transform=transform, start=best, metric=float(reg.GetMetricValue()),
                        iterations=int(reg.GetOptimizerIteration()), stop=reg.GetOptimizerStopConditionDescription(),
                        seconds=time.perf_counter() - t0)


def nmi(a: np.ndarray, b: np.ndarray, mask: np.ndarray, bins: int = HISTOGRAM_BINS) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) of two aligned images inside ``mask``: 1 when
    independent, 2 when one determines the other. Intensities are clipped to their 0.5-99.5th percentiles in
    the mask first, so a few bright voxels do not squeeze the histogram."""
    every = (slice(None, None, 2),) * 3  # one voxel in 8 (a regular lattice): the same number, 8x less work
    mask = mask[every]
    x, y = a[every][mask].astype(np.float64), b[every][mask].astype(np.float64)
    if x.size < 100:
        return float("nan")
    x = np.clip(x, *np.percentile(x, [0.5, 99.5]))
    y = np.clip(y, *np.percentile(y, [0.5, 99.5]))
    joint, _, _ = np.histogram2d(x, y, bins=bins)
    p = joint / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(p.sum(axis=0)) + entropy(p.sum(axis=1))) / entropy(p.ravel())


def sharpness(a: np.ndarray, b: np.ndarray, mask: np.ndarray, shift: int = SHIFT_VOXELS) -> dict[str, float]:
    """How much of the information two images share is lost when one is moved ``shift`` voxels (5 mm on the
    working grid) along each axis: 1 - (mean shifted NMI - 1) / (NMI - 1).

    NMI alone depends on the contrast pair and the scan (aligned sequences measured 1.04 on the raw TCGA study and
    1.22 on a skull-stripped BraTS T1, where 10 mm off still gave 1.05), so no single NMI value tells good from
    poor. At a true alignment every 5 mm move loses about half the shared information (0.47-0.61 measured); a
    sequence 5 mm or 5 degrees off, or at a false optimum, loses little or even gains."""
    value = nmi(a, b, mask)
    shifted = []
    for axis in range(3):
        for sign in (1, -1):
            fixed = [slice(None)] * 3
            moved = [slice(None)] * 3
            fixed[axis], moved[axis] = (slice(shift, None), slice(None, -shift)) if sign > 0 else \
                (slice(None, -shift), slice(shift, None))
            fixed, moved = tuple(fixed), tuple(moved)
            shifted.append(nmi(a[fixed], b[moved], mask[fixed]))
    mean = float(np.mean(shifted))
    return {"nmi_in_brain": round(value, 4), "nmi_moved_5mm": round(mean, 4),
            "sharpness": round(1.0 - (mean - 1.0) / (value - 1.0), 3) if value > 1.0 else 0.0}
