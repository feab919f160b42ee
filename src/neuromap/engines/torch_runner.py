"""PyTorch's runners: a module (eager) or its ``torch.compile`` behind the NumPy face of
`neuromap.engines.runtimes.EngineModel`, on the CPU or a GPU. The only inference module that imports PyTorch, so
only processes that run a network in PyTorch (or train one) pay its import.
"""

from __future__ import annotations

import numpy as np
import torch

from neuromap.engines.runtimes import EngineModel


class TorchModel(EngineModel):
    """A PyTorch module run without gradients on ``device``. 2D batches come as NCHW views of NHWC memory
    (`neuromap.inference.slice_batch`); ``torch.from_numpy`` keeps those strides, so the module (loaded
    channels_last by `neuromap.engines.load_runner`) reads them without a copy on the CPU."""

    channels_last = True

    def __init__(self, module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        self.module, self.device = module, torch.device(device)
        self.name = "torch"

    def predict_window(self, batch: torch.Tensor) -> torch.Tensor:
        """The module on a batch already on its device (also what 3D sliding windows call: they stay there)."""
        return self.module(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.predict_window(torch.from_numpy(batch).to(self.device))
        return logits.float().cpu().numpy()


class CompiledTorchModel(TorchModel):
    """``torch.compile`` (Inductor, C++ code generation on the CPU) of the eager model. Compilation happens on
    the first batches of each new shape, so it pays off only when a process segments many cases."""

    def __init__(self, module: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__(module, device)
        self.compiled = torch.compile(module, dynamic=True)
        self.name = "torch.compile (inductor, dynamic shapes)"

    def predict_window(self, batch: torch.Tensor) -> torch.Tensor:
        return self.compiled(batch)
