"""Recurrent dropout, zoneout, weight drop and per-step reset, on every backend: the reference,
the CPU kernels, the CUDA kernels under the CUDA emulator (and on a GPU, skipped without one).

The oracles are independent of the code under test:
* the layer ops against torch.autograd through the reference's forward (which is plain PyTorch
  ops), so the handwritten backwards of every backend are checked against autograd;
* FusedLSTM against a hand-written step loop, differentiated by autograd, that applies the
  masks the op drew (read from its layer_forward calls) as docs/regularisers.md's formulas say;
* resets against nn.LSTM run on each segment on its own;
* gradcheck of the whole op, with the masks redrawn from the same seed at every call.
"""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_lstm import FusedLSTM, _redirect, reference
from helpers import needs_extension, ramp


I, H, P = 3, 5, 2
F64 = torch.float64


# ---- the layer ops: forward and handwritten backward against autograd ----------------------

EXTRAS = ["recurrent", "zoneout_cell", "zoneout_hidden", "zoneout_rates", "reset", "all"]


def layer_case(extras, proj, packed, reverse, device, dtype=F64, batch=3):
    Hr = P if proj else H
    dt = {"dtype": dtype, "device": device}
    if packed:
        batch_sizes = torch.tensor([batch, batch, 2, 2, 1]) if batch == 3 else torch.tensor([1] * 5)
        lead = (int(batch_sizes.sum()),)
    else:
        batch_sizes, lead = None, (5, batch)
    x = torch.randn(*lead, I, **dt)
    args = [
        x,
        batch_sizes,
        torch.randn(batch, Hr, **dt),
        torch.randn(batch, H, **dt),
        torch.randn(4 * H, I, **dt) * 0.6,
        torch.randn(4 * H, Hr, **dt) * 0.6,
        torch.randn(4 * H, **dt),
        torch.randn(4 * H, **dt),
        torch.randn(Hr, H, **dt) * 0.6 if proj else None,
        reverse,
    ]
    on = set(EXTRAS[:-1]) if extras == "all" else {extras}
    mask = torch.bernoulli(torch.full((batch, Hr), 0.7, **dt)) / 0.7
    if "zoneout_rates" in on and extras != "all":
        zc, zh = torch.tensor(0.3, **dt), torch.tensor(0.6, **dt)
    else:
        zc = torch.bernoulli(torch.full((*lead, H), 0.4, **dt))
        zh = torch.bernoulli(torch.full((*lead, Hr), 0.4, **dt))
    reset = torch.zeros(lead, dtype=torch.bool, device=device)
    reset.view(-1)[[0, 4, 7]] = True  # the first step's first row, and rows further on
    args += [
        mask if "recurrent" in on else None,
        zc if on & {"zoneout_cell", "zoneout_rates"} else None,
        zh if on & {"zoneout_hidden", "zoneout_rates"} else None,
        reset if "reset" in on else None,
    ]
    return args


def float_leaves(args):
    # input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
    return [args[k] for k in (0, 2, 3, 4, 5, 6, 7, 8)]


@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("proj,packed,reverse", list(itertools.product([False, True], repeat=3)))
def test_layer_ops_match_autograd_of_the_reference(backend, extras, proj, packed, reverse):
    device = backend.device
    args = layer_case(extras, proj, packed, reverse, device)
    leaves = [t.requires_grad_() for t in float_leaves(args) if t is not None]
    # Autograd through the reference forward, run outside the dispatcher.
    want = reference.layer_forward(*args)
    y, h_n, c_n = want[:3]
    gy, gh, gc = ramp(y), torch.randn_like(h_n), torch.randn_like(c_n)
    want_grads = torch.autograd.grad([y, h_n, c_n], leaves, [gy, gh, gc])

    with torch.no_grad():
        got = torch.ops.fused_lstm.layer_forward(*args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        out, _, _, gates, cells = got
        x, bs, h0, c0, w_ih, w_hh, _, _, w_hr, rev, *extra = args
        for grads in ((gy, gh, gc), (gy, None, None), (None, gh, None), (None, None, gc)):
            dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.fused_lstm.layer_backward(
                *grads, x, bs, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, rev, *extra
            )
            if grads == (gy, gh, gc):
                got_grads = [dx, dh0, dc0, dw_ih, dw_hh, db, db] + ([dw_hr] if proj else [])
                for k, (a, b) in enumerate(zip(got_grads, want_grads)):
                    torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("packed", [False, True])
def test_layer_ops_in_float32(backend, packed):
    """float32 device against the float64 reference, within float32's error."""
    device = backend.device
    args = layer_case("all", True, packed, False, device, dtype=torch.float32)
    args64 = [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]
    got = torch.ops.fused_lstm.layer_forward(*args)
    want = reference.layer_forward(*args64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=0)


def max_error(got, want):
    return max((a.double() - b).abs().max().item() for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_layer_ops_in_half_precision(backend, dtype, packed):
    """float16 and bfloat16 device, forward and backward, with every regulariser and reset:
    within twice PyTorch's own error at that precision (the reference's plain PyTorch ops and
    their autograd run in it), both against the float64 reference."""
    device = backend.device
    args = layer_case("all", True, packed, False, device, dtype=dtype)
    args64 = [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]

    def forward_and_grads(fn, args, leaves):
        y, h_n, c_n, *_ = out = fn(*args)
        grads = [torch.ones_like(t) * 0.5 for t in (y, h_n, c_n)]
        return out[:3], torch.autograd.grad([y, h_n, c_n], leaves, grads)

    def leaves_of(args):
        return [t.requires_grad_() for t in float_leaves(args) if t is not None]

    want = forward_and_grads(reference.layer_forward, args64, leaves_of(args64))
    own = forward_and_grads(reference.layer_forward, args, leaves_of(args))
    got = forward_and_grads(torch.ops.fused_lstm.layer_forward, args, float_leaves(args))
    for part in (0, 1):  # values, gradients
        assert all(t.dtype == dtype for t in got[part])
        own_error = max_error(own[part], want[part])
        assert max_error(got[part], want[part]) <= 2 * own_error, (part, own_error)


@needs_extension  # the kernels' own checks
def test_layer_op_checks_the_regularisers():
    args = layer_case("all", False, False, False, "cpu")
    for k, bad, match in [
        (10, torch.ones(2, H, dtype=F64), "recurrent_mask must have shape"),
        (11, torch.ones(3, dtype=F64), "zoneout_cell must be a 0-dim rate"),
        (12, torch.ones(5, 3, H, dtype=torch.float32), "zoneout_hidden must"),
        (13, torch.ones(5, 3), "reset must be a bool tensor"),
    ]:
        bad_args = list(args)
        bad_args[k] = bad
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fused_lstm.layer_forward(*bad_args)


# ---- FusedLSTM against a hand-written step loop ------------------------------------------------


def tap_masks(module, *inputs, **kw):
    """Run module, keeping the regularisers of each of the op's layer_forward calls (in h_n's
    order): (w_hh as used, recurrent_mask, zoneout_cell, zoneout_hidden, reset)."""
    taken = []

    def tap(*args):
        args = list(args) + [None] * (14 - len(args))
        taken.append((args[5], *args[10:14]))
        return torch.ops.fused_lstm.layer_forward(*args)

    with _redirect.redirect({"fused_lstm::layer_forward": tap}, applies=lambda a: True):
        result = module(*inputs, **kw)
    return result, taken


def weight_drop_mask(used_w_hh, w_hh, p):
    """The weight-drop mask the op applied, read back from the w_hh it used: every entry 0 or
    1/(1-p)."""
    ratio = used_w_hh.detach() / w_hh.detach()
    kept = (ratio > 0.5).to(ratio.dtype)
    torch.testing.assert_close(ratio, kept / (1 - p), atol=1e-12, rtol=0)
    return kept / (1 - p)


def zoneout_value(z, t, b):
    return None if z is None else (z if z.dim() == 0 else z[t, b])


def loop_lstm(module: FusedLSTM, x, hx, reset, taken):
    """What docs/regularisers.md says FusedLSTM computes, one step at a time, from the masks
    the op drew. x (T, B, I) time-major; reset (T, B) or None."""
    T, B = x.shape[:2]
    D = 2 if module.bidirectional else 1
    h0, c0 = hx
    weights = module.all_weights
    h_n, c_n, layer_in = [], [], x
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = weights[k]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if module.bias else (None, None)
            w_hr = w[-1] if module.proj_size else None
            used_w_hh, r, zc, zh, _ = taken[k]
            if module.training and module.weight_drop > 0:
                w_hh = w_hh * weight_drop_mask(used_w_hh, w_hh, module.weight_drop)
            h, c = h0[k], c0[k]
            ys = [None] * T
            for t in range(T - 1, -1, -1) if d else range(T):
                # The forward direction starts afresh at a reset step; the reverse one, coming
                # from step t + 1, where step t + 1 starts a new sequence.
                cut_at = t if d == 0 else t + 1
                if reset is not None and cut_at < T:
                    keep = (~reset[cut_at]).unsqueeze(1).to(x.dtype)
                    h, c = h * keep, c * keep
                h_in = h if r is None else h * r
                z = nn.functional.linear(layer_in[t], w_ih, b_ih) + nn.functional.linear(
                    h_in, w_hh, b_hh
                )
                i, f, g, o = z.chunk(4, 1)
                c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
                m = o.sigmoid() * c_new.tanh()
                h_new = m if w_hr is None else m @ w_hr.t()
                if zc is not None:
                    dz = zoneout_value(zc, t, slice(None))
                    c_new = dz * c + (1 - dz) * c_new
                if zh is not None:
                    dz = zoneout_value(zh, t, slice(None))
                    h_new = dz * h + (1 - dz) * h_new
                h, c = h_new, c_new
                ys[t] = h
            outs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, -1)
    return layer_in, torch.stack(h_n), torch.stack(c_n)


OPTIONS = {
    "recurrent_dropout": {"recurrent_dropout": 0.4},
    "zoneout": {"zoneout": 0.3},
    "zoneout_pair": {"zoneout": (0.5, 0.2)},
    "weight_drop": {"weight_drop": 0.5},
    "reset": {},
    "all": {"recurrent_dropout": 0.25, "zoneout": (0.2, 0.4), "weight_drop": 0.3},
}


def make_reset(T, B, device):
    reset = torch.zeros(T, B, dtype=torch.bool, device=device)
    reset[0, 0] = reset[2, 1] = reset[3, 1] = reset[T - 1, B - 1] = True
    return reset


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize(
    "num_layers,bidirectional,proj",
    [(1, False, False), (2, True, False), (1, True, True), (2, False, True)],
)
@pytest.mark.parametrize("training", [True, False])
def test_fused_lstm_matches_a_step_loop(backend, option, num_layers, bidirectional, proj, training):
    device = backend.device
    T, B = 6, 3
    m = FusedLSTM(
        I,
        H,
        num_layers,
        bidirectional=bidirectional,
        proj_size=P if proj else 0,
        dtype=F64,
        device=device,
        **OPTIONS[option],
    ).train(training)
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=F64, device=device, requires_grad=True)
    Hr = P if proj else H
    hx = (
        torch.randn(num_layers * D, B, Hr, dtype=F64, device=device, requires_grad=True),
        torch.randn(num_layers * D, B, H, dtype=F64, device=device, requires_grad=True),
    )
    reset = make_reset(T, B, device) if option in ("reset", "all") else None
    (y, (h_n, c_n)), taken = tap_masks(m, x, hx, reset=reset)
    want = loop_lstm(m, x, hx, reset, taken)
    leaves = [x, *hx, *m.parameters()]
    loss = lambda out: (out[0] * ramp(out[0])).sum() + (out[1] ** 2).sum() + out[2].sin().sum()
    got_grads = torch.autograd.grad(loss((y, h_n, c_n)), leaves)
    want_grads = torch.autograd.grad(loss(want), leaves)
    for k, (a, b) in enumerate(zip([y, h_n, c_n, *got_grads], [*want, *want_grads])):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=lambda msg: f"{k}: {msg}")


def test_batch_first_and_unbatched_reset(backend):
    device = backend.device
    time_major = FusedLSTM(I, H, zoneout=0.3, dtype=F64, device=device).eval()
    batch_major = FusedLSTM(I, H, batch_first=True, zoneout=0.3, dtype=F64, device=device).eval()
    batch_major.load_state_dict(time_major.state_dict())
    x = torch.randn(6, 3, I, dtype=F64, device=device)
    reset = make_reset(6, 3, device)
    want, _ = time_major(x, reset=reset)
    got, _ = batch_major(x.transpose(0, 1), reset=reset.t())
    torch.testing.assert_close(got, want.transpose(0, 1), atol=0, rtol=0)
    one, _ = time_major(x[:, 1], reset=reset[:, 1])
    torch.testing.assert_close(one, want[:, 1], atol=1e-14, rtol=0)


# ---- resets against nn.LSTM on each segment ------------------------------------------------


@pytest.mark.parametrize("bidirectional,proj", [(False, False), (True, False), (True, True)])
def test_reset_equals_separate_sequences(backend, bidirectional, proj):
    """A row reset at step k gives exactly what nn.LSTM gives on its two segments run apart: the
    forward direction's hx enters the first segment, the reverse direction's the last, and the
    state elsewhere starts at zero."""
    device = backend.device
    T, k = 7, 3
    lstm = nn.LSTM(
        I, H, 2, bidirectional=bidirectional, proj_size=P if proj else 0, dtype=F64, device=device
    )
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(T, 1, I, dtype=F64, device=device)
    D, Hr = 2 if bidirectional else 1, P if proj else H
    hx = (
        torch.randn(2 * D, 1, Hr, dtype=F64, device=device),
        torch.randn(2 * D, 1, H, dtype=F64, device=device),
    )
    reset = torch.zeros(T, 1, dtype=torch.bool, device=device)
    reset[k] = True
    y, (h_n, c_n) = fused(x, hx, reset=reset)

    def segment_state(forward_from_hx):
        # hx for the directions whose sequence end lies in this segment, zeros for the others.
        h, c = torch.zeros_like(hx[0]), torch.zeros_like(hx[1])
        for layer in range(2):
            d = layer * D + (0 if forward_from_hx else 1)
            if forward_from_hx or bidirectional:
                h[d], c[d] = hx[0][d], hx[1][d]
        return h, c

    first = lstm(x[:k], segment_state(True))
    last = lstm(x[k:], segment_state(False))
    torch.testing.assert_close(y, torch.cat([first[0], last[0]]), atol=1e-12, rtol=0)
    # h_n: the forward directions end in the last segment, the reverse ones in the first.
    for d in range(2 * D):
        from_first = d % D == 1
        src = first if from_first else last
        torch.testing.assert_close(h_n[d], src[1][0][d], atol=1e-12, rtol=0)
        torch.testing.assert_close(c_n[d], src[1][1][d], atol=1e-12, rtol=0)


def test_reset_with_packed_input_matches_padded(backend):
    """PackedSequence input takes reset padded, in the original batch order; the steps and
    rows it holds give what the padded run gives there."""
    device = backend.device
    T, B = 6, 4
    lengths = torch.tensor([4, 6, 2, 5])
    m = FusedLSTM(I, H, 2, bidirectional=True, zoneout=(0.3, 0.1), dtype=F64, device=device).eval()
    x = torch.randn(T, B, I, dtype=F64, device=device)
    reset = make_reset(T, B, device)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, (h_n, c_n) = m(packed, reset=reset)
    y, _ = pad_packed_sequence(y, total_length=T)
    for b in range(B):
        n = int(lengths[b])
        want, (wh, wc) = m(x[:n, b : b + 1], reset=reset[:n, b : b + 1])
        torch.testing.assert_close(y[:n, b : b + 1], want, atol=1e-12, rtol=0)
        torch.testing.assert_close(h_n[:, b : b + 1], wh, atol=1e-12, rtol=0)
        torch.testing.assert_close(c_n[:, b : b + 1], wc, atol=1e-12, rtol=0)


# ---- gradcheck of the whole op -------------------------------------------------------------


# ---- the masks: drawn from torch's generator, as the issue specifies ------------------------


def test_masks_follow_the_specification():
    B, T = 64, 30
    m = FusedLSTM(
        I, H, 2, bidirectional=True, recurrent_dropout=0.25, zoneout=(0.3, 0.6), weight_drop=0.5
    )
    x = torch.randn(T, B, I)
    _, taken = tap_masks(m, x)
    assert len(taken) == 4  # one draw per layer and direction
    for w_used, r, zc, zh, reset in taken:
        assert reset is None
        # recurrent_dropout: one mask per batch row over Hr units, 0 or 1/(1-p)
        assert r.shape == (B, H)
        values = r.unique().double()
        torch.testing.assert_close(values, torch.tensor([0.0, 1 / 0.75], dtype=F64))
        assert abs((r == 0).double().mean().item() - 0.25) < 0.06
        # zoneout: a keep mask per step and unit
        assert zc.shape == (T, B, H) and zh.shape == (T, B, H)
        assert set(zc.unique().tolist()) == {0.0, 1.0}
        assert abs(zc.double().mean().item() - 0.3) < 0.03
        assert abs(zh.double().mean().item() - 0.6) < 0.03
        assert not torch.equal(zc[0], zc[1])
    # weight_drop: one mask per layer and direction, 0 or 1/(1-p) on each w_hh entry
    for (w_used, *_), w in zip(taken, m.all_weights):
        drop = weight_drop_mask(w_used, w[1], 0.5)
        assert abs((drop == 0).double().mean().item() - 0.5) < 0.1
    masks = [t[1] for t in taken]
    assert not torch.equal(masks[0], masks[1])


keep_mask = torch.ops.fused_lstm.keep_mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prob", [0.0, 0.1, 0.5, 0.93, 1.0])
def test_keep_mask_values_and_rate(dtype, prob):
    n = 20001  # odd: the last element is half of a hash
    m = keep_mask(torch.empty(0, dtype=dtype), [n], prob, 4 / 3)
    assert m.shape == (n,) and m.dtype == dtype and m.is_contiguous()
    assert set(m.unique().tolist()) <= {0.0, torch.tensor(4 / 3, dtype=dtype).item()}
    kept = (m != 0).double()
    # within 5 standard deviations of a Bernoulli(prob) mean
    assert abs(kept.mean().item() - prob) <= 5 * (prob * (1 - prob) / n) ** 0.5
    # the two halves of a hash decide neighbours: they must be independent too
    both = (kept[:-1:2] * kept[1::2]).mean().item()
    assert abs(both - prob**2) <= 5 * (prob**2 * (1 - prob**2) / (n // 2)) ** 0.5
    assert keep_mask(torch.empty(0), [3, 0], prob, 1.0).shape == (3, 0)


def test_keep_mask_opcheck_and_errors():
    # opcheck compares runs of the op: only the draws that do not depend on the generator
    for prob in (0.0, 1.0):
        torch.library.opcheck(keep_mask, (torch.empty(2), [3, 4], prob, 2.0))
    with pytest.raises(RuntimeError, match=r"keep_mask's prob must be in \[0, 1\], got 1.5"):
        keep_mask(torch.empty(0), [3], 1.5, 1.0)


def test_eval_mode_drops_nothing_and_zoneout_takes_its_expectation():
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, 2, dtype=F64)
    m = FusedLSTM.from_lstm(lstm)
    m.recurrent_dropout, m.weight_drop = 0.5, 0.5
    m.eval()
    x = torch.randn(5, 2, I, dtype=F64)
    want, _ = lstm(x)
    got, _ = m(x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    m.zoneout = 0.4
    (_, taken) = tap_masks(m, x)
    assert all(t[2].dim() == 0 and t[2].item() == 0.4 for t in taken)


def test_defaults_are_nn_lstm():
    m = FusedLSTM(I, H, 2, bidirectional=True)
    assert m.recurrent_dropout == 0 and m.zoneout == 0 and m.weight_drop == 0
    assert list(m.state_dict()) == list(nn.LSTM(I, H, 2, bidirectional=True).state_dict())
    (_, taken) = tap_masks(m, torch.randn(4, 2, I))
    assert all(t[1:] == (None, None, None, None) for t in taken)


def test_manual_seed_reproduces_a_call_bit_for_bit(backend):
    device = backend.device
    m = FusedLSTM(
        I,
        H,
        2,
        bidirectional=True,
        recurrent_dropout=0.3,
        zoneout=0.2,
        weight_drop=0.3,
        dropout=0.2,
        device=device,
    )
    x = torch.randn(6, 3, I, device=device)

    def run(seed):
        torch.manual_seed(seed)
        y, (h, c) = m(x)
        grads = torch.autograd.grad((y * ramp(y)).sum() + c.sum(), list(m.parameters()))
        return [y, h, c, *grads]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ---- the module's surface ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"recurrent_dropout": 1.0}, r"recurrent_dropout should be a number in range \[0, 1\)"),
        ({"recurrent_dropout": -0.1}, r"recurrent_dropout should be a number in range \[0, 1\)"),
        ({"weight_drop": 1.0}, r"weight_drop should be a number in range \[0, 1\)"),
        ({"zoneout": 1.5}, r"zoneout should be a number or a pair .* range \[0, 1\]"),
        ({"zoneout": (0.1, -1)}, r"zoneout should be a number or a pair .* range \[0, 1\]"),
        ({"zoneout": (0.1, 0.2, 0.3)}, r"zoneout should be a number or a pair"),
        ({"zoneout": "0.1"}, r"zoneout should be a number or a pair"),
        ({"weight_drop": True}, r"weight_drop should be a number"),
    ],
)
def test_options_are_validated_when_set(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLSTM(I, H, **kwargs)
    m = FusedLSTM(I, H)
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=match):
        setattr(m, name, value)
    assert getattr(m, name) == 0


def test_options_are_keyword_only_shown_in_repr_and_changeable():
    with pytest.raises(TypeError):
        FusedLSTM(I, H, 1, True, False, 0.0, False, 0, None, None, 0.2)
    m = FusedLSTM(I, H, recurrent_dropout=0.2, zoneout=(0.1, 0.3), weight_drop=0.5)
    assert repr(m) == (
        "FusedLSTM(3, 5, recurrent_dropout=0.2, zoneout=(0.1, 0.3), weight_drop=0.5)"
    )
    m.zoneout, m.weight_drop = 1, 0
    assert m.zoneout == 1.0 and repr(m) == "FusedLSTM(3, 5, recurrent_dropout=0.2, zoneout=1.0)"
    (_, taken) = tap_masks(m, torch.randn(3, 2, I))
    assert taken[0][2] is not None and taken[0][3] is not None


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.zeros(6, 3), ValueError, "reset must be a bool tensor, got torch.float32"),
        (
            torch.zeros(3, 6, dtype=torch.bool),
            ValueError,
            r"reset must have shape \(T, B\), the input's shape without its feature dimension, "
            r"\[6, 3\]; got \[3, 6\]",
        ),
        (torch.zeros(6, dtype=torch.bool), ValueError, "reset must have shape"),
        ([True] * 6, TypeError, "reset must be a bool tensor, got list"),
        (
            torch.zeros(6, 3, dtype=torch.bool, device="meta"),
            RuntimeError,
            r"reset must be on the input's device \(cpu\), got meta",
        ),
    ],
)
def test_reset_errors(bad, error, match):
    m = FusedLSTM(I, H)
    with pytest.raises(error, match=match):
        m(torch.randn(6, 3, I), reset=bad)


def test_packed_reset_shape_error():
    m = FusedLSTM(I, H)
    packed = pack_padded_sequence(torch.randn(6, 3, I), torch.tensor([6, 4, 2]))
    with pytest.raises(ValueError, match=r"padded \(T, B\) for a PackedSequence input, \[6, 3\]"):
        m(packed, reset=torch.zeros(5, 3, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,reset", [({"zoneout": 0.2}, False), ({}, True)])
def test_onnx_export_refuses_what_onnx_lstm_cannot_express(tmp_path, kwargs, reset):
    m = FusedLSTM(I, H, **kwargs).eval()
    x = torch.randn(4, 2, I)
    args = (x, None, torch.zeros(4, 2, dtype=torch.bool)) if reset else (x,)
    with pytest.raises(RuntimeError, match="ONNX's LSTM has no such inputs"):
        torch.onnx.export(m, args, str(tmp_path / "m.onnx"), dynamo=False)


def test_dropouts_in_eval_export_to_onnx(tmp_path):
    """In eval the dropouts are the identity: the exported model is the plain LSTM, and
    onnxruntime computes what the module does."""
    onnxruntime = pytest.importorskip("onnxruntime")
    m = FusedLSTM(I, H, recurrent_dropout=0.3, weight_drop=0.3).eval()
    x = torch.randn(4, 2, I)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(m, (x,), path, dynamo=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, (h_n, c_n) = m(x)
    for want, have in zip((out, h_n, c_n), got, strict=True):
        torch.testing.assert_close(torch.from_numpy(have), want, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_with_regularisers_and_reset():
    m = FusedLSTM(I, H, 2, recurrent_dropout=0.3, zoneout=0.2, weight_drop=0.3, dtype=F64)
    x = torch.randn(5, 2, I, dtype=F64)
    reset = make_reset(5, 2, "cpu")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    want = m(x, reset=reset)[0]
    torch.manual_seed(3)
    got = compiled(x, reset=reset)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("extras", ["all", "zoneout_rates"])
def test_layer_ops_opcheck(extras):
    args = layer_case(extras, True, True, False, "cpu")
    for t in float_leaves(args):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.fused_lstm.layer_forward, args)


class _Scriptable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = FusedLSTM(
            I,
            H,
            2,
            bidirectional=True,
            recurrent_dropout=0.2,
            zoneout=0.3,
            weight_drop=0.2,
            dtype=F64,
        )

    def forward(self, x, reset: Optional[torch.Tensor] = None):
        return self.lstm(x, reset=reset)[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
@pytest.mark.parametrize("training", [True, False])
def test_torchscript_runs_the_options_and_reset(training):
    model = _Scriptable().train(training)
    scripted = torch.jit.script(model)
    x, reset = torch.randn(5, 2, I, dtype=F64), make_reset(5, 2, "cpu")
    torch.manual_seed(4)
    want = model(x, reset)
    torch.manual_seed(4)
    torch.testing.assert_close(scripted(x, reset), want, atol=0, rtol=0)
