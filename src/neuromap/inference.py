"""Model outputs on a prepared volume: sliding window (3D, MONAI) or slice batches (2D), flip TTA and
ensembles, as probabilities in prepared space. Shared by training validation and the `Segmenter`; turning them
into labels is the task's job (`neuromap.tasks`), putting them back in the input grid `neuromap.export`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from neuromap.checkpoint import ModelSpec
from neuromap.config import InferenceConfig
from neuromap.tasks import Task, task_of


def slice_volume(image: torch.Tensor, context: int, divisor: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The (C, X, Y, Z) volume made ready for slice batches: zero-padded by ``context`` slices at both ends (the
    z-scored background beyond the volume) and in-plane up to multiples of ``divisor`` (native-resolution models
    see crops of any size), slices first, laid out so that `slice_batch` is one gather and one copy straight into
    the memory format the network reads: (Z', X', Y', C) for channels_last, (Z', C, X', Y') otherwise. Made once
    per pass (`_Pass`): padding the volume for every batch of slices, then re-laying each batch twice, took about
    a quarter of the model stage's CPU time on a full BraTS case."""
    x, y = image.shape[1:3]
    padded = torch.nn.functional.pad(image, (context, context, 0, -y % divisor, 0, -x % divisor))
    order = (3, 1, 2, 0) if memory_format == torch.channels_last else (3, 0, 1, 2)
    return padded.permute(*order).contiguous()


def slice_batch(volume: torch.Tensor, index: torch.Tensor, context: int,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """2D network input (N, C * (2k + 1), X', Y') for the axial slices ``index`` of a `slice_volume`.

    With ``context`` k > 0 (2.5D) each sequence contributes its slice and k neighbours on each side, channel order
    (sequence, slice offset); beyond the volume's ends the neighbours are zero. Training builds the same layout
    from (C, X, Y, 2k + 1) patches (``neuromap.training.data``).
    """
    stack = volume[index[:, None] + torch.arange(2 * context + 1, device=volume.device)]  # (N, K, ...)
    if memory_format == torch.channels_last:
        n, k, x, y, c = stack.shape
        return stack.permute(0, 2, 3, 4, 1).reshape(n, x, y, c * k).permute(0, 3, 1, 2)
    n, k, c, x, y = stack.shape
    return stack.permute(0, 2, 1, 3, 4).reshape(n, c * k, x, y)


def memory_format_of(model: object, spec: ModelSpec) -> torch.memory_format:
    """The memory layout a network's weights and inputs use, decided here for loading and inference alike.
    PyTorch's 2D convolutions run ~1.5-2x faster on CPU with channels_last (oneDNN; measured on the shipped U-Net);
    engines declare their own (the ONNX runtimes read plain NCHW); 3D networks keep what they have."""
    if spec.model.spatial_dims == 3:
        return torch.preserve_format
    return getattr(model, "memory_format", torch.channels_last)


class _Pass:
    """One network on one (possibly flipped) image: its input made once, so that the several calls
    `near_tumour` makes for one case do not rebuild it."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, image: torch.Tensor, flip: tuple[int, ...]) -> None:
        self.model, self.spec, self.flip, self.task = model, spec, flip, task_of(spec)
        self.shape = image.shape[1:]
        image = torch.flip(image, flip) if flip else image
        if spec.model.spatial_dims == 3:
            self.input = image
        else:
            self.memory_format = memory_format_of(model, spec)
            self.input = slice_volume(image, spec.preprocess.context_slices, spec.divisor, self.memory_format)

    def logits(self, cfg: InferenceConfig, index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (K, X, Y, Z), in the flipped image's orientation. A 2D model can be asked for the axial slices
        ``index`` only, (K, X, Y, len(index)): each slice's output depends on its own stack alone, so they are the
        same numbers a pass over every slice gives there."""
        if self.spec.model.spatial_dims == 3:
            from monai.inferers import sliding_window_inference  # here: 2D inference does not pay MONAI's import

            return sliding_window_inference(
                self.input[None], roi_size=self.spec.patch_size, sw_batch_size=cfg.sw_batch_size,
                predictor=self.model, overlap=cfg.overlap, mode="gaussian",
            )[0]
        x, y, depth = self.shape
        context = self.spec.preprocess.context_slices
        index = torch.arange(depth, device=self.input.device) if index is None else index.to(self.input.device)
        outputs = [self.model(slice_batch(self.input, batch, context, self.memory_format))[..., :x, :y]
                   for batch in torch.split(index, cfg.slice_batch_size)]
        return torch.cat(outputs).permute(1, 2, 3, 0)

    def probs(self, cfg: InferenceConfig, index: torch.Tensor | None = None) -> torch.Tensor:
        probs = self.task.activate(self.logits(cfg, index))
        return torch.flip(probs, self.flip) if self.flip else probs


def _passes(models: Sequence[tuple[torch.nn.Module, ModelSpec]], x: torch.Tensor, cfg: InferenceConfig,
            ) -> list[_Pass]:
    """One pass per model and, with ``cfg.tta``, per flip of the in-plane axes (2D) or all three axes (3D)."""
    passes = []
    for model, spec in models:
        axes = (1, 2) if spec.model.spatial_dims == 2 else (1, 2, 3)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if cfg.tta else [()]
        passes += [_Pass(model, spec, x, flip) for flip in flips]
    return passes


def _mean_probs(passes: Sequence[_Pass], cfg: InferenceConfig, index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean probabilities over the passes; of the axial slices ``index`` only when given (2D models)."""
    total = None
    for one in passes:
        probs = one.probs(cfg, index)
        total = probs if total is None else total + probs
    return total / len(passes)


def near_tumour(slice_probs: Callable[[torch.Tensor], torch.Tensor], depth: int, task: Task, stride: int,
                margin: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    ran = torch.zeros(depth, dtype=torch.bool)
    tumour = torch.zeros(depth, dtype=torch.bool)
    probs: torch.Tensor | None = None

    def run(index: torch.Tensor) -> None:
        nonlocal probs
        part = slice_probs(index)
        if probs is None:
            probs = task.background((*part.shape[1:-1], depth)).to(part)
        probs[..., index] = part
        ran[index] = True
        tumour[index] = torch.as_tensor(task.labels(part).reshape(-1, len(index)).any(0))

    run(torch.arange((depth - 1) % stride // 2, depth, stride))  # centred: both ends equally far from a sample
    while True:
        near = torch.nn.functional.max_pool1d(tumour[None].float(), 2 * margin + 1, 1, margin)[0].bool()
        todo = torch.nonzero(near & ~ran)[:, 0]
        if not len(todo):
            return probs, ran
        run(todo)


@torch.no_grad()
def predict_probs(
    models: Sequence[tuple[torch.nn.Module, ModelSpec]], image: np.ndarray | torch.Tensor, cfg: InferenceConfig,
    device: torch.device | str = "cpu", spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean probabilities over the models (an ensemble when several) and, with ``cfg.tta``, over all flips
    of the in-plane axes (2D) or all three axes (3D).

    With ``cfg.skip_slices``, slice (2D) models and the image's voxel size in mm (``spacing``; None when the files
    store none, e.g. LGG slices), only the slices that can hold tumour run (`near_tumour`), the ensemble's and
    flips' mean deciding; its stride and margin are in mm, so a thick-slice scan is not sampled more coarsely
    than 1 mm ones. 3D models always run whole: their sliding windows span many slices, so none is skipped.
    """
    x = torch.as_tensor(image, dtype=torch.float32, device=device)
    passes = _passes(models, x, cfg)
    steps = skip_steps(cfg, spacing)
    if steps is None or any(spec.model.spatial_dims != 2 for _, spec in models):
        return _mean_probs(passes, cfg)
    probs, _ = near_tumour(lambda index: _mean_probs(passes, cfg, index), x.shape[-1], task_of(models[0][1]),
                           *steps)
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
