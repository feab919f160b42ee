"""Raw-scan preparation (``neuromap segment CASE --raw``): sequences each on their own grid, skull on, thick
slices -> co-registered, brain-extracted, 1 mm isotropic sequences the models read; labels go back onto the
reference sequence's own grid. One module per step: `inputs` (read, choose the reference), `register` (rigid,
Mattes MI, quality), `grid` (working grid, resampling, back to the reference), `brain` (deepbet), `pipeline`
(the steps in order, timed), `outputs` (what ``--raw`` adds to a segmentation's files and report).
"""

from neuromap.prepare_raw.pipeline import RawOptions, RawPreparation, prepare_raw

__all__ = ["RawOptions", "RawPreparation", "prepare_raw"]
