"""Cohorts on a cluster: deterministic shards of a folder (nnU-Net's ``-num_parts N -part_id K``) and the summary
each shard writes, so a SLURM array (or any job runner) splits a cohort with no coordination between its tasks.

Rule: case ids sorted, then every N-th from K (``sorted_ids[K::N]``), so every task computes the same split from
the same folder, each case lands in exactly one part, and parts differ in size by at most one case. Each part
writes its cases' outputs into the shared output folder (their names never collide) and
``summary_part_K_of_N.json`` beside them.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from neuromap.errors import NeuroMapError
from neuromap.io import Case, write_bytes_atomic


@dataclass(frozen=True)
class Part:
    """Part ``part_id`` (0-based, like ``SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``) of ``num_parts``."""

    num_parts: int
    part_id: int

    @classmethod
    def of(cls, num_parts: int | None, part_id: int | None) -> Part | None:
        """The part the options name, None when neither is given; a user error when only one is or it is out
        of range."""
        if num_parts is None and part_id is None:
            return None
        if num_parts is None or part_id is None:
            raise NeuroMapError("--num-parts and --part-id go together (e.g. --num-parts 4 --part-id 0). Fix: give "
                                "both, or neither to segment every case.")
        if num_parts < 1:
            raise NeuroMapError(f"--num-parts {num_parts}: a cohort is split into at least 1 part.")
        if not 0 <= part_id < num_parts:
            raise NeuroMapError(
                f"--part-id {part_id} is outside 0..{num_parts - 1}: parts are numbered from 0 (with SLURM, "
                f"--array=0-{num_parts - 1} and --part-id $SLURM_ARRAY_TASK_ID)."
            )
        return cls(num_parts, part_id)

    def select(self, cases: list[Case]) -> list[Case]:
        """This part's cases: sorted by case id, every ``num_parts``-th from ``part_id``."""
        return sorted(cases, key=lambda case: case.case_id)[self.part_id::self.num_parts]

    def summary_file(self, output_dir: Path) -> Path:
        return Path(output_dir) / f"summary_part_{self.part_id}_of_{self.num_parts}.json"


def write_summary(target: Path, part: Part, n_input: int, results: list, started: float, run: dict,
                  overwrite: bool) -> Path:
    """``summary_part_K_of_N.json``: which cases the part holds, which were segmented and which skipped as
    complete (``--continue``), each one's outputs, volumes, time and warnings, and the part's wall time and
    throughput. ``results`` are `SegmentResult`s; ``run`` describes the setup (engine, workers, ...)."""
    wall = time.perf_counter() - started
    segmented = [r.case_id for r in results if not r.skipped]
    summary = {
        "part_id": part.part_id, "num_parts": part.num_parts,
        "selection": "case ids sorted, every num_parts-th from part_id (nnU-Net's convention)",
        "n_cases_in_input": n_input, "cases": [r.case_id for r in results],
        "segmented": segmented, "skipped_complete": [r.case_id for r in results if r.skipped],
        "wall_s": round(wall, 2), "segmented_per_min": round(len(segmented) / wall * 60, 3) if wall else None,
        "host": platform.node(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run,
        "results": {r.case_id: {
            "skipped_complete": r.skipped, "files": {k: str(p) for k, p in r.files.items()},
            "volumes_ml": r.report["volumes_ml"], "total_s": r.report.get("timings_s", {}).get("total_s"),
            "warnings": r.report["warnings"]} for r in results},
    }
    return write_bytes_atomic(target, json.dumps(summary, indent=2).encode(), overwrite=overwrite)
