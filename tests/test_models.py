"""Model helpers: torchvision families without downloads, local weights, multispectral first conv."""

from __future__ import annotations

import pytest
import torch

from aifactory_train.errors import CheckpointError, ConfigError
from aifactory_train.run.models import adapt_first_conv, build_torchvision_classifier


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [3, 4])
def test_families_build_with_class_count_and_band_count(name, channels):
    model = build_torchvision_classifier(name, num_classes=5, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 64, 64))
    assert out.shape == (2, 5)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_torchvision_classifier("vgg_tiny", num_classes=3)
    assert "vgg_tiny" in str(err.value) and "resnet50" in str(err.value)


def test_local_weights_load_and_head_is_reinitialised(tmp_path):
    pretrained = build_torchvision_classifier("resnet18", num_classes=1000)
    path = tmp_path / "resnet18_imagenet.pt"
    torch.save(pretrained.state_dict(), path)
    model = build_torchvision_classifier("resnet18", num_classes=7, weights_path=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, pretrained.layer1[0].conv1.weight)
    assert model.fc.weight.shape == (7, 512)


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    pretrained = build_torchvision_classifier("mobilenet_v3_small", num_classes=7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(path))
    model = build_torchvision_classifier("mobilenet_v3_small", num_classes=7, weights_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pretrained.state_dict().values()))


def test_pretrained_rgb_filters_survive_widening_to_four_bands(tmp_path):
    pretrained = build_torchvision_classifier("resnet18", num_classes=7)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    model = build_torchvision_classifier("resnet18", num_classes=7, in_channels=4, weights_path=str(path))
    rgb = pretrained.conv1.weight
    assert torch.equal(model.conv1.weight[:, :3], rgb)
    assert torch.allclose(model.conv1.weight[:, 3], rgb.mean(dim=1))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_torchvision_classifier("mobilenet_v3_small", num_classes=7).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_torchvision_classifier("resnet18", num_classes=7, weights_path=str(path))
    assert "other.pt" in str(err.value) and "missing keys" in str(err.value)


def test_missing_weights_file_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.weights_path.*does not exist"):
        build_torchvision_classifier("resnet18", num_classes=7, weights_path=str(tmp_path / "nope.pt"))


def test_adapt_first_conv_to_single_band():
    model = build_torchvision_classifier("efficientnet_b0", num_classes=3)
    adapt_first_conv(model, 1)
    assert model.features[0][0].in_channels == 1
