"""Sharded passes over the images against the one-process streaming reduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcace.engines.engine import LocalEngine
from pcace.engines.shards import ShardWorker, shard_bounds, sharded_components
from pcace.inputs.hooks import evaluating, forward_hooks
from pcace.reduce.streaming import streaming_reduce
from pcace.zoo import mnist_cnn


def one_process(model, images, layer, components, batch_size=16):
    """The reference: one process, streaming_reduce over the model's outputs in batches."""
    def batches():
        seen = {}
        hook = {layer: lambda m, i, out: seen.__setitem__("x", out.detach().float())}
        with evaluating(model), torch.inference_mode(), forward_hooks(model, hook):
            for b in images.split(batch_size):
                model(b)
                yield seen["x"]
    return streaming_reduce(batches, components, route="moments")[0]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return mnist_cnn(), torch.rand(90, 1, 28, 28)


def test_shard_bounds():
    assert shard_bounds(5, 5) == [(0, 5)]
    assert shard_bounds(0, 3) == []
    with pytest.raises(ValueError):
        shard_bounds(5, 0)


@pytest.mark.parametrize("shard_size", [7, 32, 90])
def test_sharded_equals_streaming_reduce(net, shard_size):
    model, images = net
    engine = LocalEngine()
    reds, scores = sharded_components(model, images, ["conv1", "conv2"], 3, 3,
                                      shard_size=shard_size, batch_size=16, engine=engine)
    with torch.no_grad():
        np.testing.assert_allclose(scores, model(images)[:, 3].double().numpy(), atol=1e-5)
    for layer in ("conv1", "conv2"):
        ref = one_process(model, images, layer, 3)
        got = reds[layer]
        np.testing.assert_allclose(got.scores.numpy(), ref.scores.numpy(), atol=1e-9)
        np.testing.assert_array_equal(got.n_components, ref.n_components)
        np.testing.assert_allclose(got.explained_variance, ref.explained_variance, atol=1e-12)
    assert {"forward_moments", "forward_project"} <= set(engine.stage_seconds)


def test_worker_rebuilds_model_and_data_from_specs(shared_dir):
    from pcace.inputs.data import describe_data
    from pcace.inputs.models import load_model
    from pcace.zoo import CIFAR_MEAN, CIFAR_STD

    loaded = load_model("pcace.zoo:cifar_resnet20",
                        checkpoint=shared_dir / "data/cifar10/resnet20-12fca82f.th")
    data = describe_data(shared_dir / "data/cifar10/test", class_name="cat", limit=40,
                         mean=list(CIFAR_MEAN), std=list(CIFAR_STD))
    worker = ShardWorker(loaded.spec, data, ["layer1.0.conv1"], 3, batch_size=16)
    moments, scores = worker.moments(10, 40)
    assert len(worker) == 40 and moments["layer1.0.conv1"]["count"] == 30 and scores.shape == (30,)
