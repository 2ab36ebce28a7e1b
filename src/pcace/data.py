"""The public shortcut to :mod:`pcace.inputs.data` (their names, under the path users know).

Everything here is defined there; nothing inside pcace imports this module.
"""

from .inputs.data import (
    IMAGE_EXTENSIONS,
    ImageBatches,
    ImageFiles,
    as_batches,
    csv_images,
    default_transform,
    image_folder,
    mnist_idx,
    relabel,
    sklearn_digits,
)

__all__ = ["as_batches", "csv_images", "default_transform", "IMAGE_EXTENSIONS", "image_folder",
           "ImageBatches", "ImageFiles", "mnist_idx", "relabel", "sklearn_digits"]
