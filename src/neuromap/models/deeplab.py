"""DeepLabV3+ (Chen 2018) with an EfficientNet-B0 encoder.

MONAI supplies the encoder (EfficientNetBNFeatures) and ASPP (SimpleASPP) but no DeepLabV3+ decoder, so
the decoder head below is written by hand. Two differences from the paper, both forced by MONAI's parts:
ASPP runs on the stride-32 map (MONAI's EfficientNet has no atrous/output-stride-16 mode), and SimpleASPP
has no image-pooling branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.nets import EfficientNetBNFeatures, EfficientNetEncoder
from torch import nn

from neuromap.models.registry import register

ENCODER = "efficientnet-b0"
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def _conv_bn_relu(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int) -> Convolution:
    return Convolution(
        spatial_dims, in_channels, out_channels, kernel_size=kernel_size, norm="batch", act="relu", bias=False
    )


@register("deeplabv3plus")
class DeepLabV3Plus(nn.Module):
    """EfficientNet-B0 -> ASPP -> DeepLabV3+ decoder; sizes must be a multiple of 32.

    Decoder: the stride-4 encoder features are projected to ``low_level_channels`` (48 in the paper) and
    concatenated with the upsampled ASPP output (4 x ``aspp_channels`` wide), then two 3x3 convs of
    ``decoder_channels``, a 1x1 classifier and upsampling to the input size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        aspp_channels: int = 64,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = EfficientNetBNFeatures(
            ENCODER, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels
        )
        # forward() of the features variant never reaches the classification head; drop its 1.7 M parameters.
        del self.encoder._conv_head, self.encoder._bn1, self.encoder._fc
        encoder_index = EfficientNetEncoder.backbone_names.index(ENCODER)
        stage_channels = EfficientNetEncoder.num_channels_per_output()[encoder_index]  # strides 2, 4, ..., 32
        self.aspp = SimpleASPP(
            spatial_dims, stage_channels[-1], aspp_channels, norm_type="batch", acti_type="relu"
        )
        self.project = _conv_bn_relu(spatial_dims, stage_channels[1], low_level_channels, 1)
        aspp_out = 4 * aspp_channels  # SimpleASPP concatenates its 4 branches (1x1 and three dilated 3x3)
        self.fuse = nn.Sequential(
            _conv_bn_relu(spatial_dims, aspp_out + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(spatial_dims, decoder_channels, decoder_channels, 3),
            nn.Dropout(dropout),
        )
        self.classifier = Convolution(
            spatial_dims, decoder_channels, out_channels, kernel_size=1, conv_only=True
        )
        self.interpolation = _INTERPOLATION[spatial_dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        low = self.project(features[1])
        high = F.interpolate(self.aspp(features[-1]), size=low.shape[2:], mode=self.interpolation)
        logits = self.classifier(self.fuse(torch.cat([high, low], dim=1)))
        return F.interpolate(logits, size=x.shape[2:], mode=self.interpolation)
