"""Skipping slices that cannot hold tumour (`neuromap.inference.near_tumour`, ``InferenceConfig.skip_slices``).

The guarantee tested: slices that run get exactly the full pass's probabilities, and the full pass's tumour is
missed only on a run thinner than the coarse pass's stride (``skip_stride_mm``) that holds no coarse slice and
lies more than the margin (``skip_margin_mm``) from all other tumour. A stand-in network whose output is known
(tumour exactly where the centre slice's first sequence is bright) places tumour of every thickness at every
offset; the shipped model on a real case gives the same labels with the option on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BRATS, needs_real_data

from neuromap.checkpoint import ModelSpec, load_model
from neuromap.cli import main
from neuromap.config import InferenceConfig, ModelConfig, PreprocessConfig
from neuromap.inference import agreement_sample, near_tumour, predict_probs
from neuromap.postprocess import postprocess
from neuromap.quality import flip_dice
from neuromap.tasks import get_task, task_of

DEPTH = 30
MM = (1.0, 1.0, 1.0)  # voxel size: strides and margins in mm are slices


class BrightIsTumour(torch.nn.Module):
    """A 2D or 3D "network" with a known answer: tumour exactly where the first sequence is above 0.5 at the
    slice it predicts (logit 2 * (value - 0.5) for every tumour output, its negative for a background class, so
    its background is far from certain; flip-equivariant, so TTA changes nothing). For 2.5D stacks the first
    sequence's centre slice is channel ``context``."""

    def __init__(self, channel: int, out: int, background_class: bool) -> None:
        super().__init__()
        self.channel = channel
        self.signs = torch.ones(out)
        self.signs[0] = -1 if background_class else 1

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        logit = 2 * (batch[:, self.channel: self.channel + 1] - 0.5)
        return logit * self.signs.view(1, -1, *[1] * (batch.ndim - 2))


def stand_in(out: str = "regions", dims: int = 2, context: int = 1) -> tuple[BrightIsTumour, ModelSpec]:
    preprocess = PreprocessConfig(mode="2d" if dims == 2 else "3d", slice_size=None, context_slices=context)
    spec = ModelSpec(ModelConfig(name="unet2d", spatial_dims=dims, out=out, options={"features": [4] * 6}),
                     preprocess, "brats", (16,) * dims, 3 if out == "regions" else 4)
    return BrightIsTumour(context if dims == 2 else 0, spec.out_channels, out == "classes"), spec


def volume(*slabs: tuple[int, int]) -> np.ndarray:
    """(4, 12, 10, DEPTH): sequence 0 is bright in a small in-plane patch on the slices [start, stop) of each slab."""
    image = np.zeros((4, 12, 10, DEPTH), np.float32)
    image[1:] = 0.1  # other sequences: brain signal everywhere, no tumour
    for start, stop in slabs:
        image[0, 3:7, 2:5, start:stop] = 1.0
    return image


def labels_both_ways(image, models, spacing=MM, **options) -> tuple[np.ndarray, np.ndarray]:
    """Labels with the skip on and off."""
    task = task_of(models[0][1])
    on = predict_probs(models, image, InferenceConfig(skip_slices=True, **options), spacing=spacing)
    off = predict_probs(models, image, InferenceConfig(skip_slices=False, **options), spacing=spacing)
    return task.labels(on), task.labels(off)


@pytest.mark.parametrize("stride", [2, 3, 4, 5])
@pytest.mark.parametrize("margin", [1, 4])
def test_tumour_at_least_stride_slices_thick_is_never_missed(stride, margin):
    """Every thickness from ``stride`` up, at every offset, beside a tumour-free volume: the full pass's labels."""
    task = get_task("brats", "regions")
    for thickness in (stride, stride + 1):
        for start in range(DEPTH - thickness + 1):
            full = np.full((3, 2, 2, DEPTH), 0.2, np.float32)
            full[0, 1, 0, start: start + thickness] = 0.9
            probs, _ = near_tumour(lambda index, full=full: full[..., index], DEPTH, task, stride, margin)
            assert np.array_equal(task.labels(probs), task.labels(full)), (thickness, start)


def test_thin_tumour_between_coarse_slices_is_kept_within_the_margin_and_only_there():
    """The guarantee's edge: one tumour slice between the coarse slices (stride 4 runs slices 0, 4, ..., 28
    here) is found when it lies within the margin of thicker tumour, and skipped when it lies alone; tumour on a
    coarse slice is always found."""
    models = [stand_in()]
    options = {"skip_stride_mm": 4, "skip_margin_mm": 4}
    satellite = volume((14, 22), (11, 12))  # a thick tumour and a one-slice satellite 3 slices below it
    on, off = labels_both_ways(satellite, models, **options)
    assert off[..., 11].any() and np.array_equal(on, off)
    alone = volume((11, 12))  # the same slice with no other tumour within the margin: skipped, as documented
    on, off = labels_both_ways(alone, models, **options)
    assert off[..., 11].any() and not on.any()
    on, off = labels_both_ways(volume((16, 17)), models, **options)  # one slice, but a coarse one
    assert on[..., 16].any() and np.array_equal(on, off)


def test_skipped_slices_are_certain_background_and_the_others_exact_with_tta_and_ensembles():
    """Region and class outputs, flips and a two-model ensemble: slices that ran hold the full pass's
    probabilities, the rest say background with certainty (regions 0; classes all on class 0)."""
    image = volume((6, 12), (20, 26))
    for out in ("regions", "classes"):
        models = [stand_in(out), stand_in(out)]
        cfg = {"tta": True, "skip_stride_mm": 4, "skip_margin_mm": 2}
        on = predict_probs(models, image, InferenceConfig(skip_slices=True, **cfg), spacing=MM)
        off = predict_probs(models, image, InferenceConfig(skip_slices=False, **cfg), spacing=MM)
        ran = np.abs(on - off).max(axis=(0, 1, 2)) < 1e-6
        skipped = np.flatnonzero(~ran)
        assert 0 < len(skipped) < DEPTH - 12  # something was skipped, the tumour was not
        expected = get_task("brats", out).background((*image.shape[1:3], len(skipped)))
        assert np.array_equal(on[..., skipped], expected)
        assert np.array_equal(task_of(models[0][1]).labels(on), task_of(models[0][1]).labels(off))


def test_3d_models_always_run_whole():
    """A 3D model's sliding windows span many slices: the option changes nothing, so even a one-slice tumour
    between where coarse slices would be is found."""
    on, off = labels_both_ways(volume((11, 12)), [stand_in(dims=3)])
    assert on[..., 11].any() and np.array_equal(on, off)


def test_every_slice_runs_on_thick_slices_without_a_voxel_size_and_for_maps():
    """Strides and margins are in mm: on 3 mm slices the 4 mm stride is one slice, so every slice runs and the
    lone one-slice tumour that 1 mm slices skip (above) is found; the same when the voxel size is unknown (LGG
    slices) and when uncertainty or probability maps are asked for (they show the network's values everywhere).
    On 2 mm slices the stride is 2 slices (0, 2, ...): a one-slice tumour on one of them is found."""
    models = [stand_in()]
    for spacing, maps in (((1.0, 1.0, 3.0), {}), (None, {}), (MM, {"uncertainty": True}),
                          (MM, {"probabilities": True})):
        on, off = labels_both_ways(volume((11, 12)), models, spacing=spacing, **maps)
        assert on[..., 11].any() and np.array_equal(on, off)
    on, _ = labels_both_ways(volume((12, 13)), models, spacing=(1.0, 1.0, 2.0))
    assert on[..., 12].any()


def test_near_tumour_runs_each_slice_once_and_skips_gaps_between_tumours():
    """Two tumours far apart: the slices between them (beyond the margins) do not run, and no slice runs twice."""
    task = get_task("brats", "regions")
    full = np.zeros((3, 2, 2, 60), np.float32)
    full[0, ..., 5:15] = full[0, ..., 45:55] = 0.9
    calls = []

    def slice_probs(index):
        calls.extend(index.tolist())
        return full[..., index]

    probs, ran = near_tumour(slice_probs, 60, task, stride=4, margin=3)
    assert len(calls) == len(set(calls)) == int(ran.sum())
    assert np.array_equal(task.labels(probs), task.labels(full))
    assert ran[2:18].all() and ran[42:58].all()
    assert not ran[20:40].all() and int(ran[20:40].sum()) == 5  # the coarse slices only


def test_all_slices_switch_and_the_voxel_size_reach_the_model_stage(tmp_path, tiny_checkpoint, synthetic_case,
                                                                      monkeypatch):
    import neuromap.segmenter as segmenter_module

    seen = []
    predict = segmenter_module.predict_probs

    def recording(models, image, cfg, device, spacing, slices=None):
        seen[-1].append((cfg.skip_slices, spacing, slices))
        return predict(models, image, cfg, device, spacing, slices)

    monkeypatch.setattr(segmenter_module, "predict_probs", recording)
    for extra in ([], ["--all-slices"]):
        seen.append([])  # the case's pass and the quality estimate's mirrored pass
        assert main(["segment", str(synthetic_case), "-o", str(tmp_path / str(len(extra))),
                     "--model", str(tiny_checkpoint), "--quiet", *extra]) == 0
    assert [{on for on, _, _ in run} for run in seen] == [{True}, {False}]
    assert all(s[-1] == pytest.approx(1.0) for run in seen for _, s, _ in run)  # the synthetic case's slices: 1 mm
    (_, _, first), (_, _, mirrored) = seen[0]
    assert first is None and 0 < len(mirrored) < 32  # skipping on: the mirrored pass runs a sample of the slices
    assert [slices for _, _, slices in seen[1]] == [None, None]  # --all-slices: every slice, both passes


@needs_real_data
@pytest.mark.real
@pytest.mark.slow
def test_shipped_model_gives_the_full_pass_labels_on_a_real_case():
    """The default model on a whole real case: the same final labels with fewer slices run. Before
    postprocessing the full pass may add a fragment thinner than the coarse stride far from the tumour (the
    four-sequence model: 0 voxels on all 22 shared cases, docs/experiments/skip_slices.md; the FLAIR+T1ce default:
    74 voxels on one slice of this case), which the product's small-component rule removes."""
    from neuromap.io import discover_cases, load_case
    from neuromap.preprocess import prepare
    from neuromap.zoo import default_model

    model, spec = load_model(default_model(["t1", "t1ce", "t2", "flair"], "brats").file)
    model = model.to(memory_format=torch.channels_last)
    image = prepare(load_case(discover_cases(BRATS / "Brats18_2013_2_1")[0], spec.modalities), spec.preprocess).image
    slices = []

    def counted(batch):
        slices.append(len(batch))
        return model(batch)

    task = task_of(spec)
    on = predict_probs([(counted, spec)], image, InferenceConfig(), spacing=MM)
    ran = sum(slices)
    off = predict_probs([(model, spec)], image, InferenceConfig(skip_slices=False))
    assert ran < image.shape[-1]
    labels_on, labels_off = task.labels(on), task.labels(off)
    assert labels_off.any() and int((labels_on != labels_off).sum()) < 100  # < 0.1 mL: under the component rule
    cfg = InferenceConfig()
    final_on, _ = postprocess(labels_on, 0.001, cfg, task.postprocess_steps())
    final_off, _ = postprocess(labels_off, 0.001, cfg, task.postprocess_steps())
    assert np.array_equal(final_on, final_off)


def test_the_mirrored_pass_samples_every_other_slice_near_the_tumour_and_the_coarse_grid_elsewhere():
    depth = 61
    tumour = np.zeros(depth, dtype=bool)
    tumour[20:40] = True
    sample = agreement_sample(tumour, InferenceConfig(), MM)  # stride 4 mm, margin 2 mm: 4 and 2 slices
    offset = (depth - 1) % 4 // 2
    near = np.arange(18, 42)
    assert set(near[(near - offset) % 2 == 0]) <= set(sample.index)
    assert not set(near[(near - offset) % 2 == 1]) & set(sample.index)
    far = np.setdiff1d(np.arange(depth), near)
    assert set(sample.index) - set(near) == set(far[(far - offset) % 4 == 0])  # the coarse pass's slices
    inside = np.isin(sample.index, near)
    assert set(sample.weight[inside]) == {2} and set(sample.weight[~inside]) == {4}
    assert abs(int(sample.weight.sum()) - depth) <= 4  # each slice stands for the slices around it
    assert agreement_sample(tumour, InferenceConfig(skip_slices=False), MM) is None
    assert agreement_sample(tumour, InferenceConfig(), None) is None  # voxel size unknown: every slice


def test_sampled_flip_dice_weights_each_slice_by_the_slices_it_stands_for():
    task = get_task("brats")
    labels = np.zeros((8, 8, 40), dtype=np.uint8)
    labels[2:6, 2:6, 10:30] = 2  # 20 slices of edema
    sample = agreement_sample(labels.reshape(-1, 40).any(0), InferenceConfig(), MM)
    assert flip_dice(labels, labels, task, sample)["WT"] == 1.0
    shifted = np.zeros_like(labels)
    shifted[2:6, 2:6, 15:35] = 2  # 15 of 20 slices overlap: Dice 0.75 over every slice
    assert flip_dice(labels, shifted, task)["WT"] == pytest.approx(0.75)
    assert flip_dice(labels, shifted, task, sample)["WT"] == pytest.approx(0.75, abs=0.06)
    distant = labels.copy()
    coarse = int(sample.index[sample.weight == 4][0])  # a coarse slice far from the tumour
    distant[2:6, 2:6, coarse] = 2  # a mirrored-pass false positive there stands for 4 slices
    expected = 2 * 20 * 16 / (2 * 20 * 16 + 4 * 16)
    assert flip_dice(labels, distant, task, sample)["WT"] == pytest.approx(expected, abs=0.02)
