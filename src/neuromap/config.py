"""All configuration in one typed place.

Pydantic models validate YAML/CLI input and give precise messages; checkpoints store these models as dicts,
so loading a model never needs the training config file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neuromap.errors import NeuroMapError
from neuromap.tasks import get_task

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
# Aliases used by BraTS 2023 (t1n, t1c, t2w, t2f), BraTS-Toolkit (fla) and others.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1", "t1n": "t1", "t1w": "t1", "native": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair", "fla": "flair", "t2flair": "flair",
}


# Ranges of the numbers a user gives, declared once: the configs below validate with them and the command line's
# argparse types are made from them (`neuromap.options`), so `--spacing 0 0 0` and a YAML `spacing: [0, 0, 0]`
# get the same answer before any work.
VoxelSize = Annotated[float, Field(ge=0.1, le=10.0, allow_inf_nan=False, description="mm; MRI voxels: ~0.2-7 mm")]
SliceIndex = Annotated[int, Field(ge=0, description="axial slice; the upper end is checked against each volume")]
Threads = Annotated[int, Field(ge=1, le=1024)]
FoldIndex = Annotated[int, Field(ge=0, description="the upper end is split.folds - 1")]


def canonical_modality(name: str) -> str:
    """Map an alias (t1n, t1c, t2w, t2f, fla, ...) to t1/t1ce/t2/flair."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in MODALITY_ALIASES:
        raise NeuroMapError(f"unknown modality '{name}'; use one of {list(MODALITIES)} (or an alias like t1c, t2f).")
    return MODALITY_ALIASES[key]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(Strict):
    """What `neuromap.preprocess.prepare` does; stored in every checkpoint."""

    modalities: list[str] = Field(default_factory=lambda: list(MODALITIES))
    orientation: Literal["RAS"] = "RAS"
    crop_margin: int = Field(4, ge=0, description="voxels kept around the brain mask's bounding box")
    foreground: Literal["nonzero", "otsu"] = Field(
        "nonzero",
        description="brain mask when no mask file is given: 'nonzero' voxels (skull-stripped scans such as BraTS), "
        "or 'otsu': the head above an Otsu threshold (scans with skull and background noise, e.g. LGG kaggle_3m)",
    )
    normalize: bool = True
    n4: bool = False
    spacing: tuple[VoxelSize, VoxelSize, VoxelSize] | None = Field(
        None, description="target voxel size in mm, None = keep"
    )
    mode: Literal["3d", "2d"] = "3d"
    slice_range: tuple[SliceIndex, SliceIndex] | None = Field(
        None, description="2D: axial slices [start, stop) of the RAS volume; None = all slices"
    )
    slice_size: tuple[int, int] | None = Field(
        (128, 128), description="2D: in-plane size every slice is resized to; None = keep the (resampled) crop"
    )
    context_slices: int = Field(
        0, ge=0, le=4, description="2D: neighbouring axial slices on each side given as extra channels (2.5D)"
    )

    @field_validator("modalities")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        mods = [canonical_modality(m) for m in value]
        if not mods or len(set(mods)) != len(mods):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {value}")
        return mods

    @field_validator("slice_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and value[0] >= value[1]:
            kind = "reversed" if value[0] > value[1] else "empty"
            raise ValueError(f"slice_range {list(value)} is {kind}: START must be below STOP (slices START..STOP-1)")
        return value

    @property
    def in_channels(self) -> int:
        """Network input channels: each sequence once per slice of the 2.5D stack."""
        return len(self.modalities) * (2 * self.context_slices + 1)


class ModelConfig(Strict):
    """Architecture by registry name plus its options (see neuromap.models)."""

    name: str = "segresnet"
    spatial_dims: Literal[2, 3] = 3
    out: Literal["classes", "regions"] = "classes"
    options: dict = Field(default_factory=dict)


# Voxels per training batch: 8x what a 128^3 3D patch pair (the GPU config) needs; the activations of a U-Net take
# tens of float32 values per input voxel, so beyond this a CPU machine swaps or dies.
MAX_BATCH_VOXELS = 1 << 25
MAX_CONFIG_BYTES = 1 << 20  # configs are a few lines; a larger file is a wrong path (or a YAML alias bomb)


def load_yaml(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Read a YAML file into a typed config with a message that names the file and the bad field.

    A file may start from another with ``base: other.yaml`` (path relative to the file) and list only what it
    changes, so a study's variants differ from their recipe in the lines that matter, not in copies.
    """
    return parse_config(_read_yaml(Path(path), seen=()), model, source=str(path))


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict:
    if not path.is_file():
        raise NeuroMapError(f"{path}: config file not found.")
    if (size := path.stat().st_size) > MAX_CONFIG_BYTES:
        raise NeuroMapError(f"{path}: {size / 1e6:.1f} MB is not a config file (they are a few lines). Fix: check "
                            "the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NeuroMapError(f"{path}: not a text file (not UTF-8). Fix: check the path, or save it as UTF-8.") from None
    except yaml.YAMLError as exc:
        raise NeuroMapError(f"{path}: not valid YAML ({exc}).") from None
    if data is None:
        raise NeuroMapError(f"{path}: the config file is empty. Fix: write at least a name and data_roots.")
    if not isinstance(data, dict):
        raise NeuroMapError(f"{path}: a config must be a YAML mapping (key: value lines), got {type(data).__name__}.")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise NeuroMapError(f"{path}: 'base: {base}' loops back to a file already being read.")
    return _merge(_read_yaml(base_path, (*seen, base_path)), data)


def _merge(base: dict, override: dict) -> dict:
    """Nested mappings merge key by key; any other value (lists included) replaces the base's. A model's
    ``options`` are replaced whole, and dropped when the override names another architecture: one network's
    options mean nothing to another."""
    merged = dict(base)
    if "name" in override and override["name"] != base.get("name"):
        merged.pop("options", None)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict) and key != "options"
        merged[key] = _merge(base[key], value) if nested else value
    return merged


def parse_config(data: dict, model: type[BaseModel], source: str = "config") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise NeuroMapError(f"{source}: invalid configuration: {problems}") from None


class AugmentConfig(Strict):
    """Random augmentation applied to training samples (MONAI transforms)."""

    flip: bool = True
    rotate_deg: float = Field(15.0, ge=0, le=180)
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = Field(0.1, ge=0)
    intensity_scale: float = Field(0.1, ge=0)
    gamma: tuple[float, float] | None = (0.7, 1.5)
    prob: float = Field(0.3, ge=0, le=1, description="probability of each spatial/intensity transform")
    channel_wise: bool = Field(False, description="scale/shift each sequence independently (other scanners)")
    bias_field: float = Field(0.0, ge=0, le=1, description="RandBiasField coefficient range; 0 = off")
    noise_std: float = Field(0.0, ge=0, description="RandGaussianNoise std (z-scored units); 0 = off")
    blur_sigma: tuple[float, float] | None = Field(None, description="RandGaussianSmooth sigma range in voxels")
    low_resolution: tuple[float, float] | None = Field(
        None, description="RandSimulateLowResolution zoom range (e.g. [0.5, 1.0]): older, thicker-slice scans"
    )
    thick_slices: tuple[float, float] | None = Field(
        None, description="slice thickness range in mm (e.g. [2, 6]): each sequence through-plane as if acquired in "
        "thick slices and resampled to 1 mm, with probability prob (`neuromap.training.thick_slices`); None = off"
    )
    thick_slices_prob: float | None = Field(
        None, ge=0, le=1, description="probability of the thick-slice transform alone (a model meant for thick-slice "
        "inputs sees them more often than the other augmentations); None = prob"
    )
    stand_in: float = Field(0.0, ge=0, le=1, description="probability that some of a sample's other sequences are "
                            "replaced by a copy of stand_in_source (kaggle_3m's missing-sequence convention); 0 = off")
    stand_in_source: str = Field("flair", description="the sequence copied over the others")

    @field_validator("stand_in_source")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_modality(value)

    @field_validator("thick_slices")
    @classmethod
    def _thickness(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 1.0 <= value[0] <= value[1] <= 10.0:
            raise ValueError(f"thick_slices must be [min, max] mm with 1 <= min <= max <= 10, got {list(value)}")
        return value


class AuxiliaryConfig(Strict):
    """Extra training cases labelled with the whole tumour only, mixed into a BraTS regions model's samples
    (`neuromap.training.auxiliary`: skull stripping, 2.5D context and the partial labels are handled there)."""

    data_roots: list[str] = Field(min_length=1, description="folders of LGG kaggle_3m patients (slices + masks)")
    share: float = Field(0.25, gt=0, lt=1, description="share of training samples drawn from these cases")


class SplitConfig(Strict):
    """Patient-level split. ``ratios`` are (train, val[, test]); k-fold uses ``folds`` and ``fold``."""

    mode: Literal["ratio", "kfold", "all"] = "ratio"
    ratios: tuple[float, ...] = (0.6, 0.25, 0.15)
    folds: int = Field(5, ge=2)
    fold: FoldIndex = 0
    seed: int | None = Field(
        None, ge=0, description="seed of the patient shuffle; none means the run's seed. Set it to compare runs "
        "with different training seeds on the same folds (a seed study, an ensemble scored out of fold)"
    )

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) not in (2, 3) or abs(sum(value) - 1) > 1e-6 or min(value) <= 0:
            raise ValueError(f"ratios must be 2 or 3 positive numbers summing to 1 (e.g. [0.8, 0.2]), got {value}")
        return value


class TrainConfig(Strict):
    """One experiment. ``neuromap train CONFIG.yaml`` reads this; every field has a CPU-friendly default, except
    that the data must be named: ``data_roots`` is empty until a config sets it, and training refuses that."""

    name: str = "experiment"
    data_roots: list[str] = Field(
        default_factory=list, description="folders of labelled cases; none by default, so a run never trains on (or "
        "complains about) a folder nobody named"
    )
    task: Literal["brats", "binary"] = "brats"
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    patch_size: tuple[int, ...] = Field((96, 96, 96), description="3D patch (x, y, z) or 2D slice size (x, y)")
    batch_size: int = Field(2, ge=1)
    epochs: int = Field(100, ge=1)
    iterations_per_epoch: int = Field(50, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["ce", "dice", "dice_ce", "dice_bce", "tversky_ce", "weighted_dice", "focal"] = Field(
        "dice_ce", description="dice_ce is MONAI's DiceCELoss: for region outputs its cross-entropy is a softmax "
        "across the WT/TC/ET channels (zero on background voxels). dice_bce: Dice plus binary cross-entropy per region "
        "(nnU-Net's region loss; for class outputs the same as dice_ce); tversky_ce: Tversky (tversky_beta) plus it"
    )
    tversky_beta: float = Field(
        0.7, gt=0, lt=1, description="tversky_ce: weight of misses (false negatives) in the overlap term; false "
        "positives get 1 - beta, so 0.5 is Dice. Above 0.5 for models that under-segment"
    )
    class_weights: list[float] | None = None
    batch_dice: bool = Field(
        False, description="Dice over the whole batch per channel (nnU-Net): patches without a structure then do not "
        "give a constant loss of ~1, and false positives there are penalised"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast on CPUs with native bfloat16 (AVX512-BF16/AMX), ~1.5x faster training"
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tumour_sampling: float = Field(0.67, ge=0, le=1, description="share of samples centred on tumour")
    split: SplitConfig = Field(default_factory=SplitConfig)
    auxiliary: AuxiliaryConfig | None = Field(
        None, description="whole-tumour-only cases added to the training samples (never to folds or validation)"
    )
    seed: int = 0
    val_every: int = Field(1, ge=1)
    early_stopping_patience: int = Field(20, ge=1, description="validations without improvement before stopping")
    plateau_patience: int = Field(8, ge=1)
    lr_schedule: Literal["plateau", "poly"] = Field(
        "plateau", description="plateau: halve on stalled validation Dice; poly: lr*(1-epoch/epochs)^0.9 (nnU-Net)"
    )
    select: Literal["best", "last"] = Field(
        "best", description="checkpoint to keep as best.pt: best validation Dice, or the last epoch (cross-validation: "
        "the held-out fold then never steers the model, so its score is a fair out-of-fold estimate)"
    )
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time (checked per epoch)")
    cpu_minutes: float | None = Field(
        None, gt=0, le=10_000, description="budget in CPU time of the training process: stop once it is spent, and "
        "with the poly schedule decay the learning rate over the budget instead of over epochs. A fixed CPU budget "
        "compares architectures of different speeds fairly, whatever else shares the machine"
    )
    init_checkpoint: str | None = Field(
        None, description="start from this checkpoint's weights where names and shapes match (pretraining)"
    )
    threads: Threads | None = None
    loader_workers: int = Field(
        1, ge=0, le=8, description="processes preparing augmented batches while the model trains (0 = inline)"
    )
    output_dir: str | None = None

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) not in (2, 3) or min(value) < 8:
            raise ValueError(f"patch_size must be 2 or 3 sizes >= 8, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        dims = self.model.spatial_dims
        if len(self.patch_size) != dims:
            raise ValueError(f"model.spatial_dims={dims} needs a {dims}-number patch_size, got {self.patch_size}")
        voxels = self.batch_size * math.prod(self.patch_size)
        if voxels > MAX_BATCH_VOXELS:
            raise ValueError(
                f"batch_size {self.batch_size} x patch_size {list(self.patch_size)} is {voxels:.3g} voxels per batch, "
                f"more than {MAX_BATCH_VOXELS:.3g} (e.g. 16 x 128 x 128 is 2.6e+05, 2 x 128^3 4.2e+06): the network's "
                "activations would not fit in memory. Fix: a smaller batch_size or patch_size"
            )
        if (dims == 2) != (self.preprocess.mode == "2d"):
            raise ValueError(f"model.spatial_dims={dims} needs preprocess.mode='{'2d' if dims == 2 else '3d'}'")
        if dims == 2 and self.preprocess.slice_size is not None and \
                tuple(self.patch_size) != tuple(self.preprocess.slice_size):
            raise ValueError("2D models: patch_size must equal preprocess.slice_size (or set slice_size: null)")
        if dims == 3 and self.preprocess.context_slices:
            raise ValueError("preprocess.context_slices is for 2D models only")
        if self.split.mode == "all" and self.select == "best":
            raise ValueError("split.mode 'all' has no validation cases: set select: last")
        if self.model.out not in get_task(self.task).outputs:
            raise ValueError(f"task '{self.task}' uses model.out in {list(get_task(self.task).outputs)}")
        if self.auxiliary is not None and (self.task != "brats" or self.model.out != "regions" or dims != 2):
            raise ValueError("auxiliary whole-tumour cases need task 'brats', model.out 'regions' and a 2D model: "
                             "only region outputs can learn WT while ignoring TC and ET")
        if self.augment.stand_in and self.augment.stand_in_source not in self.preprocess.modalities:
            raise ValueError(f"augment.stand_in_source {self.augment.stand_in_source!r} is not one of the model's "
                             f"sequences {self.preprocess.modalities}")
        if self.class_weights is not None and len(self.class_weights) != self.out_channels:
            raise ValueError(f"class_weights needs {self.out_channels} numbers (one per output channel)")
        return self

    @property
    def out_channels(self) -> int:
        return get_task(self.task, self.model.out).out_channels()


MAX_WORKERS = 8


class InferenceConfig(Strict):
    """How `neuromap segment` runs a model; defaults are the shipped behaviour."""

    tta: bool = False
    overlap: float = Field(0.25, ge=0, lt=1, description="sliding-window overlap (3D models)")
    sw_batch_size: int = Field(2, ge=1)
    slice_batch_size: int = Field(16, ge=1, description="2D models: slices per forward pass (16 was fastest)")
    # Measured on the 22 shared BraTS cases with the default model (benchmarks/skip_slices.py,
    # docs/experiments/skip_slices.md): every stride and margin tried gave the same labels as every slice.
    skip_slices: bool = Field(
        True, description="2D models on scans of known voxel size: a coarse pass over one axial slice every "
        "skip_stride_mm, then only the slices near the tumour it finds (`neuromap.inference.near_tumour`); skipped "
        "slices are certain background. Every slice runs when it is off (--all-slices) or uncertainty or "
        "probability maps are asked for"
    )
    skip_stride_mm: float = Field(
        4.0, gt=0, le=100, description="coarse pass spacing; tumour at least this thick is never missed. 4 mm: a "
        "compact lesion large enough to pass min_component_ml (0.1 mL, 5.8 mm across) is thicker"
    )
    skip_margin_mm: float = Field(
        2.0, gt=0, le=100, description="tumour-free depth run beyond each tumour found (at least one slice)"
    )
    min_component_ml: float = Field(0.1, ge=0, description="drop tumour components smaller than this (mL)")
    min_component_fraction: float = Field(
        0.1, ge=0, le=1, description="drop components smaller than this share of the largest (0 keeps all)"
    )
    min_component_voxels: int = Field(
        50, ge=0, description="the same in voxels, used instead when the voxel size is unknown (LGG slices)"
    )
    et_min_ml: float = Field(0.05, ge=0, description="relabel ET as NCR/NET when total ET is below this (mL)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Threads | None = None
    # Each reader holds one read and prepared case (a cohort with 1 reader peaked 0.55 GB above a single
    # 240x240x155 case: benchmarks/results/segment_speed.json) and competes with the model for the CPU, so more
    # readers than the model stage can hide only cost memory.
    workers: int = Field(1, ge=0, le=MAX_WORKERS, description="batches: cases read and prepared in background "
                         "threads while the model runs on the current one (0: read in turn)")
    engine: Literal["auto", "torch", "torch-compile", "onnxruntime", "openvino"] = Field(
        "auto", description="what runs the network (neuromap.engines): auto = the fastest installed CPU engine "
        "(measured: docs/experiments/inference_engines.md), PyTorch when none is installed or on a GPU"
    )
    picture_convention: Literal["radiological", "neurological"] = Field(
        "radiological", description="overlay PNG left-right: radiological puts the patient's right on the left"
    )
    uncertainty: bool = Field(False, description="also write <case>_uncertainty.nii.gz (`neuromap.uncertainty`)")
    probabilities: bool = Field(False, description="also write <case>_probabilities.nii.gz, one channel per "
                                "region or tumour class, uint8 = round(255 p)")
