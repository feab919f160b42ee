"""The benchmarks' timing wrapper around a runner. Its own module, because `machine` is also imported by the
release's processes (segment_speed.py), whose source has no `neuromap.engines`."""

from __future__ import annotations

import time

from neuromap.engines.runtimes import EngineModel


class Timed(EngineModel):
    """Forwards calls to an engine (a runner, or a PyTorch module called by MONAI) and adds up the wall and CPU
    seconds spent inside them (the model stage) and the slices (batch items) given to it."""

    def __init__(self, engine) -> None:
        self.engine, self.wall, self.cpu, self.slices = engine, 0.0, 0.0, 0
        self.channels_last = getattr(engine, "channels_last", False)  # the layout the wrapped runner reads
        self.name = getattr(engine, "name", "torch")

    def __call__(self, batch):
        wall, cpu = time.perf_counter(), time.process_time()
        out = self.engine(batch)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.slices += batch.shape[0]
        return out
