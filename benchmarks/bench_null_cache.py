"""Principal components of the shared ResNet-20's conv layers, cached for the null benchmarks.

Runs ``pcace.rank(model, images, target=3, permutations=0, split_half=0)`` once on the
first ``N`` training cats (or, with ``--any-class``, the first ``N / 10`` training images of
every class) and writes, per layer, the ``(C, N, k)`` components, the observed values, the
cat logit and all ten logits (from which ``bench_null_calibration.py`` derives scores
independent of the images) to one ``.npz`` file. The other ``bench_null_*.py`` scripts read it,
so the forward pass and PCA run once.

Usage (repository root; extract the training set first, never into the repository)::

    mkdir -p /tmp/null_work && tar xzf ../shared/data/cifar10-train.tar.gz -C /tmp/null_work
    python benchmarks/bench_null_cache.py --n 300 1000 --train /tmp/null_work/cifar10-train \\
        --out /tmp/null_work
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def load_images(train: Path, n: int, any_class: bool) -> torch.Tensor:
    from torchvision import transforms

    from pcace.inputs.data import image_folder
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    if not any_class:
        ds = image_folder(train, class_name="cat", transform=tf)
        return torch.stack([ds[i][0] for i in range(n)])
    out = []
    for name in sorted(p.name for p in train.iterdir() if p.is_dir()):
        ds = image_folder(train, class_name=name, transform=tf)
        out += [ds[i][0] for i in range(n // 10)]
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--train", type=Path, required=True, help="extracted cifar10-train folder")
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--out", type=Path, default=Path("/tmp/null_work"))
    p.add_argument("--any-class", action="store_true", help="N/10 images of every class")
    a = p.parse_args()

    import pcace
    from pcace.inputs.models import load_model

    model = load_model("pcace.zoo:cifar_resnet20",
                       checkpoint=a.shared / "data/cifar10/resnet20-12fca82f.th").model
    for n in a.n:
        images = load_images(a.train, n, a.any_class)
        with torch.no_grad():
            logits = model.eval()(images).numpy()
        res = pcace.rank(model, images, target=3, permutations=0, split_half=0, progress=False)
        arrays = {"logits": logits, "scores": np.asarray(res.scores, dtype=np.float64),
                  "layers": np.array(list(res.components))}
        for name, z in res.components.items():
            arrays[f"z:{name}"] = z.detach().cpu().numpy().astype(np.float64)
            arrays[f"obs:{name}"] = res.channels.loc[res.channels.layer == name,
                                                     "pcace"].to_numpy()
        tag = "any" if a.any_class else "cat"
        path = a.out / f"components_{tag}_{n}.npz"
        np.savez(path, **arrays)
        print(f"N = {n}: {len(res.components)} layers, "
              f"{sum(v.shape[0] for v in res.components.values())} channels -> {path}")


if __name__ == "__main__":
    main()
