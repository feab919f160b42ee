"""Model registry: ``build_model(ModelConfig, in_channels, out_channels)`` builds any architecture by name.

Every model starts from random weights and returns raw logits of shape (B, out_channels, *spatial) at the
input's spatial size; softmax (classes) or sigmoid (regions) is applied by the loss and by inference.
Spatial input sizes must be divisible by ``required_divisor(cfg)``: 2D inference pads each slice with zeros up to
a multiple of it and crops the output back (`neuromap.inference._Pass.logits`); 3D inference runs sliding windows of
the training patch size, so 3D patch sizes must be multiples of it.

Registered (spatial dims, size divisor with default options):
  unet2d (2D, 16), unet3d (3D, 16), attention_unet (2D/3D, 16), resunet (2D/3D, 32),
  deeplabv3plus (2D/3D, 32), segresnet (2D/3D, 8).
"""

# The networks' modules (and MONAI) are imported when a network is first built (`registry.Architecture.builder`).
from neuromap.models.registry import REGISTRY, build_model, register, required_divisor, resolve_options

MODEL_NAMES: tuple[str, ...] = tuple(sorted(REGISTRY))

__all__ = ["MODEL_NAMES", "REGISTRY", "build_model", "register", "required_divisor", "resolve_options"]
