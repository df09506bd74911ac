"""The CPU kernels' cache of packed weights (csrc/cpu/pack_cache.h; docs/cpu.md, "Packed weights
kept across calls"): a call with unchanged weights reuses the packs of an earlier one, and never
a stale pack. Each test compares against a fresh module (or nn.LSTM) holding the weights as they
are at the call, after the changes a program makes between calls: an optimizer step,
load_state_dict, in-place edits, writes through .data, weight_drop's masks, a weight shared by
two modules. Also the bound, the release with the module and concurrent calls.

Reads the cache through fused_lstm._C.pack_cache_stats / pack_cache_clear /
pack_cache_set_capacity (csrc/python/module.cpp)."""

import gc
import threading

import pytest
import torch
from torch import nn

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, native_backends

pytestmark = pytest.mark.skipif("cpu" not in native_backends(), reason="needs the CPU kernels")

# Large enough that every pack is above the cache's lower bound (tuning kPackCacheMinBytes).
I, H = 16, 64


def stats():
    return fused_lstm._C.pack_cache_stats()


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts from an empty cache at the default capacity, and leaves it so."""
    fused_lstm._C.pack_cache_clear()
    capacity = stats()["capacity"]
    yield
    fused_lstm._C.pack_cache_set_capacity(capacity)
    fused_lstm._C.pack_cache_clear()


def twin(module):
    """A fresh module with module's weights as they are now: its packs cannot be cached yet."""
    fresh = FusedLSTM(
        module.input_size,
        module.hidden_size,
        proj_size=module.proj_size,
        num_layers=module.num_layers,
        bidirectional=module.bidirectional,
        dtype=module.weight_hh_l0.dtype,
    )
    fresh.load_state_dict(module.state_dict())
    return fresh


def state(module, x):
    """A nonzero initial state, the same for every module of these sizes: with zeros, a call of
    one step would not read W_hh at all."""
    n = module.num_layers * (2 if module.bidirectional else 1)
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, x.size(1), module.proj_size or module.hidden_size, generator=g)
    c0 = torch.randn(n, x.size(1), module.hidden_size, generator=g)
    return h0.to(x.dtype), c0.to(x.dtype)


def run(module, x):
    with torch.no_grad():
        out, (h, c) = module(x, state(module, x))
    return out, h, c


def assert_equal(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


SHAPES = [(1, 1), (1, 16), (5, 1), (5, 16)]  # (T, B): one-step calls, sequences; B = 1 and more


@pytest.mark.parametrize("T,B", SHAPES)
@pytest.mark.parametrize("proj", [0, 24])
def test_repeated_calls_hit_and_stay_bitwise_equal(T, B, proj):
    m = FusedLSTM(I, H, proj_size=proj, num_layers=2)
    x = torch.randn(T, B, I)
    first = run(m, x)
    for _ in range(3):
        assert_equal(run(m, x), first)
    s = stats()
    if T > 1 or B > 1:  # a one-step call of one row reads W in place: nothing to cache
        assert s["packs"] >= 2 and s["hits"] >= 2  # W_hh of both layers (and W_hr) reused
    else:
        assert s["packs"] == 0
    ref = nn.LSTM(I, H, proj_size=proj, num_layers=2)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        out, _ = ref(x, state(m, x))
    torch.testing.assert_close(first[0], out)


@pytest.mark.parametrize("T,B", SHAPES)
def test_float64_parity_with_cached_packs(T, B):
    ref = nn.LSTM(I, H, dtype=torch.float64)
    m = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for _ in range(3):
        out, _, _ = run(m, x)
    assert stats()["hits"] >= (1 if T > 1 or B > 1 else 0)
    with torch.no_grad():
        want, _ = ref(x, state(m, x))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
        lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    ],
    ids=["sgd", "adam", "adam-foreach", "adamw-fused"],
)
@pytest.mark.parametrize("T,B", [(1, 1), (5, 16)])
def test_optimizer_step_between_calls(make_opt, T, B):
    m = FusedLSTM(I, H)
    opt = make_opt(m.parameters())
    x = torch.randn(T, B, I)
    for _ in range(3):
        run(m, x)
        run(m, x)  # the second sighting stores the pack
        out, _ = m(x, state(m, x))
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert_equal(run(m, x), run(twin(m), x))


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict(assign):
    m, other = FusedLSTM(I, H), FusedLSTM(I, H)
    x = torch.randn(1, 4, I)
    for _ in range(3):
        run(m, x)
    m.load_state_dict(other.state_dict(), assign=assign)
    assert_equal(run(m, x), run(other, x))


@pytest.mark.parametrize(
    "edit",
    [
        lambda w: w.mul_(2),
        lambda w: w[0, 0].add_(1),
        lambda w: w.copy_(torch.randn_like(w)),
    ],
    ids=["mul", "one-element", "copy"],
)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 16), (5, 16)])
def test_in_place_edit(edit, T, B):
    m = FusedLSTM(I, H)
    x = torch.randn(T, B, I)
    for _ in range(3):
        run(m, x)
    with torch.no_grad():
        edit(m.weight_hh_l0)
    assert_equal(run(m, x), run(twin(m), x))


def test_writes_through_data():
    """A Polyak update of a target network through .data bypasses the version counter; the
    checksum compared on each hit sees it. So does a replaced .data."""
    target, online = FusedLSTM(I, H), FusedLSTM(I, H)
    x = torch.randn(1, 1, I)
    for _ in range(3):
        run(target, x)
    for tp, op in zip(target.parameters(), online.parameters()):
        tp.data.mul_(0.9).add_(op.data, alpha=0.1)
    assert_equal(run(target, x), run(twin(target), x))
    for _ in range(2):
        run(target, x)
    target.weight_hh_l0.data = torch.randn(4 * H, H)
    assert_equal(run(target, x), run(twin(target), x))


def test_one_element_written_through_data():
    """gradcheck perturbs one element at a time through .data, which bumps no version counter
    the weight shares: the checksum of the weight's bytes sees each change."""
    m = FusedLSTM(I, H)
    x = torch.randn(5, 4, I)
    for _ in range(3):
        run(m, x)
    for k in (0, 17, 4 * H * H - 1):
        m.weight_hh_l0.data.view(-1)[k] += 1e-3
        assert_equal(run(m, x), run(twin(m), x))
        assert_equal(run(m, x), run(twin(m), x))  # and from the pack stored again


def test_gradcheck_with_cached_packs():
    H16, dt = 16, {"dtype": torch.float64, "requires_grad": True}
    w = [torch.randn(4 * H16, 3, **dt) * 0.5, torch.randn(4 * H16, H16, **dt) * 0.5]
    x = torch.randn(3, 2, 3, **dt)
    h0, c0 = torch.randn(1, 2, H16, **dt), torch.randn(1, 2, H16, **dt)

    def f(x, h0, c0, *w):
        return torch.ops.fused_lstm.lstm(x, None, h0, c0, w, False, False, 1, 0.0, True, False)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *w))
    assert stats()["hits"] > 0


def test_weight_drop_stores_no_packs():
    """weight_drop gives the kernels a new w_hh at every call: seen once, never stored."""
    m = FusedLSTM(I, H, weight_drop=0.3).train()
    x = torch.randn(5, 4, I)
    for _ in range(5):
        out, _ = m(x)
        out.sum().backward()
    s = stats()
    assert s["packs"] == 0 and s["bytes"] == 0
    assert s["entries"] <= 2  # the last call's sightings, until their tensors are swept
    m.eval()
    for _ in range(3):
        run(m, x)
    assert_equal(run(m, x), run(twin(m), x))
    assert stats()["hits"] >= 1


def test_weight_shared_by_two_modules():
    a, b = FusedLSTM(I, H), FusedLSTM(I, H)
    b.weight_hh_l0 = a.weight_hh_l0
    x = torch.randn(1, 4, I)
    for _ in range(3):
        run(a, x)
        run(b, x)
    assert stats()["packs"] == 1  # one pack, read by both
    with torch.no_grad():
        a.weight_hh_l0.mul_(-1)
    assert_equal(run(b, x), run(twin(b), x))
    assert_equal(run(a, x), run(twin(a), x))


def test_released_with_the_module():
    m = FusedLSTM(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(1, 4, I)
    for _ in range(3):
        run(m, x)
    assert stats()["packs"] == 4 and stats()["bytes"] > 0
    del m
    gc.collect()
    s = stats()
    assert s["entries"] == 0 and s["bytes"] == 0


def test_bounded():
    one = 4 * H * H * 4  # a W_hh^T pack of H in float32, here a multiple of the panel width
    fused_lstm._C.pack_cache_set_capacity(2 * one)
    mods = [FusedLSTM(I, H) for _ in range(4)]
    x = torch.randn(1, 4, I)
    for m in mods:
        for _ in range(3):
            run(m, x)
    s = stats()
    assert s["bytes"] <= 2 * one and s["evictions"] >= 2
    for m in mods:
        assert_equal(run(m, x), run(twin(m), x))
    fused_lstm._C.pack_cache_set_capacity(0)  # off: nothing held
    assert stats()["bytes"] == 0


def test_cell_steps_reuse_the_pack():
    cell = FusedLSTMCell(I, H)
    ref = nn.LSTMCell(I, H)
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(6, 3, I)
    h, c = torch.randn(3, H), torch.randn(3, H)
    hr, cr = h, c
    with torch.no_grad():
        for t in range(6):
            h, c = cell(x[t], (h, c))
            hr, cr = ref(x[t], (hr, cr))
    torch.testing.assert_close(h, hr)
    assert stats()["hits"] >= 3


def test_bfloat16_weights_keep_their_float_copies():
    m = FusedLSTM(I, H, dtype=torch.bfloat16)
    x = torch.randn(2, 4, I, dtype=torch.bfloat16)
    first = run(m, x)
    for _ in range(2):
        assert_equal(run(m, x), first)
    assert stats()["hits"] >= 2
    with torch.no_grad():
        m.weight_ih_l0.mul_(2)
        m.weight_hh_l0.mul_(2)
    assert_equal(run(m, x), run(twin(m), x))


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        m = FusedLSTM(I, H)
        x = torch.randn(1, 4, I)
        for _ in range(3):
            m(x)
    assert stats()["entries"] == 0


def test_concurrent_calls():
    mods = [FusedLSTM(I, H) for _ in range(3)]
    xs = [torch.randn(3, 4, I) for _ in range(3)]
    want = [run(twin(m), x) for m, x in zip(mods, xs)]
    errors = []

    def work(k):
        try:
            for i in range(30):
                j = (k + i) % 3
                assert_equal(run(mods[j], xs[j]), want[j])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert stats()["hits"] > 0


def test_training_holds_no_pack_when_every_call_steps():
    """Each call sees new weights (a step between calls): nothing is stored, so training holds
    no more memory than before the cache."""
    m = FusedLSTM(I, H)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(5, 4, I)
    for _ in range(4):
        out, _ = m(x)
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert stats()["packs"] == 0
