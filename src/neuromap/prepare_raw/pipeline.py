"""Raw scans -> the prepared form the models read, and the labels back onto the reference sequence's grid.

Steps, each timed in the report: read (every sequence on its own grid) -> register (each other sequence to the
reference, rigid, Mattes MI) -> resample (all sequences onto the 1 mm working grid over the reference's field of
view) -> brain mask (deepbet; or the non-zero voxels with ``skull_stripped``) -> quality (per registered sequence:
NMI inside the brain and its sharpness; a warning below `POOR_SHARPNESS`) -> optional N4. The result is a
`RawVolume`: an ordinary `Volume` with a brain mask, so cropping, z-scoring, the model and post-processing are the
normal pipeline's, that also carries its preparation; `RawPreparation.to_reference` then puts the labels on the
reference sequence's own grid, with its affine and header.

Wall and CPU seconds are recorded per step; CPU seconds are the process's, so when the Segmenter reads the next
case in a background thread while a model runs (batch mode), they include the model's share of that time.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from neuromap.io.case import Case, Volume
from neuromap.io.layout import Layout
from neuromap.prepare_raw import brain, grid
from neuromap.prepare_raw.inputs import Sequence, choose_reference, read_sequences
from neuromap.prepare_raw.register import POOR_SHARPNESS, register_rigid, sharpness


@dataclass(frozen=True)
class RawOptions:
    """What ``--raw`` and its companions ask for."""

    reference: str | None = None  # --reference MOD; default T1ce, else FLAIR
    skull_stripped: bool = False  # --skull-stripped: inputs have no skull; brain = non-zero voxels
    n4: bool = False  # --n4: bias-field correction on the working grid, inside the brain
    save_brain_mask: bool = False  # --save-brain-mask: <case>_brain_mask.nii.gz on the reference grid
    save_prepared: bool = False  # --save-prepared: <case>_<mod>_prepared.nii.gz on the 1 mm working grid
    spacing: float = 1.0  # working grid, mm (what the shipped models were trained on)
    threads: int | None = None


@dataclass
class RawPreparation:
    """A raw case prepared for the models: the working-grid `Volume` plus what is needed to go back."""

    case: Case
    options: RawOptions
    reference: str
    sequences: dict[str, Sequence] = field(default_factory=dict)
    volume: RawVolume | None = None
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per step
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # process CPU seconds per step (all threads)
    registration: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    mask_from: str = ""
    working_labels: np.ndarray | None = None  # internal labels on the working grid (for the overlay)
    _grid: object = None
    _reference_grid: object = None

    @property
    def reference_image(self) -> nib.Nifti1Image:
        """The reference sequence's own image: its grid, affine and header are the labels file's."""
        return self.sequences[self.reference].header

    def to_reference(self, internal: np.ndarray) -> np.ndarray:
        """Labels on the working grid -> the reference sequence's grid (nearest neighbour)."""
        self.working_labels = internal
        return grid.labels_to_reference(internal, self._grid, self._reference_grid)

    def values_to_reference(self, values: np.ndarray) -> np.ndarray:
        """A working-grid map (X, Y, Z), or several with channels last -> the reference grid (linear)."""
        if values.ndim == 3:
            return grid.values_to_reference(values, self._grid, self._reference_grid)
        return np.stack([self.values_to_reference(values[..., k]) for k in range(values.shape[-1])], axis=-1)

    def brain_mask_on_reference(self) -> np.ndarray:
        return grid.labels_to_reference(self.volume.brain_mask, self._grid, self._reference_grid).astype(np.uint8)

    def prepared_images(self) -> dict[str, nib.Nifti1Image]:
        """Co-registered sequences on the working grid as NIfTI images (for ``save_prepared``)."""
        return {m: grid.nifti_on(self._grid, self.volume.image[i],
                                 descrip=f"NeuroMap raw prep {m}; research use only")
                for i, m in enumerate(self.volume.modalities)}

    def report(self) -> dict:
        ref = self.sequences[self.reference]
        return {
            "reference": self.reference,
            "reference_grid": {"shape": list(ref.array.shape), "spacing_mm": [round(s, 4) for s in ref.spacing]},
            "working_grid": {"shape": list(self.volume.image.shape[1:]), "spacing_mm": [self.options.spacing] * 3},
            "brain_mask": {"method": "non-zero voxels (--skull-stripped)" if self.options.skull_stripped
                           else f"deepbet on {self.mask_from}",
                           "volume_ml": round(float(self.volume.brain_mask.sum()) * self.options.spacing ** 3 / 1000,
                                              1)},
            "n4": self.options.n4,
            "registration": self.registration,
            "poor_registration_sharpness_below": POOR_SHARPNESS,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "cpu_s": {k: round(v, 3) for k, v in self.cpu_seconds.items()},
        }


@dataclass(kw_only=True)
class RawVolume(Volume):
    """A `Volume` made by raw preparation, with the preparation that made it: the 1 mm working-grid volume the
    models read, or the reference-grid volume the outputs are written on (`RawLayout.output_grid`)."""

    preparation: RawPreparation


def prepare_raw(case: Case, modalities: list[str], options: RawOptions, layout: Layout,
                on_step: Callable[[str], None] | None = None) -> RawPreparation:
    """Run the raw-scan steps for the sequences a model reads, reading them through ``layout`` (the one that
    found the case); see the module docstring. ``on_step`` hears each step as it starts ("read", "register",
    "resample", "brain_mask", "quality", "n4"), e.g. for the web app's progress bar."""
    import SimpleITK as sitk

    if options.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(options.threads)
    prep = RawPreparation(case, options, choose_reference(modalities, options.reference))
    clock = functools.partial(_timed, prep.timings, prep.cpu_seconds, on_step or (lambda step: None))

    with clock("read_s"):
        prep.sequences = read_sequences(case, modalities, layout)
        images = {m: s.sitk() for m, s in prep.sequences.items()}
    fixed = images[prep.reference]
    transforms = {}
    with clock("register_s"):
        for m in modalities:
            if m == prep.reference:
                continue
            result = register_rigid(fixed, images[m], options.threads)
            transforms[m] = result.transform
            prep.registration[m] = {"start": result.start, "mattes_mi": round(result.metric, 4),
                                    "iterations": result.iterations, "seconds": round(result.seconds, 2),
                                    **result.parameters()}
    with clock("resample_s"):
        prep._reference_grid = fixed
        prep._grid = grid.working_grid(fixed, options.spacing)
        channels = [grid.to_array(grid.resample(images[m], prep._grid, transforms.get(m))) for m in modalities]
        affine = grid.ras_affine(prep._grid)
    with clock("brain_mask_s"):
        if options.skull_stripped:
            mask = brain.foreground(channels[modalities.index(prep.reference)])
        else:
            prep.mask_from = brain.mask_source(modalities, prep.reference)
            mask = brain.extract_brain(channels[modalities.index(prep.mask_from)], affine)
    _check_mask(prep, mask, options)
    with clock("quality_s"):
        reference_channel = channels[modalities.index(prep.reference)]
        for m in transforms:
            quality = sharpness(reference_channel, channels[modalities.index(m)], mask)
            prep.registration[m].update(quality)
            if not quality["sharpness"] >= POOR_SHARPNESS:
                prep.warnings.append(
                    f"registration of {m} to {prep.reference} looks poor (moving it 5 mm loses only "
                    f"{quality['sharpness']:.0%} of the information it shares with {prep.reference} in the brain; "
                    f"aligned sequences lose 45-60 %, the warning starts below {POOR_SHARPNESS:.0%}): check the "
                    "co-registered sequences (--save-prepared) before trusting the labels.")
    if options.n4:
        from neuromap.preprocess import n4_correct

        with clock("n4_s"):
            channels = [n4_correct(c, mask) for c in channels]
    image = np.stack(channels).astype(np.float32, copy=False)
    image[:, ~mask] = 0  # skull and background gone, as in the prepared (BraTS-style) inputs the models know
    reference = grid.nifti_on(prep._grid, np.broadcast_to(np.uint8(0), mask.shape), np.uint8)
    prep.volume = RawVolume(case=case, image=image, modalities=list(modalities), reference=reference,
                            brain_mask=mask, preparation=prep, warnings=[
                                *layout.notes(case), *(w for s in prep.sequences.values() for w in s.warnings),
                                *prep.warnings])
    return prep


def _check_mask(prep: RawPreparation, mask: np.ndarray, options: RawOptions) -> None:
    """Warn when the brain mask's volume is outside what adult brains measure (about 1000-1700 mL with some
    margin), which means the extraction or the input went wrong."""
    volume_ml = float(mask.sum()) * options.spacing ** 3 / 1000
    if not 800 <= volume_ml <= 2000:
        where = "the non-zero voxels" if options.skull_stripped else f"deepbet on {prep.mask_from}"
        prep.warnings.append(
            f"brain mask ({where}) is {volume_ml:.0f} mL, outside the usual 800-2000 mL for an adult brain: "
            "check it (--save-brain-mask); a field of view that cuts the brain also gives a small mask.")


@contextlib.contextmanager
def _timed(timings: dict[str, float], cpu: dict[str, float], on_step: Callable[[str], None],
           name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[name]`` and the process CPU time (all threads) to
    ``cpu[name]``: on a shared machine the wall time says what the user waited, the CPU time what the step costs.
    ``on_step`` hears the step's name (without the ``_s``) first."""
    on_step(name.removesuffix("_s"))
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
