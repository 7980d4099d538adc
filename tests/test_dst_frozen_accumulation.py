"""DST with frozen layers (left out, never changed) and with gradient accumulation (RigL scores the
gradient of every micro-batch since the previous optimizer step, as the optimizer sees it)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.dst import scoring

from test_dst import _model  # the same small conv + linear model


def _data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return x, torch.randint(0, 4, (n,), generator=g)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------ frozen layers
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_frozen_first_layer_is_left_out_and_never_changes(growth):
    model = _model()
    model[0].requires_grad_(False)  # the first layer: its output needs no gradient at all
    frozen_slots, frozen_values = model[0].slot_map.clone(), model[0].values.detach().clone()
    others = [model[4].slot_map.clone(), model[6].slot_map.clone()]
    opt = torch.optim.SGD(_trainable(model), lr=0.1, momentum=0.9)  # built without the frozen layer
    with pytest.warns(UserWarning, match=r"frozen layers \['0'\]"):
        dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.5,
                                        prune_rate_schedule="constant", growth=growth)
    assert dst.frozen == ["0"] and list(dst.layers) == ["4", "6"]
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at construction
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            entry = dst.step()
            assert entry["kind"] == "update" and set(entry["layers"]) == {"4", "6"}
    assert torch.equal(model[0].slot_map, frozen_slots)
    assert torch.equal(model[0].values, frozen_values)
    assert any(not torch.equal(m.slot_map, s) for m, s in zip((model[4], model[6]), others))


def test_layer_frozen_after_construction_drops_out_once():
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.5, prune_rate_schedule="constant")
    model[6].requires_grad_(False)
    before = model[6].slot_map.clone()
    with pytest.warns(UserWarning, match=r"frozen layers \['6'\]"):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert "6" not in dst.step()["layers"]
    assert dst.frozen == ["6"] and torch.equal(model[6].slot_map, before)


def test_optimizer_errors_name_the_real_cause():
    model = _model()
    without_last = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("6.")], lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold the values of") as err:
        ftk.DynamicSparseTraining(model, without_last, total_steps=10)
    assert "after sparsify" not in str(err.value) and "requires_grad_(False)" in str(err.value)

    extra = nn.Parameter(torch.zeros(3))  # a parameter outside the model (a loss's, say) is no sign of that
    with pytest.raises(ValueError, match="optimizer does not hold the values of") as err:
        ftk.DynamicSparseTraining(model, torch.optim.SGD(list(without_last.param_groups[0]["params"]) + [extra],
                                                         lr=0.1), total_steps=10)
    assert "after sparsify" not in str(err.value)

    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    early = torch.optim.SGD(dense.parameters(), lr=0.1)  # built before sparsify(): holds the old weights
    ftk.sparsify(dense, density=0.5, block_size=4, distribution="uniform")
    with pytest.raises(ValueError, match="build it after sparsify"):
        ftk.DynamicSparseTraining(dense, early, total_steps=10)

    everything_frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"), pytest.warns(UserWarning):
        ftk.DynamicSparseTraining(everything_frozen, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                                  total_steps=10)


# ------------------------------------------------------------ gradient accumulation
def _rigl(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return opt, ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3,
                                          prune_rate_schedule="constant")


def test_four_micro_batches_score_like_one_batch_of_sixteen():
    x, y = _data(n=16)
    big, small = _model(), _model()
    opt_big, dst_big = _rigl(big)
    opt_small, dst_small = _rigl(small)
    F.cross_entropy(big(x), y).backward()
    for xs, ys in zip(x.chunk(4), y.chunk(4)):  # the same loss normalisation: mean over 16
        (F.cross_entropy(small(xs), ys) / 4).backward()
    for name, layer in dst_small.layers.items():
        assert scoring.captured_calls(layer) == 4
        capture = layer._op_observer
        assert capture.saved is None and capture.dense is not None  # one dense gradient, no activations
        torch.testing.assert_close(layer.values.grad, dst_big.layers[name].values.grad)  # what the optimizer sees
        torch.testing.assert_close(scoring.dense_grad_block_norms(layer),
                                   scoring.dense_grad_block_norms(dst_big.layers[name]).float(),
                                   rtol=1e-4, atol=1e-6)
    opt_big.step(), opt_small.step()
    dst_big.step(), dst_small.step()
    for a, b in zip(dst_big.layers.values(), dst_small.layers.values()):
        assert torch.equal(a.layout.block_mask, b.layout.block_mask)


def test_one_batch_keeps_its_input_and_gradient_and_forwards_without_backward_add_nothing():
    model, (x, y) = _model(), _data()
    opt, dst = _rigl(model)
    model(x)  # a forward whose backward never runs (its graph is dropped)
    with torch.no_grad():
        model(x)
    F.cross_entropy(model(x), y).backward()
    for layer in dst.layers.values():
        assert scoring.captured_calls(layer) == 1
        op_input, grad = scoring.captured(layer)  # the single-batch path: scored as before
        assert op_input.shape[0] == 16 and grad.shape[0] == 16
    opt.step()
    assert dst.step()["kind"] == "update"
    assert all(scoring.captured_calls(layer) == 0 for layer in dst.layers.values())  # released, re-armed


def test_accumulation_counts_only_the_micro_batches_since_the_previous_step():
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=2, prune_rate=0.3, prune_rate_schedule="constant")
    for step in (1, 2):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (F.cross_entropy(model(xs), ys) / 2).backward()
        if step == 2:
            assert [scoring.captured_calls(m) for m in dst.layers.values()] == [2, 2, 2]
        opt.step()
        entry = dst.step()
    assert entry["kind"] == "update"
