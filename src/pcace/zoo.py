"""The public shortcut to :mod:`pcace.inputs.zoo` (its names, under the path users know).

Everything here is defined in :mod:`pcace.inputs.zoo`; nothing inside pcace imports this module.
"""

from .inputs.zoo import (
    CIFAR10_CLASSES,
    CIFAR_MEAN,
    CIFAR_STD,
    MNIST_CLASSES,
    BasicBlock,
    CifarResNet,
    MnistCNN,
    cifar_resnet20,
    mnist_cnn,
)

__all__ = ["BasicBlock", "CIFAR10_CLASSES", "CIFAR_MEAN", "cifar_resnet20", "CIFAR_STD",
           "CifarResNet", "MNIST_CLASSES", "mnist_cnn", "MnistCNN"]
