"""The shipped models (``neuromap/weights/models.json``, written by ``scripts/ship_model.py``): which exist, what
they need, what was measured, and which one a case gets by default.

Imports no torch, so the CLI's ``validate`` and ``app`` commands, the ship script and the benchmarks can ask
about models without loading a network (like TotalSegmentator's model registry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from neuromap.errors import NeuroMapError

WEIGHTS_DIR = Path(__file__).parent / "weights"
INDEX = "models.json"


@dataclass(frozen=True)
class ShippedModel:
    """One entry of models.json. ``val_dice`` is measured in each validation case's own voxel grid (the numbers
    of the model card), not the training-time estimate stored in the checkpoint."""

    name: str
    file: Path
    modalities: tuple[str, ...]
    task: str = "brats"
    architecture: str = ""
    card: Path | None = None
    val_dice: dict[str, float] = field(default_factory=dict)
    n_val: int | None = None
    val_kind: str = "validation split"  # or "cross-validation, out of fold"

    @property
    def mean_val_dice(self) -> float:
        return sum(self.val_dice.values()) / len(self.val_dice) if self.val_dice else 0.0

    def runs_on(self, available: list[str] | set[str]) -> bool:
        return set(self.modalities) <= set(available)

    def validation_text(self) -> str:
        """'validation Dice WT 0.885 / TC 0.868 / ET 0.829 (4 cases, validation split; model card)', rounded as
        the card rounds them."""
        if not self.val_dice:
            return "no measured validation Dice"
        scores = " / ".join(f"{k} {v:.3f}" for k, v in self.val_dice.items())
        cases = f"{self.n_val} cases, " if self.n_val else ""
        return f"validation Dice {scores} ({cases}{self.val_kind}; model card)"


def shipped_models() -> dict[str, ShippedModel]:
    """Name -> shipped model, in the order of models.json; empty when nothing is shipped."""
    index = WEIGHTS_DIR / INDEX
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {
        name: ShippedModel(
            name=name, file=WEIGHTS_DIR / e["file"], modalities=tuple(e["modalities"]), task=e.get("task", "brats"),
            architecture=e.get("architecture", ""), card=WEIGHTS_DIR / e["card"] if e.get("card") else None,
            val_dice=dict(e.get("val_dice", {})), n_val=e.get("n_val"), val_kind=e.get("val_kind", "validation split"),
        )
        for name, e in entries.items()
    }


def register_shipped(name: str, entry: dict) -> None:
    """Add or replace one entry of models.json (``scripts/ship_model.py``, after measuring the model)."""
    index = WEIGHTS_DIR / INDEX
    entries = json.loads(index.read_text()) if index.is_file() else {}
    entries[name] = entry
    index.write_text(json.dumps(entries, indent=2) + "\n")


def usable_models(available: list[str], task: str) -> list[ShippedModel]:
    """Shipped models of ``task`` that run on the sequences ``available``, best first: the highest measured Dice
    (the shipped BraTS models' are all out of fold on the same 22 cases and 5 folds, so they compare), ties broken
    by using more sequences. A full case therefore gets the FLAIR+T1ce model: out of fold it scored 0.806 mean
    Dice (Dice + binary CE loss) against 0.780 for the four-sequence model of the same recipe (MONAI's DiceCE
    loss; with that loss the FLAIR+T1ce recipe scored 0.794, better on 17 of 22 cases; model cards and
    docs/experiments/model_quality.md), and T1 and T2 are not worth what they do not add."""
    usable = [m for m in shipped_models().values() if m.task == task and m.runs_on(available)]
    return sorted(usable, key=lambda m: (m.mean_val_dice, len(m.modalities), m.name), reverse=True)


def default_model(available: list[str], task: str) -> ShippedModel:
    """The shipped model a case gets when none is named; a clear error when none fits."""
    usable = usable_models(available, task)
    if usable:
        return usable[0]
    shipped = shipped_models()
    if not any(m.task == task for m in shipped.values()):
        raise NeuroMapError(
            f"no model for the '{task}' task is shipped, so these cases need an explicit model. Fix: pass "
            "--model PATH to a checkpoint of that task (e.g. best.pt of `neuromap train`)."
        )
    needs = "; ".join(f"{m.name}: {', '.join(m.modalities)}" for m in shipped.values() if m.task == task)
    raise NeuroMapError(
        f"no shipped model works with the sequences found ({', '.join(available)}). Models need: {needs}. "
        "Fix: add the missing sequence files or pass --model PATH to a checkpoint."
    )


def model_path(name_or_path: str | Path) -> Path:
    """A shipped model's weights file, or the checkpoint path as given."""
    shipped = shipped_models()
    return shipped[str(name_or_path)].file if str(name_or_path) in shipped else Path(name_or_path)


def resolve_model_paths(
    model: str | Path | list[str | Path] | None, available: list[str], task: str = "brats"
) -> list[Path]:
    """Checkpoint files for ``model``: a shipped name, a checkpoint path, several of them (an ensemble), or None
    for the `default_model` of ``task`` on the sequences ``available``."""
    if model is None:
        return [default_model(available, task).file]
    return [model_path(item) for item in (model if isinstance(model, list) else [model])]


def validation_text(model_files: list[str], training_dice: dict[str, float] | None) -> str:
    """How well the model that made a result was measured: the model card's numbers for a shipped model, else
    the training-time estimate its checkpoint records (prepared space, so it differs from a card's)."""
    by_file = {m.file.resolve(): m for m in shipped_models().values()}
    files = [Path(f).resolve() for f in model_files]
    if len(files) == 1 and files[0] in by_file:
        return by_file[files[0]].validation_text()
    scores = " / ".join(f"{k} {v:.3f}" for k, v in (training_dice or {}).items() if k != "mean")
    return f"validation Dice during training {scores} (resampled space)" if scores else "no validation Dice recorded"


def is_model(name_or_path: str) -> bool:
    """A shipped model name or an existing checkpoint file."""
    return name_or_path in shipped_models() or Path(name_or_path).is_file()
