"""Model outputs on a prepared volume: sliding window (3D, MONAI) or slice batches (2D), flip TTA and
ensembles, as probabilities in prepared space. Shared by training validation and the `Segmenter`; turning them
into labels is the task's job (`neuromap.tasks`), putting them back in the input grid `neuromap.export`'s.

Everything here is NumPy: the networks are runners (`neuromap.engines.runtimes.EngineModel`, NumPy batch in,
NumPy logits out), so a process whose network runs in OpenVINO or ONNX Runtime never imports PyTorch (about a
fifth of a one-case `segment` process went to that import). A PyTorch module passed in is wrapped in
`neuromap.engines.torch_runner.TorchModel` on the given device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter1d

from neuromap.checkpoint import ModelSpec
from neuromap.config import InferenceConfig
from neuromap.engines.runtimes import EngineModel
from neuromap.tasks import Task, task_of


def slice_volume(image: np.ndarray, context: int, divisor: int = 1, channels_last: bool = False) -> np.ndarray:
    """The (C, X, Y, Z) volume made ready for slice batches: zero-padded by ``context`` slices at both ends (the
    z-scored background beyond the volume) and in-plane up to multiples of ``divisor`` (native-resolution models
    see crops of any size), slices first, laid out so that `slice_batch` is one gather and one copy straight into
    the memory layout the network reads: (Z', X', Y', C) for channels-last runners, (Z', C, X', Y') otherwise.
    Made once per pass (`_Pass`): padding the volume for every batch of slices, then re-laying each batch twice,
    took about a quarter of the model stage's CPU time on a full BraTS case."""
    x, y = image.shape[1:3]
    padded = np.pad(image, ((0, 0), (0, -x % divisor), (0, -y % divisor), (context, context)))
    order = (3, 1, 2, 0) if channels_last else (3, 0, 1, 2)
    return np.ascontiguousarray(padded.transpose(order), dtype=np.float32)


def slice_batch(volume: np.ndarray, index: np.ndarray, context: int, channels_last: bool = False) -> np.ndarray:
    """2D network input (N, C * (2k + 1), X', Y') for the axial slices ``index`` of a `slice_volume`.

    With ``context`` k > 0 (2.5D) each sequence contributes its slice and k neighbours on each side, channel order
    (sequence, slice offset); beyond the volume's ends the neighbours are zero. Training builds the same layout
    from (C, X, Y, 2k + 1) patches (``neuromap.training.data``). Channels-last batches are NCHW views of NHWC
    memory (what PyTorch calls channels_last; `neuromap.engines.torch_runner.TorchModel` keeps the strides).
    """
    stack = volume[np.asarray(index)[:, None] + np.arange(2 * context + 1)]  # (N, K, ...)
    if channels_last:
        n, k, x, y, c = stack.shape
        return stack.transpose(0, 2, 3, 4, 1).reshape(n, x, y, c * k).transpose(0, 3, 1, 2)
    n, k, c, x, y = stack.shape
    return stack.transpose(0, 2, 1, 3, 4).reshape(n, c * k, x, y)


def as_runner(model: object, device: str = "cpu") -> EngineModel:
    """``model`` as a runner: engines are already; anything else is a PyTorch module (training's, a test's)."""
    if isinstance(model, EngineModel):
        return model
    from neuromap.engines.torch_runner import TorchModel

    return TorchModel(model, device)


class _Pass:
    """One network on one (possibly flipped) image: its input made once, so that the several calls
    `near_tumour` makes for one case do not rebuild it."""

    def __init__(self, model: EngineModel, spec: ModelSpec, image: np.ndarray, flip: tuple[int, ...]) -> None:
        self.model, self.spec, self.flip, self.task = model, spec, flip, task_of(spec)
        self.shape = image.shape[1:]
        image = np.flip(image, flip) if flip else image
        if spec.model.spatial_dims == 3:
            self.input = np.ascontiguousarray(image, dtype=np.float32)
        else:
            self.input = slice_volume(image, spec.preprocess.context_slices, spec.divisor, model.channels_last)

    def logits(self, cfg: InferenceConfig, index: np.ndarray | None = None) -> np.ndarray:
        """Logits (K, X, Y, Z), in the flipped image's orientation. A 2D model can be asked for the axial slices
        ``index`` only, (K, X, Y, len(index)): each slice's output depends on its own stack alone, so they are the
        same numbers a pass over every slice gives there."""
        if self.spec.model.spatial_dims == 3:
            return self.model.sliding_window(self.input, self.spec.patch_size, cfg)
        x, y, depth = self.shape
        context = self.spec.preprocess.context_slices
        index = np.arange(depth) if index is None else np.asarray(index)
        batches = np.split(index, range(cfg.slice_batch_size, len(index), cfg.slice_batch_size))
        outputs = [self.model(slice_batch(self.input, batch, context, self.model.channels_last))[..., :x, :y]
                   for batch in batches]
        return np.concatenate(outputs).transpose(1, 2, 3, 0)

    def probs(self, cfg: InferenceConfig, index: np.ndarray | None = None) -> np.ndarray:
        probs = self.task.activate(self.logits(cfg, index))
        return np.flip(probs, self.flip) if self.flip else probs


def _passes(models: Sequence[tuple[EngineModel, ModelSpec]], x: np.ndarray, cfg: InferenceConfig) -> list[_Pass]:
    """One pass per model and, with ``cfg.tta``, per flip of the in-plane axes (2D) or all three axes (3D)."""
    passes = []
    for model, spec in models:
        axes = (1, 2) if spec.model.spatial_dims == 2 else (1, 2, 3)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if cfg.tta else [()]
        passes += [_Pass(model, spec, x, flip) for flip in flips]
    return passes


def _mean_probs(passes: Sequence[_Pass], cfg: InferenceConfig, index: np.ndarray | None = None) -> np.ndarray:
    """Mean probabilities over the passes; of the axial slices ``index`` only when given (2D models)."""
    if len(passes) == 1:
        return passes[0].probs(cfg, index)
    total = sum(one.probs(cfg, index) for one in passes)
    return total / len(passes)


def near_tumour(slice_probs: Callable[[np.ndarray], np.ndarray], depth: int, task: Task, stride: int,
                margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K, X, Y, depth) from ``slice_probs`` (axial slice indices -> their probabilities), run only
    on the slices where a full pass can put tumour, and which slices ran (bool, depth).

    A coarse pass runs every ``stride``-th slice. Around every slice with tumour (any label `task.labels` gives),
    the ``margin`` slices on each side run too, and again around the tumour those find, until each tumour found
    has ``margin`` tumour-free slices (or the volume's end) on both sides. Skipped slices are certain background
    (`Task.background`). A slice that ran holds exactly what the full pass gives it (`_Pass.logits`), so the two
    differ only where the full pass finds tumour on a run of fewer than ``stride`` consecutive slices that holds
    no coarse slice and lies more than ``margin`` slices from all tumour found: tumour at least ``stride`` slices
    thick is never missed (tests/test_skip_slices.py). Gaps between separate tumours (or a false positive far
    from the tumour) are skipped, not run. The tumour-free margin also keeps the linear resampling back to the
    input grid exact: it mixes 2 adjacent slices, and at the edge both are tumour-free.
    """
    ran = np.zeros(depth, dtype=bool)
    tumour = np.zeros(depth, dtype=bool)
    probs: np.ndarray | None = None

    def run(index: np.ndarray) -> None:
        nonlocal probs
        part = slice_probs(index)
        if probs is None:
            probs = _on_slices(part, index, depth, task)
        else:
            probs[..., index] = part
        ran[index] = True
        tumour[index] = task.labels(part).reshape(-1, len(index)).any(0)

    run(np.arange(_coarse_offset(depth, stride), depth, stride))
    while True:
        near = maximum_filter1d(tumour, 2 * margin + 1, mode="constant", cval=0)
        todo = np.flatnonzero(near & ~ran)
        if not len(todo):
            return probs, ran
        run(todo)


def _coarse_offset(depth: int, stride: int) -> int:
    """First slice of `near_tumour`'s coarse pass: centred, so both ends of the volume are equally far from a
    sample."""
    return (depth - 1) % stride // 2


def _on_slices(part: np.ndarray, index: np.ndarray, depth: int, task: Task) -> np.ndarray:
    """Probabilities of the slices ``index`` (K, X, Y, len(index)) in a volume of ``depth`` slices whose other
    slices are certain background."""
    probs = task.background((*part.shape[1:-1], depth)).astype(part.dtype)
    probs[..., index] = part
    return probs


def predict_probs(
    models: Sequence[tuple[object, ModelSpec]], image: np.ndarray, cfg: InferenceConfig, device: str = "cpu",
    spacing: Sequence[float] | None = None, slices: np.ndarray | None = None,
) -> np.ndarray:
    """Mean probabilities (K, X, Y, Z) over the models (an ensemble when several) and, with ``cfg.tta``, over
    all flips of the in-plane axes (2D) or all three axes (3D). ``models`` pair runners (or PyTorch modules, run
    on ``device``; `as_runner`) with their specs.

    With ``cfg.skip_slices``, slice (2D) models and the image's voxel size in mm (``spacing``; None when the files
    store none, e.g. LGG slices), only the slices that can hold tumour run (`near_tumour`), the ensemble's and
    flips' mean deciding; its stride and margin are in mm, so a thick-slice scan is not sampled more coarsely
    than 1 mm ones. 3D models always run whole: their sliding windows span many slices, so none is skipped.
    ``slices`` (axial indices; slice models only) runs exactly those and nothing else, e.g. `SliceSample.index`.
    """
    x = np.asarray(image, dtype=np.float32)
    runners = [(as_runner(model, device), spec) for model, spec in models]
    passes = _passes(runners, x, cfg)
    task = task_of(models[0][1])
    if any(spec.model.spatial_dims != 2 for _, spec in models):
        return _mean_probs(passes, cfg)
    if slices is not None:
        return _on_slices(_mean_probs(passes, cfg, slices), slices, x.shape[-1], task)
    steps = skip_steps(cfg, spacing)
    if steps is None:
        return _mean_probs(passes, cfg)
    probs, _ = near_tumour(lambda index: _mean_probs(passes, cfg, index), x.shape[-1], task, *steps)
    return probs


def skip_steps(cfg: InferenceConfig, spacing: Sequence[float] | None) -> tuple[int, int] | None:
    """`near_tumour`'s stride and margin in slices for ``cfg`` on slices ``spacing[-1]`` mm apart, or None when
    every slice runs: the option is off, the voxel size is unknown, the stride would be one slice, or uncertainty
    or probability maps are asked for (they show the network's own values everywhere, and on skipped slices those
    are not certain background, only below the label threshold)."""
    if not cfg.skip_slices or spacing is None or cfg.uncertainty or cfg.probabilities:
        return None
    stride = int(cfg.skip_stride_mm / spacing[-1] + 1e-6)
    return (stride, max(1, round(cfg.skip_margin_mm / spacing[-1]))) if stride >= 2 else None


@dataclass(frozen=True)
class SliceSample:
    """Axial slices a check runs on (``index``) and how many slices each stands for (``weight``)."""

    index: np.ndarray
    weight: np.ndarray


def agreement_sample(tumour: np.ndarray, cfg: InferenceConfig, spacing: Sequence[float] | None
                     ) -> SliceSample | None:
    """The slices the quality estimate's mirrored pass runs (`neuromap.quality.flip_dice` compares the two label
    maps there), given which axial slices of the first pass hold tumour (bool, depth); None: every slice (as
    `skip_steps`: slice skipping off, voxel size unknown, or too coarse a stride).

    Within ``skip_margin_mm`` of the tumour every other slice of the coarse pass's grid, elsewhere the coarse
    pass's slices (every ``skip_stride_mm``), so a mirrored pass that puts tumour far from the first pass's is
    still seen. A Dice over every other 1 mm slice of a tumour tens of slices deep estimates the Dice over all of
    them closely (docs/experiments/skip_slices.md measures the quality signal both ways), for about half the
    mirrored pass's model work; the labels never come from this pass.
    """
    steps = skip_steps(cfg, spacing)
    if steps is None:
        return None
    stride, margin = steps
    near = maximum_filter1d(tumour, 2 * margin + 1, mode="constant", cval=0)
    step = np.where(near, max(1, stride // 2), stride)
    z = np.arange(len(tumour))
    keep = (z - _coarse_offset(len(tumour), stride)) % step == 0  # on the coarse pass's grid
    return SliceSample(np.flatnonzero(keep), step[keep])
