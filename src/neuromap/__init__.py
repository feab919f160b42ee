"""NeuroMap: brain tumour segmentation in multimodal MRI. Research use only.

The Python API mirrors the command line: ``segment``, ``train``, ``evaluate``, plus ``show`` (a result in a
notebook), ``validate_case`` and ``discover_cases`` for checking inputs. Many cases with one model:
``neuromap.segmenter.Segmenter``.
"""

from neuromap.errors import NeuroMapError

__version__ = "0.1.0"


def segment(*args, **kwargs):
    """See `neuromap.segmenter.segment` (imported lazily: torch/MONAI load only when needed)."""
    from neuromap.segmenter import segment as _segment

    return _segment(*args, **kwargs)


def show(result, radiological: bool = True, height: int = 480):
    """Show a segmentation result in a Jupyter notebook; see `neuromap.notebook.show`."""
    from neuromap.notebook import show as _show

    return _show(result, radiological, height)


def train(config, resume: bool = False, progress: bool = True):
    """Train from a TrainConfig, a dict, or a YAML path; see `neuromap.training.train`."""
    from neuromap.config import TrainConfig, load_yaml, parse_config
    from neuromap.training import train as _train

    if isinstance(config, dict):
        config = parse_config(config, TrainConfig)
    elif not isinstance(config, TrainConfig):
        config = load_yaml(config, TrainConfig)
    return _train(config, resume=resume, progress=progress)


def evaluate(*args, **kwargs):
    """See `neuromap.evaluation.evaluate`."""
    from neuromap.evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def validate_case(case, modalities=None):
    """Raise NeuroMapError naming every problem of ``case``; else return its warnings (`neuromap.io.validate_case`)."""
    from neuromap.io import validate_case as _validate

    return _validate(case, modalities)


def discover_cases(root):
    from neuromap.io import discover_cases as _discover

    return _discover(root)


__all__ = ["NeuroMapError", "discover_cases", "evaluate", "segment", "show", "train", "validate_case", "__version__"]
