"""DynamicSparseTraining: SET and RigL updates, schedules, optimizer state, checkpoints, explore."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.layout import block_norms


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        ftk.SparseConv2d(3, 16, 3, padding=1, density=0.4, block_size=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        ftk.SparseLinear(64, 32, density=0.4, block_size=(8, 4)), nn.ReLU(),
        ftk.SparseLinear(32, 4, density=0.5, block_size=(1, 4)),
    )


def _data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return x, (x.mean(dim=(1, 2, 3)) * 4).long().clamp(-2, 1) + 2  # learnable labels


def _train(model, dst, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dst.step()
        losses.append(loss.item())
    return losses


def _sparse(model):
    return [m for m in model.modules() if isinstance(m, ftk.nn.BlockSparseModule)]


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_updates_keep_block_counts_and_lower_the_loss(growth):
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=5, prune_rate=0.3, growth=growth, total_steps=80)
    counts = [m.layout.nnzb for m in _sparse(model)]
    densities = [m.density for m in _sparse(model)]
    masks = [m.layout.block_mask.clone() for m in _sparse(model)]
    losses = _train(model, dst, opt, 80, x, y)
    assert [m.layout.nnzb for m in _sparse(model)] == counts
    assert [m.density for m in _sparse(model)] == pytest.approx(densities, abs=0.05)
    assert len(dst.log) == 15  # steps 5, 10, ..., 75
    assert any(e["layers"][n]["changed"] > 0 for e in dst.log for n in e["layers"])
    assert any(not torch.equal(m.layout.block_mask, k) for m, k in zip(_sparse(model), masks))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_update_prunes_smallest_and_zeroes_grown_blocks_and_their_momentum():
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=3, prune_rate=0.5, growth="gradient",
                                    prune_rate_schedule="constant")
    layer = _sparse(model)[1]
    _train(model, dst, opt, 2, x, y)
    before = layer.layout
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    values_before = layer.values.detach().clone()
    norms = block_norms(values_before)
    entry = dst.step()  # step 3: an update
    assert entry["kind"] == "update" and entry["rate"] == 0.5
    after = layer.layout
    k = int(0.5 * before.nnzb)
    live = before.block_mask.view(-1).nonzero().squeeze(1)
    live_norms = norms[before.slot_map.view(-1)[live]]
    pruned = live[torch.argsort(live_norms, stable=True)[:k]]
    survivors = live[torch.argsort(live_norms, stable=True)[k:]]
    # the k smallest blocks are gone, or regrown in place at zero (RigL may pick them again)
    for pos in pruned.tolist():
        slot = int(after.slot_map.view(-1)[pos])
        assert slot < 0 or torch.all(layer.values[slot] == 0)
    # every other block kept its slot and its values
    assert torch.equal(after.slot_map.view(-1)[survivors], before.slot_map.view(-1)[survivors])
    kept_slots = before.slot_map.view(-1)[survivors]
    assert torch.equal(layer.values[kept_slots], values_before[kept_slots])
    # grown blocks (and the regrown ones) start at zero, with zero momentum
    fresh = after.slot_map.view(-1)[pruned]
    fresh = torch.cat([fresh[fresh >= 0], after.slot_map[after.block_mask & ~before.block_mask]])
    assert fresh.numel() == k
    assert torch.all(layer.values[fresh] == 0)
    assert torch.all(opt.state[layer.values]["momentum_buffer"][fresh] == 0)
    assert after.nnzb == before.nnzb


def test_cosine_schedule_and_stop_fraction():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=10, prune_rate=0.5, total_steps=100,
                                    stop_fraction=0.75, growth="random")
    assert dst.rate(0) == pytest.approx(0.5)
    assert dst.rate(50) == pytest.approx(0.25)
    assert dst.rate(100) == pytest.approx(0.0)
    x, y = _data()
    _train(model, dst, opt, 100, x, y)
    assert [e["step"] for e in dst.log] == [10, 20, 30, 40, 50, 60, 70]


def test_resume_mid_training_is_identical():
    x, y = _data()

    def setup():
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        dst = ftk.DynamicSparseTraining(model, opt, update_interval=4, prune_rate=0.3, growth="random",
                                        total_steps=40, seed=3)
        return model, opt, dst

    model, opt, dst = setup()
    _train(model, dst, opt, 18, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": dst.state_dict()}, buf)
    _train(model, dst, opt, 22, x, y)

    buf.seek(0)
    saved = torch.load(buf)
    model2, opt2, dst2 = setup()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    dst2.load_state_dict(saved["dst"])
    _train(model2, dst2, opt2, 22, x, y)
    for a, b in zip(_sparse(model), _sparse(model2)):
        assert a.layout == b.layout
        assert torch.equal(a.values, b.values)
    assert dst.log == dst2.log


def test_explore_replaces_a_large_fraction():
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1000, growth="gradient",
                                    prune_rate_schedule="constant")
    with pytest.raises(RuntimeError, match="arm_gradient_capture"):
        dst.explore(0.8)
    dst.arm_gradient_capture()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    entry = dst.explore(0.8)
    assert entry["kind"] == "explore"
    for m in _sparse(model):  # 80% of each layer's blocks restart from zero (some may regrow in place)
        zero_blocks = int((m.values.detach().flatten(1).abs().sum(1) == 0).sum())
        assert zero_blocks >= int(0.8 * m.layout.nnzb)
    masks = [m.layout.block_mask.clone() for m in _sparse(model)]
    rnd = dst.explore(0.5, growth="random")
    assert rnd["kind"] == "explore"
    assert any(not torch.equal(m.layout.block_mask, k) for m, k in zip(_sparse(model), masks))


def test_configuration_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="growth"):
        ftk.DynamicSparseTraining(model, opt, growth="magic", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        ftk.DynamicSparseTraining(model, opt)
    with pytest.raises(ValueError, match="no block-sparse layers"):
        ftk.DynamicSparseTraining(nn.Linear(3, 3), opt, total_steps=10)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        ftk.DynamicSparseTraining(model, other, total_steps=10)
    dst = ftk.DynamicSparseTraining(model, opt, total_steps=10, growth="random")
    bad = copy.deepcopy(dst.state_dict())
    bad["config"]["growth"] = "gradient"
    with pytest.raises(ValueError, match="saved with"):
        dst.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        dst.load_state_dict({})


def _slot_maps(model):
    return [m.slot_map.clone() for m in model.modules() if isinstance(m, ftk.nn.base.BlockSparseModule)]


def test_update_skipped_when_grad_scaler_found_inf():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate_schedule="constant")
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = _slot_maps(model)
    entry = dst.step(found_inf=True)
    assert entry["kind"] == "skipped" and "inf" in entry["why"]
    assert all(torch.equal(a, b) for a, b in zip(before, _slot_maps(model)))
    F.cross_entropy(model(x), y).backward()
    assert dst.step()["kind"] == "update"  # the next step updates again


def test_update_skipped_when_growth_gradient_is_not_finite():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate_schedule="constant")
    x, y = _data()
    (F.cross_entropy(model(x), y) * float("inf")).backward()  # what an overflowing fp16 scaled loss gives
    before = _slot_maps(model)
    entry = dst.step()
    assert entry["kind"] == "skipped" and "non-finite" in entry["why"]
    assert all(torch.equal(a, b) for a, b in zip(before, _slot_maps(model)))
