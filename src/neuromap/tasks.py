"""What a model predicts, in one object per task (like nnU-Net's LabelManager): output channels, activation,
probabilities to labels, per-voxel uncertainty and the probabilities users get, the label convention written, legend
and colours, the volumes a report shows, the postprocessing steps, how label files are read for scoring and which
metrics score them.

Tasks: "brats" (internal labels 1 NCR/NET, 2 ED, 3 ET; model output as 4 classes, or as the 3 nested regions
WT, TC, ET) and "binary" (one foreground label, 1 = abnormality: LGG FLAIR abnormality, BraTS whole tumour).
Everything else asks `task_of(spec)` or `get_task(name)` and never compares task names itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.labels import CLASS_KEYS, CLASS_NAMES, ED, ET, NCR, REGIONS, as_integral, guess_convention, to_internal

# BraTS-style display colours: NCR/NET red, ED green, ET yellow; a binary model's one label is drawn in red.
BRATS_COLOURS = {NCR: (0.9, 0.1, 0.1), ED: (0.1, 0.8, 0.2), ET: (1.0, 0.85, 0.0)}


@dataclass(frozen=True)
class Structure:
    """A reported structure: its report key, its display name, what it is, and the internal labels it covers."""

    key: str
    name: str
    meaning: str
    labels: tuple[int, ...]


class Task:
    """Base class; see the module docstring. ``out`` is the model's output type, "classes" or "regions"."""

    name: str
    description: str  # for model cards
    legend: dict[int, str]  # internal label -> text for pictures and the app
    short_names: dict[int, str]  # internal label -> a word or two, for the app's per-label toggles
    colours: dict[int, tuple[float, float, float]]
    structures: tuple[Structure, ...]  # what a report's volumes list, in order
    headline: tuple[str, ...]  # the structure keys a one-line summary shows
    scores_lesions: bool  # labels are BraTS regions, which lesion-wise evaluation splits into lesions
    nothing_found: str
    outputs: tuple[str, ...]  # the model output types ("classes", "regions") this task can be trained with
    validation_regions: tuple[str, ...]  # the Dice scores training validation logs (`neuromap.metrics` regions)

    def __init__(self, out: str = "classes") -> None:
        self.out = out

    def out_channels(self) -> int:
        raise NotImplementedError

    def activate(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities (float32, C order) from logits (K, ...): sigmoid for region outputs, softmax over classes
        otherwise."""
        from scipy.special import expit, softmax  # here: config imports this module

        logits = np.ascontiguousarray(logits, dtype=np.float32)
        return expit(logits) if self.out == "regions" else softmax(logits, axis=0).astype(np.float32, copy=False)

    def background(self, shape: tuple[int, ...]) -> np.ndarray:
        """Probabilities (K, *shape) that say background with certainty: what inference gives the slices it skips
        (`neuromap.inference.near_tumour`). Region outputs are all 0; class outputs put all weight on class 0."""
        probs = np.zeros((self.out_channels(), *shape), dtype=np.float32)
        if self.out == "classes":
            probs[0] = 1
        return probs

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Internal labels (uint8) from probabilities (K, ...): the argmax of class outputs."""
        return np.asarray(probs).argmax(0).astype(np.uint8)

    def uncertainty(self, probs: np.ndarray) -> np.ndarray:
        """Per-voxel uncertainty in [0, 1] from probabilities (K, ...), as `uncertainty_measure` names it: region
        outputs are independent sigmoids, so each has its own binary entropy; class outputs share one softmax."""
        from neuromap.uncertainty import max_binary_entropy, normalised_entropy

        return max_binary_entropy(probs) if self.out == "regions" else normalised_entropy(probs)

    @property
    def uncertainty_measure(self) -> str:
        if self.out == "regions":
            return (f"binary entropy in bits of each region's probability ({', '.join(self.probability_names)}), "
                    "the maximum over regions; 0 = certain, 1 = probability 0.5")
        return "entropy of the class probabilities divided by log(number of classes); 0 = certain, 1 = uniform"

    @property
    def probability_names(self) -> tuple[str, ...]:
        """What each channel of `foreground_probabilities` is the probability of."""
        raise NotImplementedError

    def foreground_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """The probabilities a user asks for (``--probabilities``): every region, or every class but background.
        Background is left out because it is 1 minus the others, and because then every channel written is 0
        outside the brain crop, where the model was not run (`neuromap.uncertainty`)."""
        return probs if self.out == "regions" else probs[1:]

    def validation_dice(self, labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """The cheap per-region Dice that training validation logs (prepared space, no HD95)."""
        from neuromap.metrics import dice_per_region  # metrics loads MONAI: only when validating

        return {k: v for k, v in dice_per_region(labels, truth).items() if k in self.validation_regions}

    def output_convention(self, requested: str) -> str:
        """The label convention the label output is written in, given what the user asked for."""
        raise NotImplementedError

    def volume_voxels(self, labels: np.ndarray) -> dict[str, int]:
        """Voxel count per reported structure."""
        counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=max(self.legend) + 1)
        return {s.key: int(sum(counts[label] for label in s.labels)) for s in self.structures}

    def postprocess_steps(self) -> tuple[str, ...]:
        """Names of the `neuromap.postprocess` steps that apply to this task's labels, in order."""
        raise NotImplementedError

    def training_target(self, seg: np.ndarray) -> np.ndarray:
        """Internal labels of a training case -> the labels this task learns."""
        raise NotImplementedError

    def read_labels(self, raw: np.ndarray, convention: str | None, source: str) -> tuple[np.ndarray, str]:
        """A label file's values -> (labels as this task's metrics score them, the convention used); a
        ``convention`` of None is decided from the values."""
        raise NotImplementedError

    def metric_rows(self, pred: np.ndarray, truth: np.ndarray, spacing, hd95: bool = True) -> list[dict]:
        """One metrics row per scored structure (see `neuromap.metrics`)."""
        raise NotImplementedError


class BratsTask(Task):
    name = "brats"
    description = "labels 1 NCR/NET, 2 ED, 3 ET internally (written as BraTS 1, 2, 4)."
    legend = {NCR: "NCR/NET (necrotic / non-enhancing core)", ED: "ED (peritumoral edema)",
              ET: "ET (enhancing tumour)"}
    colours = BRATS_COLOURS
    structures = (
        Structure(CLASS_KEYS[NCR], CLASS_NAMES[NCR], "necrotic / non-enhancing tumour core", (NCR,)),
        Structure(CLASS_KEYS[ED], CLASS_NAMES[ED], "peritumoral edema", (ED,)),
        Structure(CLASS_KEYS[ET], CLASS_NAMES[ET], "enhancing tumour", (ET,)),
        Structure("WT", "WT", "whole tumour = NCR/NET + ED + ET", REGIONS["WT"]),
        Structure("TC", "TC", "tumour core = NCR/NET + ET", REGIONS["TC"]),
    )
    nothing_found = "no tumour found."
    outputs = ("classes", "regions")
    headline = ("WT", "TC", "ET")  # the volumes a one-line summary shows
    scores_lesions = True
    validation_regions = ("WT", "TC", "ET")
    short_names = CLASS_NAMES

    def out_channels(self) -> int:
        return 3 if self.out == "regions" else 4

    @property
    def probability_names(self) -> tuple[str, ...]:
        return tuple(REGIONS) if self.out == "regions" else tuple(CLASS_KEYS.values())

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Argmax for class outputs; nested thresholds WT ⊇ TC ⊇ ET for region outputs."""
        if self.out == "classes":
            return super().labels(probs)
        wt, tc, et = np.asarray(probs) > 0.5
        labels = np.zeros(wt.shape, np.uint8)
        labels[wt] = ED
        labels[wt & tc] = NCR
        labels[wt & tc & et] = ET
        return labels

    def output_convention(self, requested: str) -> str:
        return requested

    def postprocess_steps(self) -> tuple[str, ...]:
        return ("small_components", "small_enhancing_tumour")

    def training_target(self, seg: np.ndarray) -> np.ndarray:
        return seg

    def read_labels(self, raw: np.ndarray, convention: str | None, source: str) -> tuple[np.ndarray, str]:
        convention = convention or guess_convention(np.unique(raw))
        return to_internal(raw, convention, source=source), convention

    def metric_rows(self, pred: np.ndarray, truth: np.ndarray, spacing, hd95: bool = True) -> list[dict]:
        from neuromap.metrics import case_metrics

        return case_metrics(pred, truth, spacing, hd95=hd95)


class BinaryTask(Task):
    """One foreground label. Written in the "binary" convention (1 = abnormality) whatever the user asked:
    BraTS conventions would call label 1 necrotic core."""

    name = "binary"
    description = "one foreground label, abnormality (written as 1, or as 0/255 masks for slice folders)."
    legend = {1: "abnormality (predicted)"}
    colours = {1: BRATS_COLOURS[NCR]}
    structures = (Structure("abnormality", "abnormality", "abnormal tissue (any nonzero label)", (1,)),)
    nothing_found = "no abnormality found."
    outputs = ("classes",)
    headline = ("abnormality",)
    scores_lesions = False
    validation_regions = ("WT",)  # WT = any nonzero label: the abnormality
    short_names = {1: "abnormality"}

    def out_channels(self) -> int:
        return 2

    @property
    def probability_names(self) -> tuple[str, ...]:
        return ("abnormality",)

    def output_convention(self, requested: str) -> str:
        return "binary"

    def postprocess_steps(self) -> tuple[str, ...]:
        return ("small_components",)

    def training_target(self, seg: np.ndarray) -> np.ndarray:
        return (seg > 0).astype(np.uint8)

    def read_labels(self, raw: np.ndarray, convention: str | None, source: str) -> tuple[np.ndarray, str]:
        """Any nonzero value is abnormality, unless a convention is given (then its internal labels count)."""
        if convention is None:
            return as_integral(raw, source) != 0, "nonzero"
        return to_internal(raw, convention, source=source) != 0, convention

    def metric_rows(self, pred: np.ndarray, truth: np.ndarray, spacing, hd95: bool = True) -> list[dict]:
        from neuromap.metrics import binary_case_metrics

        return binary_case_metrics(pred, truth, spacing, hd95=hd95)


TASKS: dict[str, type[Task]] = {"brats": BratsTask, "binary": BinaryTask}


def get_task(name: str, out: str = "classes") -> Task:
    """The task object for a task name (as configs, checkpoints and models.json spell it)."""
    if name not in TASKS:
        raise NeuroMapError(f"unknown task '{name}'. Fix: use one of {list(TASKS)}.")
    return TASKS[name](out)


def task_of(spec) -> Task:
    """The task of a model (a `neuromap.checkpoint.ModelSpec`)."""
    return get_task(spec.task, spec.model.out)
