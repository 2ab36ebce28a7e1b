"""The paper's ImageNet experiment: ResNet-18 and VGG-16 over the images of one class.

Usage::

    python examples/imagenet.py --data /path/to/imagenet/val --class n02124075 \
        --target "Egyptian cat" --images 300 --out runs/imagenet

``--data`` is a folder in torchvision's ImageFolder layout (one subfolder per class); the
class folder holds the images to rank over (the paper uses 300 images of "Egyptian cat").
The pretrained weights come from torchvision, which downloads them on first use (online);
pass ``--weights none`` to try the pipeline offline on random weights.

For each network, every conv layer is ranked in one forward pass; the script prints which
layers carry the most class information (median and 90th percentile of their channels) and the
top channels of the last layers.
"""

import argparse

import torch

import pcace
from pcace.inputs.data import image_folder
from pcace.inputs.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--class", dest="class_name", required=True)
    parser.add_argument("--target", default="Egyptian cat")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--out", default="runs/imagenet")
    args = parser.parse_args()

    for name in args.models:
        loaded = load_model(f"torchvision:{name}", weights=args.weights)
        ds = image_folder(args.data, class_name=args.class_name, transform=loaded.transform)
        ds = torch.utils.data.Subset(ds, range(min(args.images, len(ds))))
        res = pcace.rank(loaded.model, ds, args.target, categories=loaded.categories,
                         batch_size=32)
        res.manifest["model"]["spec"] = loaded.spec
        res.save(f"{args.out}/{name}")
        print(f"\n== {loaded.description}: layers by median PCACE")
        columns = ["layer", "channels", "median", "q90", "max", "top_channels"]
        table = res.layers.sort_values("median", ascending=False)[columns]
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
