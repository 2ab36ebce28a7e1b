"""Tests of pcace._memory: the heap kept during a run, and the store's own mappings."""

import gc
import resource
import sys

import pytest
import torch

from pcace import _memory
from pcace._memory import kept_heap, mapped_empty

glibc = pytest.mark.skipif(_memory._glibc() is None,
                           reason="malloc is tuned on glibc (Linux) only")
BLOCK = 64 * 2**20  # above glibc's largest automatic mmap threshold (32 MiB)


class FakeLibc:
    """Records mallopt/malloc_trim calls; refuses mmap thresholds above ``cap``."""

    def __init__(self, cap=2**31):
        self.calls = []
        self.cap = cap

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return int(param != _memory._M_MMAP_THRESHOLD or value <= self.cap)

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def _faults_of_cycles(cycles):
    """Minor page faults of allocating, filling and freeing a BLOCK-sized tensor.

    A torch tensor, not a NumPy array: NumPy asks for huge pages on large arrays, which
    hides the per-page cost this measures.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        a = torch.ones(BLOCK // 4)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_nested_scopes_tune_once_and_restore_once(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(_memory, "_glibc", lambda: fake)
    with kept_heap() as outer:
        with kept_heap() as inner:
            assert outer and inner
        assert fake.calls == [("mallopt", _memory._M_MMAP_THRESHOLD, 128 * 2**20),
                              ("mallopt", _memory._M_TRIM_THRESHOLD, 2**31 - 1)]
    assert fake.calls[2:] == [("mallopt", _memory._M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", _memory._M_TRIM_THRESHOLD, 64 * 2**20),
                              ("malloc_trim", 0)]


def test_restores_after_an_error(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(_memory, "_glibc", lambda: fake)
    with pytest.raises(RuntimeError), kept_heap():
        raise RuntimeError("boom")
    assert fake.calls[-1] == ("malloc_trim", 0)
    assert _memory._depth == 0


def test_an_older_glibc_gets_its_largest_threshold(monkeypatch):
    fake = FakeLibc(cap=32 * 2**20)  # older glibc refuses more than HEAP_MAX_SIZE / 2
    monkeypatch.setattr(_memory, "_glibc", lambda: fake)
    with kept_heap():
        pass
    assert fake.calls[:2] == [("mallopt", _memory._M_MMAP_THRESHOLD, 128 * 2**20),
                              ("mallopt", _memory._M_MMAP_THRESHOLD, 32 * 2**20)]


@pytest.mark.parametrize("env", [{"PCACE_TUNE_MALLOC": "0"}, {"PCACE_TUNE_MALLOC": "off"},
                                 {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_left_alone_when_turned_off_or_set_by_the_user(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _memory._glibc() is None
    with kept_heap() as tuned:
        assert not tuned


@glibc
def test_freed_blocks_are_reused_inside_and_returned_after():
    pages = BLOCK // resource.getpagesize()
    _faults_of_cycles(1)
    default = _faults_of_cycles(4)
    assert default > 3 * pages  # each cycle maps the block afresh
    gc.collect()
    rss_before = _rss()
    with kept_heap() as tuned:
        assert tuned
        _faults_of_cycles(2)  # maps the block (in a long-lived heap: maybe two places)
        kept = _faults_of_cycles(4)
        assert _rss() > rss_before + BLOCK // 2  # the freed block is still held
    assert kept < pages // 2  # then reused, already mapped
    assert _rss() < rss_before + BLOCK // 4  # and handed back at the end


def test_mapped_empty_is_a_normal_writable_tensor():
    t = mapped_empty((3, 4, 5), torch.float64)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float64 and t.is_contiguous()
    t.copy_(torch.arange(60.0).reshape(3, 4, 5))
    assert t[2, 3, 4].item() == 59.0
    assert not t.is_inference()
    assert mapped_empty((0, 4)).shape == (0, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_mapped_empty_memory_goes_back_when_freed():
    gc.collect()
    before = _rss()
    t = mapped_empty((BLOCK // 4,))
    t.fill_(1.0)
    view = t[10:]
    assert _rss() > before + BLOCK // 2
    del t
    assert view[0].item() == 1.0  # a view keeps the mapping alive
    del view
    gc.collect()
    assert _rss() < before + BLOCK // 4
