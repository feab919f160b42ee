"""Architectures MONAI provides as-is; each builder only picks NeuroMap's defaults and option names.

Defaults are small enough to train on a CPU or a modest GPU; widen them through ``model.options``.
Every builder takes ``dropout`` so configs can switch regularisation the same way for any model.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import AttentionUnet, BasicUNet, SegResNet
from torch import nn

from neuromap.models.registry import register


@register("unet2d")
def unet2d(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    features: Sequence[int] = (32, 64, 128, 256, 512, 32),
    norm: str = "batch",
    dropout: float = 0.1,
) -> nn.Module:
    """Classic U-Net (Ronneberger 2015): two 3x3 convs per level, 4 max-pool downs, transposed-conv ups.

    MONAI's BasicUNet is exactly that layout; we add batch norm and dropout and halve the original widths
    (64..1024) for CPU training. ``features``: 5 encoder widths + the last decoder width.
    Sizes: multiple of 16.
    """
    return BasicUNet(spatial_dims, in_channels, out_channels, features=features, norm=norm, dropout=dropout)


@register("unet3d")
def unet3d(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    features: Sequence[int] = (16, 32, 64, 128, 256, 16),
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """3D U-Net (Cicek 2016 layout via BasicUNet) for 128^3 patches; sizes must be a multiple of 16.

    Instance norm by default because 3D batches hold only 1-2 patches, too few for batch statistics.
    """
    return BasicUNet(spatial_dims, in_channels, out_channels, features=features, norm=norm, dropout=dropout)


@register("attention_unet")
def attention_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    dropout: float = 0.0,
) -> nn.Module:
    """Attention U-Net (Oktay 2018), MONAI's AttentionUnet. ``strides``: one int per down level
    (len(channels) - 1); sizes must be a multiple of their product (16 by default).
    """
    if len(strides) != len(channels) - 1:
        raise ValueError(f"needs len(strides) == len(channels) - 1 = {len(channels) - 1}")
    return AttentionUnet(
        spatial_dims, in_channels, out_channels, channels=channels, strides=strides, dropout=dropout
    )


@register("segresnet")
def segresnet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout: float = 0.0,
) -> nn.Module:
    """SegResNet (Myronenko 2018, BraTS winner) without the VAE branch. ``init_filters`` must be a multiple
    of 8 (group norm with 8 groups); sizes must be a multiple of 2**(len(blocks_down) - 1), 8 by default.
    """
    if len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(f"needs len(blocks_up) == len(blocks_down) - 1 = {len(blocks_down) - 1}")
    return SegResNet(
        spatial_dims=spatial_dims,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout or None,
        blocks_down=blocks_down,
        blocks_up=blocks_up,
    )
