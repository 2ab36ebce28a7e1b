"""Small CNN architectures that PCACE's examples and tests use.

:func:`cifar_resnet20` is the CIFAR-10 ResNet-20 of He et al. (2016, section 4.2)
with the parameter-free ("option A") shortcut; its module names match the
state-dict keys of the widely used pretrained checkpoints (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``linear``), so those load with ``strict=True`` once a
``module.`` prefix is stripped. :func:`mnist_cnn` is a two-convolution network
for MNIST-sized inputs, small enough to train on a CPU in seconds.

Each factory carries a ``pcace_info`` attribute (categories, input shape,
normalisation) that :func:`pcace.inputs.models.load_model` reads when the factory is
loaded as ``pcace.zoo:NAME``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "MNIST_CLASSES",
    "BasicBlock",
    "CifarResNet",
    "MnistCNN",
    "cifar_resnet20",
    "mnist_cnn",
]


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad new channels.

    The added channels are split equally before and after the existing ones.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if (planes - in_planes) % 2:
            raise ValueError(f"cannot pad {in_planes} channels to {planes} equally on both sides")
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: three stages of 16, 32 and 64 channels."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


class MnistCNN(nn.Module):
    """Two 3x3 convolutions (8 and 16 channels) with ReLU and 2x2 max pooling, then MLP."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 7 * 7, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool1(self.relu1(self.conv1(x)))
        out = self.pool2(self.relu2(self.conv2(out)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(out, 1))))


def cifar_resnet20(num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-20 (three stages of three basic blocks, 0.27M parameters).

    Inputs are RGB 32x32 images in [0, 1] normalised with :data:`CIFAR_MEAN` and
    :data:`CIFAR_STD`. Module names match the common pretrained checkpoints.

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of the final ``linear`` layer.

    Returns
    -------
    torch.nn.Module
        A randomly initialised network in training mode.

    Examples
    --------
    >>> import torch
    >>> net = cifar_resnet20().eval()
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return CifarResNet(3, num_classes)


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """A small MNIST CNN with two convolutional layers, ``conv1`` (8) and ``conv2`` (16).

    Parameters
    ----------
    num_classes : int, default 10
        Outputs of the final ``fc2`` layer.

    Returns
    -------
    torch.nn.Module
        A randomly initialised network for inputs of shape (N, 1, 28, 28).

    Examples
    --------
    >>> import torch
    >>> mnist_cnn()(torch.zeros(4, 1, 28, 28)).shape
    torch.Size([4, 10])
    """
    return MnistCNN(num_classes)


cifar_resnet20.pcace_info = {  # type: ignore[attr-defined]
    "categories": list(CIFAR10_CLASSES),
    "input_shape": (3, 32, 32),
    "mean": CIFAR_MEAN,
    "std": CIFAR_STD,
}
mnist_cnn.pcace_info = {  # type: ignore[attr-defined]
    "categories": list(MNIST_CLASSES),
    "input_shape": (1, 28, 28),
    "mean": None,
    "std": None,
}
