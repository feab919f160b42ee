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


def slice_stack(image: torch.Tensor, index: torch.Tensor, context: int) -> torch.Tensor:
    """2D network input for the axial slices ``index`` of a (C, X, Y, Z) volume: (N, C * (2k + 1), X, Y).

    With ``context`` k > 0 (2.5D) each sequence contributes its slice and k neighbours on each side, channel order
    (sequence, slice offset); beyond the volume's ends the neighbours are zero (the z-scored background value).
    Training builds the same layout from (C, X, Y, 2k + 1) patches (``neuromap.training.data``).
    """
    if context == 0:
        return image[..., index].permute(3, 0, 1, 2)
    padded = torch.nn.functional.pad(image, (context, context))
    offsets = torch.arange(2 * context + 1, device=image.device)
    stack = padded[..., index[:, None] + offsets]  # (C, X, Y, N, 2k + 1)
    c, x, y, n, k = stack.shape
    return stack.permute(3, 0, 4, 1, 2).reshape(n, c * k, x, y)


def _forward(model: torch.nn.Module, spec: ModelSpec, image: torch.Tensor, cfg: InferenceConfig,
             index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (K, X, Y, Z) for one (C, X, Y, Z) image. A 2D model can be asked for the axial slices ``index``
    only, (K, X, Y, len(index)): each slice's output depends on its own stack alone, so they are the same numbers
    a pass over every slice gives there."""
    if spec.model.spatial_dims == 3:
        from monai.inferers import sliding_window_inference  # here: 2D inference does not pay MONAI's import

        return sliding_window_inference(
            image[None], roi_size=spec.patch_size, sw_batch_size=cfg.sw_batch_size, predictor=model,
            overlap=cfg.overlap, mode="gaussian",
        )[0]
    # In-plane sizes are padded with zeros (the z-scored background) up to the network's divisor, then cropped back:
    # native-resolution models see crops of any size.
    divisor = spec.divisor
    x, y = image.shape[1:3]
    pad = (0, -y % divisor, 0, -x % divisor)
    index = torch.arange(image.shape[-1], device=image.device) if index is None else index.to(image.device)
    outputs = []
    for batch_index in torch.split(index, cfg.slice_batch_size):
        batch = torch.nn.functional.pad(slice_stack(image, batch_index, spec.preprocess.context_slices), pad)
        # channels_last runs the 2D convolutions ~1.5-2x faster on CPU (oneDNN); measured on the shipped U-Net.
        outputs.append(model(batch.contiguous(memory_format=torch.channels_last))[..., :x, :y])
    return torch.cat(outputs).permute(1, 2, 3, 0)


def _mean_probs(models: Sequence[tuple[torch.nn.Module, ModelSpec]], x: torch.Tensor, cfg: InferenceConfig,
                index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean probabilities over the models and, with ``cfg.tta``, over all flips of the in-plane axes (2D) or
    all three axes (3D); of the axial slices ``index`` only when given (2D models)."""
    total, count = None, 0
    for model, spec in models:
        axes = (1, 2) if spec.model.spatial_dims == 2 else (1, 2, 3)
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if cfg.tta else [()]
        for flip in flips:
            xi = torch.flip(x, flip) if flip else x
            probs = task_of(spec).activate(_forward(model, spec, xi, cfg, index))
            probs = torch.flip(probs, flip) if flip else probs
            total = probs if total is None else total + probs
            count += 1
    return total / count


def near_tumour(slice_probs: Callable[[torch.Tensor], torch.Tensor], depth: int, task: Task, stride: int,
                margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (K, X, Y, depth) from ``slice_probs`` (axial slice indices -> their probabilities), run only
    on the slices where a full pass can put tumour, and which slices ran (bool, depth).

    A coarse pass runs every ``stride``-th slice. Around every slice with tumour (any label `task.labels` gives),
    the ``margin`` slices on each side run too, and again around the tumour those find, until each tumour found
    has ``margin`` tumour-free slices (or the volume's end) on both sides. Skipped slices are certain background
    (`Task.background`). A slice that ran holds exactly what the full pass gives it (`_forward`), so the two
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
    steps = skip_steps(cfg, spacing)
    if steps is None or any(spec.model.spatial_dims != 2 for _, spec in models):
        return _mean_probs(models, x, cfg)
    probs, _ = near_tumour(lambda index: _mean_probs(models, x, cfg, index), x.shape[-1], task_of(models[0][1]),
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
