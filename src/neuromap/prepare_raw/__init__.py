"""Raw-scan preparation (``neuromap segment CASE --raw``): sequences each on their own grid, skull on, thick
slices -> co-registered, brain-extracted, 1 mm isotropic sequences the models read; labels go back onto the
reference sequence's own grid. One module per step: `inputs` (read, choose the reference), `register` (rigid,
Mattes MI, quality), `grid` (working grid, resampling, back to the reference), `brain` (deepbet), `pipeline`
(the steps in order, timed), `layout` (`RawLayout`: what ``--raw`` changes in loading, outputs and report).
"""

from neuromap.prepare_raw.layout import RawLayout, as_raw
from neuromap.prepare_raw.pipeline import RawOptions, RawPreparation, RawVolume, prepare_raw

__all__ = ["RawLayout", "RawOptions", "RawPreparation", "RawVolume", "as_raw", "prepare_raw"]
