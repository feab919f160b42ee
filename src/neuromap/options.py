"""Argparse types for the command line's numbers, made from the ranges the typed config declares
(`neuromap.config`: ``VoxelSize``, ``Threads``, ...), so each range is written once and a bad number is refused by
argparse itself: exit 2 with ``argument --spacing: ...``, before any file is read. Numbers that belong to no config
(the web app's port, upload limit and workers) declare their ranges here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from neuromap.config import FoldIndex, SliceIndex, Threads, VoxelSize

Port = Annotated[int, Field(ge=1, le=65535)]
UploadMB = Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False, description="per case, in MB")]
AppWorkers = Annotated[int, Field(ge=1, le=64, description="segmentations the web app runs at a time")]
DEFAULT_APP_WORKERS = 1  # one case in memory and in the model at a time; the other sessions wait in the queue


def ranged(annotation: Any, name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts and range-checks one value as ``annotation`` does (pydantic rules: "2"
    is an int, "nan" is not a finite float); ``name`` is what argparse calls the value in its messages."""
    adapter = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg'].lower()}") from None

    parse.__name__ = name
    return parse


VOXEL_SIZE = ranged(VoxelSize, "voxel size (mm)")
SLICE = ranged(SliceIndex, "slice index")
THREADS = ranged(Threads, "thread count")
FOLD = ranged(FoldIndex, "fold")
PORT = ranged(Port, "port")
UPLOAD_MB = ranged(UploadMB, "size in MB")
WORKERS = ranged(AppWorkers, "worker count")
