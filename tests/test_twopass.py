"""The two-pass reduce (pcace.reduce.twopass) inside pcace.rank, against the in-memory path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pcace
from pcace.capture.capture import capture
from pcace.reduce.plan import LayerRoute, MemoryPlan
from pcace.reduce.twopass import TwoPass
from pcace.run.passes import Passes


@pytest.fixture(scope="module")
def cifar(cifar_cats):
    return cifar_cats(150)


def test_resnet20_streamed_equals_in_memory(cifar, request):
    """Layers of every map size of the shared ResNet-20 streamed; 150 images in batches of 64 (not a
    multiple); float64 passes on both sides, so the values must agree to 1e-6."""
    model, images = cifar
    kw = dict(target=3, progress=False, device="cpu", pca_dtype=torch.float64, batch_size=64,
              layers=["conv1", "layer1.2.conv2", "layer2.0.conv1", "layer2.2.conv2",
                      "layer3.0.conv2", "layer3.2.conv2"])  # every map size, first and last
    ref = pcace.rank(model, images, **kw)
    request.getfixturevalue("two_pass_routes")  # from here on, every layer in two passes
    got = pcace.rank(model, images, **kw)
    assert {r["route"] for r in got.manifest["routes"].values()} == {"moments"}
    assert all(r["passes"] == 2 for r in got.manifest["routes"].values())
    assert got.manifest["data"]["n_images"] == 150
    a = ref.channels.set_index(["layer", "channel"])
    b = got.channels.set_index(["layer", "channel"]).loc[a.index]
    assert list(got.channels.layer.unique()) == list(ref.channels.layer.unique())
    np.testing.assert_allclose(b.pcace, a.pcace, atol=1e-6, rtol=0)
    np.testing.assert_allclose(b.explained_variance, a.explained_variance, atol=1e-9)
    assert (b.n_components == a.n_components).all()


def test_route_chosen_by_budget_on_resnet20(cifar):
    """A budget too small for the maps: the 8 x 8 layers (P = 64 <= N / 2) are streamed,
    the others stay in the store (spilled); values agree with the in-memory run."""
    model, images = cifar
    kw = dict(target=3, progress=False, device="cpu", pca_dtype=torch.float64, batch_size=50,
              layers=["layer2.2.conv2", "layer3.0.conv1", "layer3.2.conv2"])
    ref = pcace.rank(model, images, **kw)
    assert {r["route"] for r in ref.manifest["routes"].values()} == {"in-memory"}
    got = pcace.rank(model, images, memory_budget=12 * 2**20, **kw)
    routes = got.manifest["routes"]
    assert routes["layer3.0.conv1"]["route"] == "moments"
    assert routes["layer3.2.conv2"]["route"] == "moments"
    assert routes["layer2.2.conv2"]["route"] in ("in-memory", "spilled")
    assert "P = 256 > N / 2" in routes["layer2.2.conv2"]["reason"]
    assert routes["layer3.0.conv1"]["stats_bytes"] >= 8 * 64 * 64**2
    np.testing.assert_allclose(got.channels.pcace, ref.channels.pcace, atol=1e-6, rtol=0)


def test_route_rule():
    plan = MemoryPlan(2**30)
    small = plan.routes({"a": (16, 32, 32), "b": (64, 8, 8)}, 1_000)
    assert {r.route for r in small.values()} == {"in-memory"}
    big = plan.routes({"a": (16, 32, 32), "b": (64, 8, 8)}, 100_000)
    assert big["a"].route == big["b"].route == "moments"
    assert big["a"].stats_bytes >= 4 * 16 * 1024 * 1025  # packed float64 triangles
    huge = plan.routes({"a": (64, 112, 112)}, 100_000)  # P x P moments: 80 GB
    assert huge["a"].route == "in-memory" and "work share" in huge["a"].reason


def test_route_rule_subspace():
    """Exact routes that cannot fit the work share go to the subspace iteration."""
    plan = MemoryPlan(4 * 2**30)
    big = plan.routes({"a": (64, 112, 112)}, 50_000)["a"]  # P x P: 80 GB; 2P <= N
    assert big.route == "subspace" and "subspace iteration" in big.reason
    assert big.stats_bytes < plan.work_bytes
    few = plan.routes({"a": (64, 112, 112)}, 20_000)["a"]  # 2P > N, but N x N per channel
    assert few.route == "subspace" and "one channel's reduce" in few.reason
    small = plan.routes({"a": (64, 112, 112)}, 2_000)["a"]  # maps fit as N x N Gram work
    assert small.route == "in-memory"
    grouped = MemoryPlan(2**30).routes({"a": (128, 28, 28)}, 50_000)["a"]  # 629 MB > 256 MiB
    assert grouped.route == "moments" and grouped.groups == 3 and grouped.passes == 4
    assert grouped.stats_bytes < 4 * 128 * 784 * 785  # a group's moments, not the layer's
    assert "3 groups of 43 channels" in grouped.reason


_RESNET20 = {f"s{stage}.{i}": shape for stage, shape in
             enumerate([(16, 32, 32), (32, 16, 16), (64, 8, 8)]) for i in range(6)} | \
    {"conv1": (16, 32, 32)}
_RESNET18_224 = {"conv1": (64, 112, 112)} | \
    {f"l1.{i}": (64, 56, 56) for i in range(4)} | {f"l2.{i}": (128, 28, 28) for i in range(5)} | \
    {f"l3.{i}": (256, 14, 14) for i in range(5)} | {f"l4.{i}": (512, 7, 7) for i in range(5)}


def test_auto_budget_is_flat_in_n_where_layers_stream(monkeypatch):
    """``"auto"`` plans in 1 GiB and widens to a quarter of the machine only where 1 GiB
    would spill maps or take extra passes: ResNet-20's layers over 5,000 or 50,000 images
    all stream within 1 GiB (the same plan at both N), over 500 they are all kept; ResNet-18's
    224 px maps over 300 images cannot stream (P > N / 2) and would spill, so that run widens
    and keeps them all in memory; moments that would need channel groups widen too."""
    import pcace.reduce.plan as plan_module

    monkeypatch.setattr(plan_module, "default_memory_budget", lambda: 6 * 2**30)
    auto = MemoryPlan.from_budget("auto")
    assert (auto.budget, auto.ceiling) == (2**30, 6 * 2**30)
    for n in (5_000, 50_000):
        used, routes = auto.plan_routes(_RESNET20, n)
        assert used.budget == 2**30
        assert {r.route for r in routes.values()} == {"moments"}
        assert {r.groups for r in routes.values()} == {1}
    used, routes = auto.plan_routes(_RESNET20, 500)
    assert used.budget == 2**30 and {r.route for r in routes.values()} == {"in-memory"}
    assert sum(r.stats_bytes for r in routes.values()) <= used.store_bytes
    used, routes = auto.plan_routes(_RESNET18_224, 300)
    assert used.budget == 6 * 2**30 and {r.route for r in routes.values()} == {"in-memory"}
    assert not MemoryPlan(2**30).fits(MemoryPlan(2**30).routes(_RESNET18_224, 300))
    used, routes = auto.plan_routes({"a": (128, 28, 28)}, 50_000)  # 3 groups in 1 GiB
    assert used.budget == 6 * 2**30 and routes["a"].route == "moments"
    assert routes["a"].groups == 1
    # a number is a fixed budget; a machine smaller than the preferred budget has no ceiling
    fixed = MemoryPlan.from_budget(2**30)
    assert fixed.ceiling == 0 and fixed.plan_routes(_RESNET18_224, 300)[0] is fixed
    monkeypatch.setattr(plan_module, "default_memory_budget", lambda: 2**29)
    assert MemoryPlan.from_budget("auto") == MemoryPlan(2**29)


@pytest.mark.parametrize("layers", [["2"], ["0", "2"]])
def test_auto_budget_in_rank(monkeypatch, layers):
    """In ``rank``: with the preferred budget shrunk to 16 MiB, layer "2" alone (P = 256,
    N = 2,100) streams within it; with layer "0" too (P = 1,024, whose moments do not fit
    16 MiB's work share and whose maps would spill) the run widens to the machine's share
    and keeps both in memory. The manifest says which budget ran and why; the values
    equal a run with a fixed large budget."""
    import pcace.reduce.plan as plan_module

    monkeypatch.setattr(plan_module, "PREFERRED_BUDGET", 16 * 2**20)
    monkeypatch.setattr(plan_module, "default_memory_budget", lambda: 512 * 2**20)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = _low_rank_images(2100)
    kw = dict(target=0, progress=False, device="cpu", pca_dtype=torch.float64, batch_size=64,
              layers=layers, basis="exact")  # the exact routes (the default samples a basis)
    got = pcace.rank(net, x, **kw)
    ref = pcace.rank(net, x, memory_budget=512 * 2**20, **kw)
    routes, m = got.manifest["routes"], got.manifest
    if layers == ["2"]:
        assert routes["2"]["route"] == "moments"
        assert m["memory_budget"] == 16 * 2**20 and "every layer ran within" in \
            m["memory_budget_reason"]
    else:
        assert {r["route"] for r in routes.values()} == {"in-memory"}
        assert m["memory_budget"] == 512 * 2**20 and "widened" in m["memory_budget_reason"]
        assert not m["spilled_layers"]
    assert ref.manifest["memory_budget_reason"] == "memory_budget as given"
    np.testing.assert_allclose(got.channels.pcace, ref.channels.pcace, atol=1e-6, rtol=0)


def _low_rank_images(n: int, seed: int = 0) -> torch.Tensor:
    """Five spatial patterns with decreasing weights and a little noise: maps whose top
    components are well separated (the subspace iteration converges in a few passes)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(5, 3, 32, 32, generator=g)
    weights = torch.randn(n, 5, generator=g) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25])
    return torch.einsum("nk,kchw->nchw", weights, patterns) + \
        0.05 * torch.randn(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("budget", [30, 40])
def test_layers_too_big_for_one_basis_in_rank_equal_in_memory(budget):
    """Budgets whose work share cannot hold the first layer's P x P moments at once: with
    40 MB one channel's fit, so its moments are gathered in channel groups, a pass each;
    with 30 MB not even one channel's (nor its maps' reduce), so it is reduced by subspace
    iteration over re-run forward passes. The second layer takes moments in one group.
    The values equal the in-memory run's (float64 on both sides); the manifest says how
    many passes each took and, for the iteration, that every channel converged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = _low_rank_images(2100)  # N >= 2 P for P = 1024; 66 batches, the last short
    kw = dict(target=0, progress=False, device="cpu", pca_dtype=torch.float64, batch_size=32,
              layers=["0", "2"], basis="exact")
    ref = pcace.rank(net, x, **kw)
    got = pcace.rank(net, x, memory_budget=budget * 2**20, **kw)
    routes = got.manifest["routes"]
    assert routes["2"]["route"] == "moments" and "channel_groups" not in routes["2"]
    if budget == 30:
        assert routes["0"]["route"] == "subspace"
        assert 3 <= routes["0"]["passes"] < 50 and routes["0"]["unconverged_channels"] == 0
        assert routes["0"]["largest_angle"] <= 1e-9
    else:
        assert routes["0"]["route"] == "moments" and routes["0"]["channel_groups"] == 4
        assert routes["0"]["passes"] == 5
    np.testing.assert_allclose(got.channels.pcace, ref.channels.pcace, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.channels.explained_variance,
                               ref.channels.explained_variance, atol=1e-9)


def test_channel_groups_and_subspace_share_passes():
    """One TwoPass with a layer in two channel groups and a subspace layer: the group's
    pass is also an iteration pass (no pass runs for one alone while the other needs one),
    and each equals its one-pass counterpart."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = _low_rank_images(400)  # 7 batches of 64
    shapes = {"0": (4, 32, 32), "2": (4, 32, 32)}
    tp = TwoPass(shapes, 3, pca_dtype=torch.float64, subspace=["2"], groups={"0": 2})
    with capture(net, tp.watch(x.split(64)), [], lambda out: out.flatten(1)[:, 0],
                 progress=False, observers=tp.hooks()):
        calls = []
        handle = net[0].register_forward_pre_hook(lambda *_: calls.append(1))
        done = tp.second_pass(net, x.split(64), progress=False)
        handle.remove()
    one = TwoPass(shapes, 3, pca_dtype=torch.float64)
    with capture(net, one.watch(x.split(64)), [], lambda out: out.flatten(1)[:, 0],
                 progress=False, observers=one.hooks()):
        ref = one.second_pass(net, x.split(64), progress=False)
    # after the first pass: the iteration's passes (the second group in the first of
    # them), then the projection
    assert len(calls) == 7 * done["2"].basis.passes
    assert done["0"].basis.passes == 1
    for name in shapes:
        np.testing.assert_allclose(done[name].reduction.scores.numpy(),
                                   ref[name].reduction.scores.numpy(), atol=1e-7)


def test_subspace_passes_must_see_the_same_images():
    """The iteration's extra passes are checked like the projection pass."""
    torch.manual_seed(0)
    net, x = _net(), torch.rand(60, 1, 8, 8)
    tp = TwoPass({"0": (4, 6, 6)}, 2, subspace=["0"])
    batches = _Shrinking(x)
    with capture(net, tp.watch(batches), [], lambda out: out[:, 0], progress=False,
                 observers=tp.hooks()), pytest.raises(ValueError, match="same images"):
        tp.second_pass(net, batches, progress=False)


def test_subspace_non_convergence_is_reported():
    """Noise maps (a flat spectrum) cannot converge in the allowed passes: a warning names
    the layer and the route record counts the channels."""
    torch.manual_seed(0)
    net, x = _net(), torch.rand(80, 1, 8, 8)
    tp = TwoPass({"0": (4, 6, 6)}, 2, subspace=["0"])
    for sub in tp._sub.values():
        sub.max_passes = 3
    with capture(net, tp.watch(x.split(16)), [], lambda out: out[:, 0], progress=False,
                 observers=tp.hooks()), pytest.warns(UserWarning, match="did not converge"):
        done = tp.second_pass(net, x.split(16), progress=False)
    assert done["0"].basis.passes == 3 and not bool(done["0"].basis.converged.all())


class _Images(Dataset):
    """Dataset whose second pass (after ``len(first)`` items were drawn) has one image less,
    or other pixels."""

    def __init__(self, x: torch.Tensor, mode: str):
        self.x, self.mode, self.calls = x, mode, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.calls += 1
        if self.calls > len(self.x) and self.mode == "noise":
            return self.x[i] + 0.1
        return self.x[i]


class _Shrinking:
    """Batches that yield one image fewer on every new iteration."""

    def __init__(self, x: torch.Tensor):
        self.x, self.passes = x, 0

    def __iter__(self):
        x = self.x[: len(self.x) - self.passes]
        self.passes += 1
        return iter(x.split(16))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                         nn.Linear(4 * 16, 1))


def test_second_pass_with_other_count_is_refused():
    torch.manual_seed(0)
    net, x = _net(), torch.rand(60, 1, 8, 8)
    tp = TwoPass({"0": (4, 6, 6)}, 2)
    batches = _Shrinking(x)
    with capture(net, tp.watch(batches), [], lambda out: out[:, 0], progress=False,
                 observers=tp.hooks()), pytest.raises(ValueError, match="same images"):
        tp.second_pass(net, batches, progress=False)


def test_second_pass_with_other_images_is_refused(two_pass_routes):
    torch.manual_seed(0)
    net, x = _net(), torch.rand(60, 1, 8, 8)
    loader = DataLoader(_Images(x, "noise"), batch_size=16)
    with pytest.raises(ValueError, match="same images in the same order"):
        pcace.rank(net, loader, target="output:0", progress=False, device="cpu")
    shuffled = DataLoader(_Images(x, "same"), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        pcace.rank(net, shuffled, target="output:0", progress=False, device="cpu")
    ok = pcace.rank(net, DataLoader(_Images(x, "same"), batch_size=16), target="output:0",
                    progress=False, device="cpu")
    assert ok.manifest["routes"]["0"]["route"] == "moments"


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from pcace.capture.capture import capture
    from pcace.reduce.twopass import TwoPass

    n = int(sys.argv[1])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 256, 1))

    def batches():  # generated on the fly: the input never exists whole
        g = torch.Generator().manual_seed(1)
        for _ in range(n // 250):
            yield torch.rand(250, 1, 16, 16, generator=g)

    tp = TwoPass({"0": (8, 16, 16)}, 3)
    with capture(net, tp.watch(batches()), [], lambda out: out[:, 0], progress=False,
                 observers=tp.hooks()):
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = tp.second_pass(net, batches(), progress=False)
    red = done["0"].reduction
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "first_pass_peak_kib": before, "n": int(red.scores.shape[1])}))
""")


def _probe(n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_of_first_pass_does_not_grow_with_n():
    """20,000 vs 200,000 images of 8 maps of 16 x 16: storing them would take 164 MB vs
    1.6 GB; the first pass's peak must stay put (the second holds the N x k scores, 8 x 3
    float64 per image: 48 MB at 200,000)."""
    small, large = _probe(20_000), _probe(200_000)
    assert small["n"] == 20_000 and large["n"] == 200_000
    grown_mib = (large["first_pass_peak_kib"] - small["first_pass_peak_kib"]) / 1024
    assert grown_mib < 60, (small, large)
    total_mib = (large["peak_kib"] - small["peak_kib"]) / 1024
    assert total_mib < 250, (small, large)


class _InProcessWorkers(pcace.engines.engine.LocalEngine):
    """An engine whose 'workers' are objects in this process: the sharded route of rank."""

    def __init__(self):
        super().__init__(name="in-process-workers")
        self.shards = []

    def slots(self):
        return 2

    def map_shards(self, cls, args, kwargs, method, bounds, extra=(), on_shard=None):
        import copy
        import pickle

        self.shards.append((method, list(bounds)))
        worker = cls(*pickle.loads(pickle.dumps(copy.deepcopy(args))), **kwargs)
        out = []
        for lo, hi in bounds:
            out.append(getattr(worker, method)(lo, hi, *extra))
            if on_shard is not None:
                on_shard(lo, hi)
        return out


@pytest.mark.parametrize("mixed", [False, "in-memory", "subspace"])
def test_streamed_layers_on_workers_equal_the_one_process_passes(cifar, monkeypatch, mixed):
    """float32 products (the default): the workers' shards add up to the one-process pass's
    runs, so values agree to 1e-9 (not merely to float32 noise); several targets; with
    ``mixed`` one layer stays in the driver (its store, or its own subspace passes) and the
    scores of both passes agree."""
    model, images = cifar
    layers = ["conv1", "layer2.0.conv1", "layer3.2.conv2"]
    kw = dict(target=[3, 5], progress=False, device="cpu", batch_size=64, layers=layers,
              permutations=5, split_half=0)

    def routes(self, shapes, n, run_images=256, **_):
        return {k: LayerRoute(mixed if mixed and k == "conv1" else "moments", "test",
                              0, 2, tuple(s)) for k, s in shapes.items()}

    monkeypatch.setattr(MemoryPlan, "routes", routes)
    one = pcace.rank(model, images, **kw)
    workers = _InProcessWorkers()
    shards = pcace.rank(model, images, engine=workers, **kw)
    assert [m for m, _ in workers.shards] == ["shifts", "moments", "project"]
    assert workers.shards[1][1] == [(0, 150)]  # one shard of 1,024 images (aligned)
    a = one.channels.set_index(["target", "layer", "channel"])
    b = shards.channels.set_index(["target", "layer", "channel"]).loc[a.index]
    np.testing.assert_allclose(b.pcace, a.pcace, atol=1e-9, rtol=0)
    np.testing.assert_allclose(b.p_value, a.p_value, atol=0)
    np.testing.assert_allclose(shards.scores, one.scores, atol=0)
    assert {r["route"] for r in shards.manifest["routes"].values()} == \
        ({mixed, "moments"} if mixed else {"moments"})
    where = {k: r.get("passes_on") for k, r in shards.manifest["routes"].items()}
    assert where["layer3.2.conv2"] == "in-process-workers workers"
    if mixed == "subspace":
        assert where["conv1"] == "this process"
        assert shards.manifest["routes"]["conv1"]["passes"] > 2


def test_sharded_float32_sums_match_the_one_process_pass_across_shards(cifar):
    """Shards of 256 images (run-aligned) and a last short one: float32 products, the
    same reference shift: the bases equal the one-process TwoPass's to 1e-9."""
    from pcace.engines.shards import sharded_components

    model, images = cifar
    images = torch.cat([images, images.flip(3)])[:300]
    layers = ["layer1.0.conv1", "layer3.0.conv2"]
    reds, _ = sharded_components(model, images, layers, 3, 3, shard_size=256, batch_size=64,
                                 pca_dtype=torch.float32)
    shapes = {"layer1.0.conv1": (16, 32, 32), "layer3.0.conv2": (64, 8, 8)}
    tp = TwoPass(shapes, 3, pca_dtype=torch.float32)
    with capture(model, tp.watch(images.split(64)), [], lambda out: out[:, 3], progress=False,
                 observers=tp.hooks()):
        done = tp.second_pass(model, images.split(64), progress=False)
    for name in layers:
        np.testing.assert_allclose(reds[name].scores.numpy(),
                                   done[name].reduction.scores.numpy(), atol=1e-9, rtol=0)


def test_interrupt_in_the_further_passes_keeps_the_layers_in_memory(cifar, monkeypatch,
                                                                   tmp_path):
    """The layers held in memory are scored (and checkpointed) before the streamed layers'
    further passes: a Ctrl-C in those passes returns them, and a resume runs only the
    streamed layer, ending equal to an uninterrupted run."""
    model, images = cifar
    kw = dict(target=3, progress=False, device="cpu", pca_dtype=torch.float64, batch_size=64,
              layers=["layer1.0.conv1", "layer3.0.conv1"], permutations=0, split_half=0)

    def routes(self, shapes, n, run_images=256, **_):
        return {k: LayerRoute("moments" if k == "layer1.0.conv1" else "in-memory", "test",
                              0, 2, tuple(s)) for k, s in shapes.items()}

    monkeypatch.setattr(MemoryPlan, "routes", routes)
    whole = pcace.rank(model, images, **kw)
    original = Passes.more

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Passes, "more", stopped)  # the further passes of the run
    with pytest.warns(UserWarning, match="interrupted"):
        first = pcace.rank(model, images, checkpoint_dir=tmp_path, **kw)
    assert not first.complete and set(first.channels.layer) == {"layer3.0.conv1"}
    monkeypatch.setattr(Passes, "more", original)
    again = pcace.rank(model, images, checkpoint_dir=tmp_path, resume=True, **kw)
    assert again.complete
    assert again.manifest["routes"].keys() == {"layer1.0.conv1"}  # only it ran again
    a = whole.channels.set_index(["layer", "channel"])
    b = again.channels.set_index(["layer", "channel"]).loc[a.index]
    np.testing.assert_allclose(b.pcace, a.pcace, atol=1e-12, rtol=0)


class _SideNan(nn.Module):
    """A conv net with a side module whose channel 5 is NaN (the score stays finite)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Identity()
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        y = self.conv(x)
        bad = y.clone()
        bad[:, 5] = float("nan")
        return self.head(y.mean((2, 3))) + 0 * self.side(bad).nan_to_num().sum()


@pytest.mark.parametrize("budget", [60, 30])  # moments in channel groups; subspace
def test_nan_in_a_streamed_layer_names_the_layer_and_channel(budget):
    """NaN in channel 5 (in the second or later channel group): the error names the layer
    and the channel as numbered in the layer, not in its group."""
    torch.manual_seed(0)
    x = torch.randn(2100, 3, 32, 32)
    with pytest.raises(ValueError,
                       match=r"layer 'side' produced NaN or inf in channel\(s\) \[5\]"):
        pcace.rank(_SideNan(), x, target="output:0", layers=["side"], progress=False,
                   batch_size=32, memory_budget=budget * 2**20, basis="exact")


def test_nan_in_a_layer_streamed_on_workers_names_the_layer(monkeypatch):
    """The workers' shards name the layer and channel too (their error travels back)."""
    def routes(self, shapes, n, run_images=256, **_):
        return {k: LayerRoute("moments", "test", 0, 2, tuple(s)) for k, s in shapes.items()}

    monkeypatch.setattr(MemoryPlan, "routes", routes)
    x = torch.randn(300, 3, 16, 16)
    with pytest.raises(ValueError,
                       match=r"layer 'side' produced NaN or inf in channel\(s\) \[5\]"):
        pcace.rank(_SideNan(), x, target="output:0", layers=["side"], progress=False,
                   batch_size=32, engine=_InProcessWorkers())
