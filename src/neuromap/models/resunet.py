"""U-Net with a ResNet-50 encoder (bottleneck blocks, layers [3, 4, 6, 3]).

Written as a thin composition of MONAI parts because ``FlexibleUNet(backbone="resnet50")`` fixes the encoder
width at 64 (23-46 M parameters), too heavy for CPU training and tests. At ``width=64`` and the default
``decoder_channels`` this module has the same layers and state-dict keys as that FlexibleUNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from monai.networks.nets.resnet import ResNet, ResNetBottleneck, ResNetFeatures, resnet_params
from torch import nn

from neuromap.models.registry import register


class _ResNetFeatures(ResNet):
    """MONAI ResNet of any width that returns the 5 feature maps (strides 2, 4, 8, 16, 32).

    Reuses ResNetFeatures.forward, which only needs ResNet's layers; ResNetFeatures hard-codes the width.
    """

    forward = ResNetFeatures.forward


@register("resunet")
class ResUNet(nn.Module):
    """ResNet-50 encoder + U-Net decoder (FlexibleUNet design); sizes must be a multiple of 32.

    ``width``: channels of the stem and of the first bottleneck stage's inner convs (64 in ResNet-50, stage
    outputs are 4, 8, 16, 32 x width). ``decoder_channels``: the 5 decoder stage widths, deepest first.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 16,
        decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        block, layers, shortcut_type, bias_downsample, _ = resnet_params["resnet50"]
        inner = [width, 2 * width, 4 * width, 8 * width]  # bottleneck inner widths of the 4 stages
        self.encoder = _ResNetFeatures(
            block=block,
            layers=layers,
            block_inplanes=inner,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type=shortcut_type,
            feed_forward=False,
            bias_downsample=bias_downsample,
        )
        encoder_channels = (in_channels, width, *(ResNetBottleneck.expansion * w for w in inner))
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims,
            encoder_channels=encoder_channels,
            decoder_channels=decoder_channels,
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=dropout,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(
            spatial_dims, decoder_channels[-1], out_channels, kernel_size=3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return self.segmentation_head(self.decoder(features, skip_connect=len(features) - 1))
