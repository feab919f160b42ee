"""Model registry: every architecture builds in each supported dimensionality, returns logits at input size,
trains (finite gradients, loss goes down) and rejects bad configs with a NeuroMapError that names the fix.

Shapes and widths are tiny so the whole file runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet

from neuromap.config import ModelConfig
from neuromap.errors import NeuroMapError
from neuromap.models import MODEL_NAMES, REGISTRY, build_model, required_divisor, resolve_options

IN_CHANNELS = 4  # t1, t1ce, t2, flair
# Narrow widths per architecture, so each forward/backward takes milliseconds.
TINY = {
    "unet2d": {"features": (4, 8, 8, 16, 16, 4)},
    "unet3d": {"features": (4, 4, 8, 8, 16, 4)},
    "attention_unet": {"channels": (4, 8, 16), "strides": (2, 2)},
    "resunet": {"width": 4, "decoder_channels": (32, 16, 8, 8, 4)},
    "deeplabv3plus": {"aspp_channels": 8, "low_level_channels": 8, "decoder_channels": 16},
    "segresnet": {"init_filters": 8},
}
SPATIAL = {2: (64, 64), 3: (32, 32, 32)}  # divisible by every architecture's divisor (at most 32)
CASES = [(name, dims) for name in MODEL_NAMES for dims in REGISTRY[name].spatial_dims]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine OpenMP spin-waiting made
    this file ~10x slower (100 s instead of 10 s). Restored afterwards so other test files are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, dims: int, **fields) -> ModelConfig:
    return ModelConfig(name=name, spatial_dims=dims, options=TINY[name], **fields)


def first_dims(name: str) -> int:
    return REGISTRY[name].spatial_dims[0]


def test_every_architecture_has_tiny_options_and_the_expected_names():
    assert set(MODEL_NAMES) == set(TINY)
    assert set(MODEL_NAMES) == {"unet2d", "unet3d", "attention_unet", "resunet", "deeplabv3plus", "segresnet"}


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_forward_shape_and_finite_gradients(name: str, dims: int):
    torch.manual_seed(0)
    model = build_model(tiny(name, dims), IN_CHANNELS, 4).train()
    x = torch.randn(2, IN_CHANNELS, *SPATIAL[dims])
    logits = model(x)
    assert logits.shape == (2, 4, *SPATIAL[dims])
    logits.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # every parameter is on the forward path (no dead heads), and no gradient is nan/inf
    assert [n for n, p in trainable if p.grad is None] == []
    assert [n for n, p in trainable if not torch.isfinite(p.grad).all()] == []


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_regions_output_is_three_logit_channels(name: str):
    dims = first_dims(name)
    model = build_model(tiny(name, dims, out="regions"), IN_CHANNELS, 3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, IN_CHANNELS, *SPATIAL[dims]))
    assert logits.shape == (1, 3, *SPATIAL[dims])  # sigmoid is the loss's / inference's job


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if 2 in REGISTRY[n].spatial_dims])
def test_any_multiple_of_the_divisor_keeps_its_size(name: str):
    cfg = tiny(name, 2)
    size = 3 * required_divisor(cfg)  # not a power of two
    model = build_model(cfg, IN_CHANNELS, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, IN_CHANNELS, size, 2 * size)).shape == (1, 2, size, 2 * size)


@pytest.mark.parametrize(("name", "dims"), CASES)
def test_defaults_build_and_run_at_the_default_input_size(name: str, dims: int):
    cfg = ModelConfig(name=name, spatial_dims=dims)
    model = build_model(cfg, IN_CHANNELS, 4).eval()
    shape = (128, 128) if dims == 2 else (32, 32, 32)  # 3D defaults are checked small to stay fast
    assert all(s % required_divisor(cfg) == 0 for s in shape)
    with torch.no_grad():
        assert model(torch.randn(1, IN_CHANNELS, *shape)).shape == (1, 4, *shape)
    assert sum(p.numel() for p in model.parameters()) < 12_000_000  # CPU-friendly defaults


def test_required_divisor_follows_the_options():
    assert required_divisor(ModelConfig(name="unet2d", spatial_dims=2)) == 16
    assert required_divisor(ModelConfig(name="resunet")) == 32
    assert required_divisor(ModelConfig(name="deeplabv3plus")) == 32
    assert required_divisor(ModelConfig(name="segresnet")) == 8
    assert required_divisor(ModelConfig(name="segresnet", options={"blocks_down": (1, 2, 2, 2, 4)})) == 16
    assert required_divisor(ModelConfig(name="attention_unet")) == 16
    assert required_divisor(tiny("attention_unet", 3)) == 4


def test_options_override_defaults_and_yaml_lists_become_tuples():
    cfg = ModelConfig(name="segresnet", options={"init_filters": 8, "blocks_up": [1, 2, 1]})
    options = resolve_options(cfg)
    assert options == {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 2, 1), "dropout": 0.0}


@pytest.mark.parametrize("dims", [2, 3])
def test_resunet_at_full_width_is_monai_flexible_unet_resnet50(dims: int):
    """Same layers and state-dict keys as FlexibleUNet(backbone="resnet50"): a true ResNet-50 encoder."""
    full = {"width": 64, "decoder_channels": (256, 128, 64, 32, 16)}
    ours = build_model(ModelConfig(name="resunet", spatial_dims=dims, options=full), IN_CHANNELS, 3)
    monai = FlexibleUNet(IN_CHANNELS, 3, backbone="resnet50", pretrained=False, spatial_dims=dims)
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in (ours, monai)]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_decreases_on_a_synthetic_batch(name: str):
    torch.manual_seed(0)
    dims = first_dims(name)
    model = build_model(tiny(name, dims), IN_CHANNELS, 3).train()
    x = torch.randn(2, IN_CHANNELS, *SPATIAL[dims])
    target = (x[:, :1] > 0).long() + (x[:, 1:2] > 1).long()  # 3 classes that depend on the input
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (ModelConfig(name="vnet"), ["unknown model name 'vnet'", "segresnet", "unet2d"]),
        (ModelConfig(name="unet2d", spatial_dims=3), ["spatial_dims=3", "[2]", "unet3d"]),
        (ModelConfig(name="unet3d", spatial_dims=2), ["spatial_dims=2", "[3]", "unet2d"]),
        (ModelConfig(name="segresnet", options={"filters": 8}), ["no option(s) ['filters']", "init_filters"]),
        (ModelConfig(name="resunet", options={"width": 0}), ["width=0", "positive integer"]),
        (ModelConfig(name="unet2d", spatial_dims=2, options={"dropout": 1.5}), ["dropout=1.5", "[0, 1)"]),
        (ModelConfig(name="unet3d", options={"features": "big"}), ["features='big'", "list of positive"]),
        (ModelConfig(name="unet3d", options={"features": [8, 16]}), ["features", "length 6"]),
        (ModelConfig(name="segresnet", options={"init_filters": 12}), ["init_filters", "12"]),
        (ModelConfig(name="attention_unet", options={"strides": [2, 2]}), ["strides", "len(channels) - 1"]),
    ],
    ids=[
        "unknown-name", "2d-only", "3d-only", "unknown-option", "zero-width", "bad-dropout", "not-a-list",
        "wrong-length", "bad-groups", "strides-vs-channels",
    ],
)
def test_bad_config_names_the_problem_and_the_fix(cfg: ModelConfig, expected: list[str]):
    with pytest.raises(NeuroMapError) as info:
        build_model(cfg, IN_CHANNELS, 4)
    for text in [*expected, "Fix"]:
        assert text in str(info.value)


def test_bad_config_also_fails_in_required_divisor():
    with pytest.raises(NeuroMapError, match="unknown model name"):
        required_divisor(ModelConfig(name="vnet"))
    with pytest.raises(NeuroMapError, match="no option"):
        required_divisor(ModelConfig(name="resunet", options={"depth": 3}))


@pytest.mark.parametrize(("in_channels", "out_channels"), [(0, 4), (4, 0), (4, 2.5)])
def test_channel_counts_must_be_positive_integers(in_channels, out_channels):
    with pytest.raises(NeuroMapError, match="positive integer"):
        build_model(ModelConfig(), in_channels, out_channels)
