"""SparseLinear / SparseConv2d / sparsify / densify and the density distributions."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk
from freetickets_kernels.dst import layer_densities
from freetickets_kernels.layout import block_norms, to_gemm_blocks

TOL = dict(rtol=1e-5, atol=1e-5)


def test_sparse_linear_matches_its_dense_twin():
    torch.manual_seed(0)
    layer = ftk.SparseLinear(70, 50, density=0.3, block_size=(16, 8))
    x = torch.randn(4, 3, 70)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), **TOL)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), **TOL)
    assert layer.values.shape == layer.layout.values_shape
    assert 0.2 < layer.density < 0.45
    nobias = ftk.SparseLinear(8, 6, bias=False, density=1.0, block_size=2)
    assert nobias.bias is None and "bias=False" in repr(nobias)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=4, padding="same"),  # asymmetric 'same'
        dict(kernel_size=3, padding="valid"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=2, padding_mode="circular", bias=False),
    ],
)
def test_sparse_conv_matches_nn_conv2d(kwargs):
    torch.manual_seed(0)
    layer = ftk.SparseConv2d(6, 10, density=0.5, block_size=(4, 4), **kwargs)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d)
    x = torch.randn(2, 6, 9, 8)
    torch.testing.assert_close(layer(x), dense(x), **TOL)


def test_conv_refuses_groups_and_unknown_padding_mode():
    with pytest.raises(ValueError, match="groups=1"):
        ftk.SparseConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        ftk.SparseConv2d(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="strided"):
        ftk.SparseConv2d(4, 4, 3, stride=2, padding="same")


def test_from_dense_keeps_the_largest_blocks_and_the_bias():
    dense = nn.Linear(16, 8)
    with torch.no_grad():
        dense.weight.copy_(torch.arange(128.0).reshape(8, 16))
    sparse = ftk.SparseLinear.from_dense(dense, density=0.25, block_size=4)
    norms = block_norms(to_gemm_blocks(dense.weight.detach(), (4, 4)))
    kept = norms[sparse.layout.block_mask]
    dropped = norms[~sparse.layout.block_mask]
    assert kept.min() >= dropped.max()
    torch.testing.assert_close(sparse.bias, dense.bias)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    sconv = ftk.SparseConv2d.from_dense(conv, density=1.0, block_size=4)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(sconv(x), conv(x), **TOL)
    rand = ftk.SparseConv2d.from_dense(conv, density=0.5, block_size=4, criterion="random")
    assert rand.layout.nnzb == round(0.5 * rand.layout.grid_shape[0] * rand.layout.grid_shape[1])
    with pytest.raises(ValueError, match="criterion"):
        ftk.SparseLinear.from_dense(dense, 0.5, 4, criterion="best")


def test_state_dict_round_trip_into_a_fresh_module_with_another_mask():
    torch.manual_seed(0)
    a = ftk.SparseConv2d(8, 12, 3, padding=1, density=0.3, block_size=4)
    b = ftk.SparseConv2d(8, 12, 3, padding=1, density=0.7, block_size=4)  # other block count
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(a(x), b(x))
    assert a.layout == b.layout


def test_load_state_dict_rejects_a_broken_layout():
    a = ftk.SparseLinear(8, 8, density=0.5, block_size=4)
    state = a.state_dict()
    state["slot_map"] = torch.zeros(3, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="valid layout"):
        a.load_state_dict(state)


def test_mask_weight_repr_and_dtype_moves():
    layer = ftk.SparseLinear(20, 12, density=0.5, block_size=4)
    assert layer.mask.shape == (12, 20) and layer.mask.dtype == torch.bool
    assert torch.equal(layer.weight != 0, layer.mask & (layer.weight != 0))
    text = repr(layer)
    assert "density=" in text and "block_size=(4, 4)" in text and "backend=" in text
    layer.double()
    assert layer.values.dtype == torch.float64 and layer.slot_map.dtype == torch.int64
    assert layer(torch.randn(3, 20, dtype=torch.float64)).dtype == torch.float64


def test_training_lowers_the_loss_and_never_revives_dead_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(ftk.SparseLinear(16, 32, density=0.5, block_size=4), nn.ReLU(),
                          ftk.SparseLinear(32, 3, density=0.5, block_size=(1, 4)))
    x, target = torch.randn(64, 16), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    masks = [m.mask for m in model if isinstance(m, ftk.SparseLinear)]
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first
    for m, mask in zip([m for m in model if isinstance(m, ftk.SparseLinear)], masks):
        assert torch.all(m.weight[~mask] == 0)  # dead blocks have no values to update


def test_layer_densities():
    shapes = {"a": (64, 3, 3, 3), "b": (128, 64, 3, 3), "c": (256, 128, 3, 3), "fc": (10, 256)}
    sizes = {n: torch.tensor(s).prod().item() for n, s in shapes.items()}
    for dist in ("erk", "er", "uniform"):
        d = layer_densities(shapes, 0.1, dist)
        kept = sum(d[n] * sizes[n] for n in shapes)
        assert kept == pytest.approx(0.1 * sum(sizes.values()), rel=1e-9)
        assert all(0 < v <= 1 for v in d.values())
    erk = layer_densities(shapes, 0.1, "erk")
    assert erk["a"] == 1.0  # tiny first conv: would exceed 1, kept dense
    assert erk["c"] < erk["b"]
    with pytest.raises(ValueError, match="distribution"):
        layer_densities(shapes, 0.1, "normal")
    with pytest.raises(ValueError, match="density"):
        layer_densities(shapes, 0.0)


def test_sparsify_resnet18_and_densify_back():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    report = ftk.sparsify(model, density=0.1, block_size=16, exclude=["conv1"])
    statuses = {r["name"]: r["status"] for r in report.rows}
    assert statuses["conv1"] == "dense: excluded"
    assert isinstance(model.layer1[0].conv1, ftk.SparseConv2d)
    assert report.global_density() == pytest.approx(0.1, abs=0.01)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert model.layer4[0].conv1.values.grad is not None
    model.eval()
    y = model(x)
    dense = ftk.densify(model)
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in dense.modules())
    torch.testing.assert_close(dense(x), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already block-sparse"):
        ftk.sparsify(nn.Sequential(ftk.SparseLinear(4, 4, block_size=2)), 0.5)


def test_sparsify_resnet50_runs_forward_and_backward():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50(num_classes=10)
    report = ftk.sparsify(model, density=0.2, block_size=32)
    assert len(report.sparse_layers) > 40
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()


def test_sparsify_converts_attention_projections():  # more in tests/test_transformers.py
    mha = nn.MultiheadAttention(32, 4)
    model = nn.ModuleDict({"attn": mha, "head": nn.Linear(32, 32)})
    report = ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform")
    status = {r["name"]: r["status"] for r in report.rows}
    assert status["attn.out_proj"] == status["attn.q_proj"] == "sparse"
    assert isinstance(model["attn"], ftk.SparseMultiheadAttention)
    assert isinstance(model["head"], ftk.SparseLinear)


def test_wrn28_10_and_wide_resnet50_sparsify():
    from freetickets_kernels.models import WideResNet, wrn28_10

    model = wrn28_10(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)
    small = WideResNet(depth=10, widen=2)
    report = ftk.sparsify(small, density=0.2, block_size=8, exclude=["conv1"])
    assert report.global_density() < 0.35
    small(torch.randn(2, 3, 32, 32)).sum().backward()
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=27)
    torchvision = pytest.importorskip("torchvision")
    wide = torchvision.models.wide_resnet50_2(num_classes=10)
    report = ftk.sparsify(wide, density=0.1, block_size=32, exclude=["conv1"])
    assert len(report.sparse_layers) > 40
    assert report.global_density() == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("layer", [torch.nn.Linear(64, 64), torch.nn.Conv2d(8, 8, 3)])
def test_sparsify_refuses_a_bare_layer_with_what_to_call(layer):
    with pytest.raises(ValueError, match="from_dense"):
        ftk.sparsify(layer, density=0.5, block_size=8)
    assert type(layer) in (torch.nn.Linear, torch.nn.Conv2d) and not list(layer.children())
