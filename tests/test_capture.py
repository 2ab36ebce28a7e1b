"""Tests of pcace.capture.capture: layer discovery, hooks, one forward pass, spilling."""

import gc

import numpy as np
import pytest
import torch
from torch import nn

from pcace.capture.capture import (
    ActivationStore,
    Capture,
    capture,
    conv_layer_names,
    describe_layers,
    resolve_layers,
)


class Net(nn.Module):
    """conv -> bn -> inplace relu -> block(conv, relu) -> pool -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.flatten(self.pool(self.block(x))))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    return net


def _batches(n=20, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, size, size, generator=gen).split(6))


def _score(out):
    return out[:, 1]


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------ layer names


def test_conv_layer_names_in_module_order():
    assert conv_layer_names(_net()) == ["conv1", "block.0"]
    assert conv_layer_names(nn.Sequential(nn.ReLU())) == []


def test_resolve_layers_order_dedup_and_modules():
    net = _net()
    assert resolve_layers(net, None) == ["conv1", "block.0"]
    assert resolve_layers(net, ["block.1", "conv1", "block.1"]) == ["conv1", "block.1"]
    assert resolve_layers(net, "bn1") == ["bn1"]
    assert resolve_layers(net, [net.block[0], "relu"]) == ["relu", "block.0"]


def test_resolve_layers_unknown_lists_closest_first():
    net = _net()
    with pytest.raises(ValueError, match="unknown layer 'block.2'") as info:
        resolve_layers(net, ["conv1", "block.2"])
    message = str(info.value)
    listed = message.split("closest first: ")[1].split(". List")[0].split(", ")
    assert listed[:2] == ["block.1", "block.0"] or listed[:2] == ["block.0", "block.1"]
    assert set(listed) == {"conv1", "bn1", "relu", "block", "block.0", "block.1", "pool",
                           "flatten", "fc"}


def test_resolve_layers_unknown_truncates_long_lists():
    net = nn.Sequential(*[nn.Conv2d(1, 1, 1) for _ in range(40)])
    with pytest.raises(ValueError, match=r"and 25 more") as info:
        resolve_layers(net, ["39x"])
    assert "closest first: 39," in str(info.value)


def test_resolve_layers_other_errors():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        resolve_layers(nn.Sequential(nn.ReLU()), None)
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(_net(), [])
    with pytest.raises(TypeError, match="module names"):
        resolve_layers(_net(), [3])
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layers(_net(), [nn.ReLU()])


# ------------------------------------------------------------------ describe_layers


def test_describe_layers_sequential():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 5, 1),
                        nn.Flatten(), nn.Linear(5 * 3 * 3, 2))
    net.train()  # restored after the pass
    table = describe_layers(net, (3, 8, 8))
    assert table.name.tolist() == ["0", "1", "2", "3"]
    assert table.type.tolist() == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d"]
    assert table[["out_channels", "height", "width"]].values.tolist() == [
        [8, 6, 6], [8, 6, 6], [8, 3, 3], [5, 3, 3]]
    assert net.training and _no_hooks(net)
    assert describe_layers(net, (2, 3, 8, 8)).equals(table)
    with pytest.raises(ValueError, match="input_shape"):
        describe_layers(net, (8, 8))


def test_describe_layers_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    table = describe_layers(model, (3, 224, 224)).set_index("name")
    shapes = {n: tuple(table.loc[n, ["out_channels", "height", "width"]]) for n in
              ["conv1", "maxpool", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.1.conv2",
               "layer4.1.conv2", "layer4", "avgpool"]}
    assert shapes == {"conv1": (64, 112, 112), "maxpool": (64, 56, 56),
                      "layer1.0.conv1": (64, 56, 56), "layer2.0.downsample.0": (128, 28, 28),
                      "layer3.1.conv2": (256, 14, 14), "layer4.1.conv2": (512, 7, 7),
                      "layer4": (512, 7, 7), "avgpool": (512, 1, 1)}
    assert "fc" not in table.index
    assert table.loc["layer1.0.relu", "calls"] == 2  # BasicBlock reuses its ReLU
    assert table.loc["layer1.0.conv1", "calls"] == 1
    convs = table[table.type == "Conv2d"].index.tolist()
    assert convs == conv_layer_names(model) and len(convs) == 20
    assert _no_hooks(model)


def test_describe_layers_removes_hooks_on_error():
    net = _net()
    with pytest.raises(RuntimeError):
        describe_layers(net, (5, 8, 8))  # wrong number of input channels
    assert _no_hooks(net)


# ------------------------------------------------------------------ capture


def test_capture_basic_and_one_forward_per_batch():
    net = _net()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    batches = _batches()
    with capture(net, batches, ["conv1", "block.0"], _score, progress=False) as cap:
        assert isinstance(cap, Capture)
        assert calls == [6, 6, 6, 2]
        assert cap.forward_calls == 4
        assert cap.n_images == 20 and cap.layers == ["conv1", "block.0"]
        assert cap.shapes == {"conv1": (4, 8, 8), "block.0": (6, 6, 6)}
        assert cap.spilled == {"conv1": False, "block.0": False}
        assert cap.scores.dtype == np.float64 and cap.scores.shape == (20,)
        assert cap.seconds > 0
        images = torch.cat(batches)
        with torch.no_grad():
            expected_scores = _score(net(images)).double().numpy()
            expected = net.conv1(images)
        np.testing.assert_allclose(cap.scores, expected_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.layer("conv1"), expected)
        torch.testing.assert_close(cap.layer("conv1", [3, 1]), expected[:, [3, 1]])
        torch.testing.assert_close(cap.layer("conv1", 2), expected[:, 2:3])
    net._forward_pre_hooks.clear()
    assert _no_hooks(net)
    assert cap.closed
    with pytest.raises(RuntimeError, match="closed"):
        cap.layer("conv1")


def test_capture_default_layers_and_tuple_batches():
    net = _net()
    labelled = [(b, torch.zeros(len(b))) for b in _batches()]
    cap = capture(net, iter(labelled), None, _score, progress=False)
    assert cap.layers == ["conv1", "block.0"] and cap.n_images == 20
    cap.close()


def test_inplace_relu_does_not_corrupt_stored_output_and_eval_mode_used():
    net = _net().train()  # capture must run it in eval mode (BN running statistics)
    images = torch.cat(_batches())
    with capture(net, [images], ["bn1"], _score, progress=False) as cap:
        assert net.training
        net.eval()
        with torch.no_grad():
            expected = net.bn1(net.conv1(images))
        assert (expected < 0).any()
        torch.testing.assert_close(cap.layer("bn1"), expected)


def test_training_flags_restored():
    net = _net().train()
    net.block.eval()
    with capture(net, _batches(), ["conv1"], _score, progress=False):
        pass
    assert net.training and net.conv1.training and not net.block.training


def test_non_4d_layer_errors_with_name():
    net = _net()
    with pytest.raises(ValueError, match=r"layer 'flatten' produced shape \(6, 24\)"):
        capture(net, _batches(), ["conv1", "flatten"], _score, progress=False)
    assert _no_hooks(net)


def test_module_run_twice_errors():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 2, 1), relu, nn.Conv2d(2, 2, 1), relu)
    with pytest.raises(ValueError, match="ran more than once"):
        capture(net, _batches(), ["1"], lambda out: out.sum((1, 2, 3)), progress=False)
    assert _no_hooks(net)


class Boom(Exception):
    pass


class Exploding(nn.Module):
    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise Boom("model failed")
        return x


def test_hooks_removed_after_error_in_model():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), Exploding(after=2), nn.Flatten(), nn.Linear(128, 1))
    with pytest.raises(Boom):
        capture(net, _batches(), ["0"], lambda out: out[:, 0], progress=False)
    assert _no_hooks(net)


def test_hooks_removed_after_error_in_score_fn():
    net = _net()

    def bad_score(out):
        raise Boom("score failed")

    with pytest.raises(Boom):
        capture(net, _batches(), ["conv1", "block.0"], bad_score, progress=False)
    assert _no_hooks(net)


def test_keyboard_interrupt_propagates_and_spill_dir_removed(tmp_path):
    net = _net()
    seen = []

    def interrupt(out):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return out[:, 0]

    with pytest.raises(KeyboardInterrupt):
        capture(net, _batches(), ["conv1"], interrupt, memory_budget=0, spill_dir=tmp_path,
                progress=False)
    assert _no_hooks(net)
    assert list(tmp_path.iterdir()) == []


def test_score_fn_shape_and_nan_errors():
    net = _net()
    with pytest.raises(ValueError, match=r"shape \(6,\); got \(6, 3\)"):
        capture(net, _batches(), ["conv1"], lambda out: out, progress=False)
    with pytest.raises(ValueError, match=r"out\[:, 0\]"):
        capture(net, _batches(), ["conv1"], lambda out: out[:, :1], progress=False)

    def nan_score(out):
        s = out[:, 0].clone()
        s[1] = float("nan")
        return s

    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        capture(net, _batches(), ["conv1"], nan_score, progress=False)
    assert _no_hooks(net)


class Poison(nn.Module):
    """Puts a NaN in channel 2 of image 8 (the third image of the second batch of 6)."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        x = x.clone()
        index = 8 - self.seen
        if 0 <= index < x.shape[0]:
            x[index, 2, 1, 1] = float("nan")
        self.seen += x.shape[0]
        return x


def test_nan_in_layer_names_layer_channel_and_image():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), Poison(), nn.Conv2d(4, 1, 1))
    with pytest.raises(ValueError, match=r"layer '1' produced NaN or inf in channel\(s\) \[2\] "
                                         r"for image\(s\) \[8\]"):
        capture(net, _batches(), ["0", "1"], lambda out: out.sum((1, 2, 3)), progress=False)
    assert _no_hooks(net)


def test_empty_batches_and_bad_batch():
    net = _net()
    with pytest.raises(ValueError, match="no images"):
        capture(net, [], ["conv1"], _score, progress=False)
    with pytest.raises(ValueError, match=r"batch 0 must be an image tensor"):
        capture(net, [torch.zeros(3, 8, 8)], ["conv1"], _score, progress=False)
    assert _no_hooks(net)


# ------------------------------------------------------------------ spilling


def test_spilled_run_matches_in_memory_run(tmp_path):
    net = _net()
    batches = _batches(n=23)
    layers = ["conv1", "bn1", "block.0"]
    with capture(net, batches, layers, _score, progress=False) as ram, \
            capture(net, batches, layers, _score, memory_budget=0, spill_dir=tmp_path,
                    progress=False) as disk:
        assert not any(ram.spilled.values()) and all(disk.spilled.values())
        spill_dirs = list(tmp_path.iterdir())
        assert len(spill_dirs) == 1 and len(list(spill_dirs[0].iterdir())) == 3
        np.testing.assert_array_equal(ram.scores, disk.scores)
        assert ram.shapes == disk.shapes and disk.n_images == 23
        for name in layers:
            assert torch.equal(ram.layer(name), disk.layer(name))
            assert torch.equal(ram.layer(name, slice(1, 3)), disk.layer(name, slice(1, 3)))
            assert torch.equal(ram.layer(name, [3, 0]), disk.layer(name, [3, 0]))
            assert torch.equal(ram.layer(name, -1), disk.layer(name, -1))
    assert list(tmp_path.iterdir()) == []


def test_budget_spills_the_largest_layer_only():
    net = _net()
    batches = _batches(n=20)
    # conv1: 20 * 4 * 64 * 4 B = 20480 B; block.0: 20 * 6 * 36 * 4 B = 17280 B
    with capture(net, batches, ["conv1", "block.0"], _score, memory_budget=25_000,
                 progress=False) as cap:
        assert cap.spilled == {"conv1": True, "block.0": False}
        assert cap._store.in_memory_bytes <= 25_000
        with capture(net, batches, ["conv1", "block.0"], _score, progress=False) as ram:
            for name in cap.layers:
                assert torch.equal(cap.layer(name), ram.layer(name))


def test_spill_dir_removed_on_garbage_collection():
    cap = capture(_net(), _batches(), ["conv1"], _score, memory_budget=0, progress=False)
    directory = cap._store.directory
    assert directory.exists()
    del cap
    gc.collect()
    assert not directory.exists()


def test_blocks_in_channel_counts_are_bounded_and_complete():
    net = _net()
    with capture(net, _batches(n=20), ["block.0"], _score, memory_budget=0,
                 progress=False) as cap:
        chunks = list(cap.blocks("block.0", 2))
        assert [(s.start, s.stop) for s, _ in chunks] == [(0, 2), (2, 4), (4, 6)]
        expected = cap.layer("block.0").flatten(2).transpose(0, 1)
        assert torch.equal(torch.cat([t for _, t in chunks]), expected)
        tiny = list(cap.blocks("block.0", 1))
        assert len(tiny) == 6 and all(t.shape[0] == 1 for _, t in tiny)
        with pytest.raises(ValueError, match="channels"):
            list(cap.blocks("block.0", 0))
        with pytest.raises(KeyError, match="not captured"):
            list(cap.blocks("conv1", 1000))


def test_activation_store_checks():
    with pytest.raises(ValueError, match="memory_budget"):
        ActivationStore(["a"], memory_budget=-1)
    store = ActivationStore(["a"], memory_budget=10**6)
    store.add({"a": torch.ones(2, 3, 2, 2)})
    with pytest.raises(ValueError, match="one size"):
        store.add({"a": torch.ones(2, 3, 4, 4)})
    with pytest.raises(RuntimeError, match="finalize"):
        store.read("a")
    store.finalize()
    with pytest.raises(IndexError, match="out of range"):
        store.read("a", 5)
    store.close()


# ------------------------------------------------------------------ channel-major store

def _generator(batches):
    yield from batches  # no len(): the store does not know N in advance


@pytest.mark.parametrize("budget", [10**9, 0, 30_000])
def test_unknown_count_uses_segments_and_matches_known(monkeypatch, budget):
    """Segments of 8 images, N = 23 unknown: segment boundaries inside batches of 6; with a
    small budget a layer is spilled after some of its segments were filled in RAM."""
    monkeypatch.setattr(ActivationStore, "SEGMENT_IMAGES", 8)
    net = _net()
    batches = _batches(n=23)
    layers = ["conv1", "block.0"]
    with capture(net, batches, layers, _score, progress=False) as known, \
            capture(net, _generator(batches), layers, _score, memory_budget=budget,
                    progress=False) as unknown:
        assert known._store._layers["conv1"].capacity == 23
        assert unknown._store._layers["conv1"].capacity == 8
        for name in layers:
            assert torch.equal(known.layer(name), unknown.layer(name))
            assert torch.equal(known.layer(name, [2, 0]), unknown.layer(name, [2, 0]))
            blocks = [b for _, b in unknown.blocks(name, 1)]
            c = known.shapes[name][0]
            assert len(blocks) == c and all(b.shape[0] == 1 for b in blocks)
            expected = known.layer(name).flatten(2).transpose(0, 1)
            assert torch.equal(torch.cat(blocks), expected)
        if budget == 30_000:
            assert unknown._store.in_memory_bytes <= 30_000
            assert unknown.spilled["conv1"]


def test_destructive_blocks_are_views_of_a_layer_in_ram_and_copies_when_spilled():
    net = _net()
    with capture(net, _batches(n=20), ["conv1"], _score, progress=False) as ram, \
            capture(net, _batches(n=20), ["conv1"], _score, memory_budget=0,
                    progress=False) as disk:
        (_, own), = list(ram.blocks("conv1", 4))
        own.zero_()  # not destructive: the caller's own copy
        assert not (ram.layer("conv1") == 0).all()
        (_, view), = list(ram.blocks("conv1", 4, destructive=True))
        (_, copy), = list(disk.blocks("conv1", 4, destructive=True))
        assert torch.equal(view, copy) and view.shape == (4, 20, 64)
        view.zero_()  # the pipeline standardises in place: the store sees it
        assert (ram.layer("conv1") == 0).all()
        copy.zero_()
        assert not (disk.layer("conv1") == 0).all()
        assert not (disk.layer("conv1") == 0).all()


def test_fewer_images_than_announced():
    """Unreadable files are skipped after N was announced: the store holds what came."""
    store = ActivationStore(["a"], memory_budget=10**6, n_images=10)
    store.put("a", torch.arange(36, dtype=torch.float32).reshape(6, 3, 2, 1))
    store.finalize()
    x = torch.arange(36, dtype=torch.float32).reshape(6, 3, 2, 1)
    assert torch.equal(store.read("a"), x)
    assert torch.equal(store.block("a", 1, 3), x[:, 1:3].flatten(2).transpose(0, 1))
    store.close()


def test_auto_budget():
    from pcace.core.budget import default_memory_budget, resolve_budget

    assert resolve_budget("auto") == default_memory_budget() >= 2**30
    assert resolve_budget(12345) == 12345
    with pytest.raises(ValueError, match="auto"):
        resolve_budget("lots")


def test_spill_write_error_is_reported_and_cleaned_up(monkeypatch, tmp_path):
    import pcace.capture.store as store_module

    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def seek(self, offset):
            return offset

        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(store_module, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match=r"could not spill layer 'conv1'.*No space left"):
        capture(_net(), _batches(), ["conv1"], _score, memory_budget=0, spill_dir=tmp_path,
                progress=False)
    assert list(tmp_path.iterdir()) == []  # the spill directory is removed


def test_read_ahead_of_spilled_blocks_stops_cleanly(tmp_path):
    net = _net()
    with capture(net, _batches(n=20), ["conv1"], _score, memory_budget=0, spill_dir=tmp_path,
                 progress=False) as cap:
        walk = cap.blocks("conv1", 1)  # one channel per block: reads run ahead
        (first, block), = [next(walk)]
        assert (first.start, first.stop) == (0, 1)
        expected = cap.layer("conv1", 0).flatten(2).transpose(0, 1)
        assert torch.equal(block, expected)
        walk.close()  # the consumer stops early: the reader thread is joined
        assert [s.start for s, _ in cap.blocks("conv1", 1)] == [0, 1, 2, 3]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ device tier (GPU memory)
# The tier logic is device-agnostic: here the "device" is the CPU, with a budget of its own.

def _maps(n, c, seed):
    return torch.randn(n, c, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_device_tier_holds_layers_while_they_fit():
    maps = {"a": _maps(6, 3, 1), "b": _maps(6, 5, 2), "c": _maps(6, 2, 3)}  # 288, 480, 192 B
    store = ActivationStore(list(maps), memory_budget=10**6, n_images=6, device="cpu",
                            device_budget=500)
    for name, x in maps.items():
        store.put(name, x[:4])
    for name, x in maps.items():
        store.put(name, x[4:])
    store.finalize()
    assert store.on_device == {"a": True, "b": False, "c": True}
    assert store.device_bytes == 288 + 192 and store.in_memory_bytes == 480
    for name, x in maps.items():
        assert torch.equal(store.read(name), x)
    view = store.block("a")  # a view of the device tier, as for RAM
    view.zero_()
    assert (store.read("a") == 0).all()
    store.close()


@pytest.mark.parametrize("memory_budget", [10**6, 0], ids=["to-ram", "to-disk"])
def test_device_layer_that_outgrows_the_device_moves_to_ram_or_disk(monkeypatch,
                                                                    memory_budget):
    monkeypatch.setattr(ActivationStore, "SEGMENT_IMAGES", 4)
    x = _maps(11, 3, 4)  # N unknown: segments of 4 images, 192 B each
    store = ActivationStore(["a"], memory_budget=memory_budget, device="cpu",
                            device_budget=400)
    for part in x.split(3):
        store.put("a", part)
        if store._layers["a"].n <= 8:
            assert store.on_device["a"]  # two segments fit the device
    store.finalize()
    assert not store.on_device["a"] and store.device_bytes == 0
    assert store.spilled["a"] == (memory_budget == 0)
    assert torch.equal(store.read("a"), x)
    assert torch.equal(store.block("a", 1, 3), x[:, 1:3].flatten(2).transpose(0, 1))
    store.close()


def test_capture_on_the_cpu_keeps_no_device_tier():
    with capture(_net(), _batches(n=10), ["conv1"], _score, progress=False,
                 device_memory_budget=10**9) as cap:
        assert cap.on_device == {"conv1": False}
    with pytest.raises(ValueError, match="device_memory_budget"):
        capture(_net(), _batches(n=10), ["conv1"], _score, progress=False,
                device_memory_budget=-1)
