"""Sparse checkpoints: load_sparse into a freshly built dense model, densify_state_dict for a plain one."""

import io
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freetickets_kernels as ftk


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def _trained_sparse_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    ftk.sparsify(model, density=0.1, block_size=16, distribution="erk")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = ftk.DynamicSparseTraining(model, opt, update_interval=1, prune_rate=0.3, prune_rate_schedule="constant")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert dst.step()["kind"] == "update"  # the masks moved away from what sparsify chose
    return torchvision, model.eval()


def test_resnet18_sparse_checkpoint_loads_into_a_fresh_dense_model_and_as_a_dense_state_dict():
    torchvision, model = _trained_sparse_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    state = _roundtrip(model.state_dict())

    restored = ftk.load_sparse(torchvision.models.resnet18(num_classes=10), state).eval()
    sparse_names = [n for n, m in model.named_modules() if isinstance(m, ftk.nn.BlockSparseModule)]
    assert [n for n, m in restored.named_modules() if isinstance(m, ftk.nn.BlockSparseModule)] == sparse_names
    for name in sparse_names:
        a, b = model.get_submodule(name), restored.get_submodule(name)
        assert a.layout == b.layout and a.block_size == b.block_size
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)

    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(ftk.densify_state_dict(state))  # strict: exactly resnet18's keys
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, rtol=1e-4, atol=1e-5)

    # without the metadata (a dict comprehension drops it) the dense model gives the shapes
    bare = {k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="like="):
        ftk.densify_state_dict(bare)
    plain2 = torchvision.models.resnet18(num_classes=10)
    plain2.load_state_dict(ftk.densify_state_dict(bare, like=plain2))
    with torch.no_grad():
        torch.testing.assert_close(plain2.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_load_sparse_into_a_model_sparsified_with_other_arguments():
    torchvision, model = _trained_sparse_resnet18()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    state = model.state_dict()
    other = torchvision.models.resnet18(num_classes=10)
    ftk.sparsify(other, density=0.5, block_size=8, distribution="erk", exclude=["conv1"])
    with pytest.raises(RuntimeError):  # the plain call cannot: other block sizes, a dense conv1
        other.load_state_dict(state)
    ftk.load_sparse(other, state)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), expected)

    dense_state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(RuntimeError, match="load_sparse"):  # the plain call names the way out
        model.load_state_dict(dense_state)
    back = ftk.load_sparse(model, dense_state)  # a dense checkpoint makes the sparse layers dense again
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in back.modules())


def test_load_sparse_names_the_layers_that_differ():
    torchvision, model = _trained_sparse_resnet18()
    state = model.state_dict()
    assert isinstance(model.layer4[1].conv2, ftk.SparseConv2d) and isinstance(model.fc, nn.Linear)  # fc: ERK 1
    wrong = torchvision.models.resnet18(num_classes=7)  # fc is [7, 512], the checkpoint's [10, 512]
    wrong.layer4[1].conv2 = nn.Conv2d(512, 512, 1, bias=False)  # a 1x1 where the checkpoint has a 3x3
    with pytest.raises(ValueError, match="differ from the state_dict") as err:
        ftk.load_sparse(wrong, state)
    assert "layer4.1.conv2: the saved mask does not fit" in str(err.value)
    assert "fc: weight is (10, 512) in the state_dict, (7, 512) in the model" in str(err.value)
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in wrong.modules())  # nothing changed

    with pytest.raises(ValueError, match="head: block-sparse in the state_dict, but the model has no such"):
        ftk.load_sparse(nn.Sequential(), {"head.values": torch.zeros(1, 2, 2), "head.slot_map": torch.zeros(1, 1)})


def test_small_model_roundtrip_linear_and_conv_with_ragged_edges():
    torch.manual_seed(0)
    def build():
        return nn.Sequential(nn.Conv2d(3, 10, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                             nn.Linear(10 * 5 * 5, 13), nn.ReLU(), nn.Linear(13, 3))
    model = build()
    ftk.sparsify(model, density=0.4, block_size=(4, 3), distribution="uniform")
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    state = _roundtrip(model.state_dict())
    torch.testing.assert_close(ftk.load_sparse(build(), state)(x), expected)
    dense = build()
    dense.load_state_dict(ftk.densify_state_dict(state))
    torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(ftk.densify_state_dict(state), OrderedDict)


def _small_vit(torchvision):
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


def test_vit_sparse_attention_checkpoint_loads_into_a_fresh_dense_vit_and_as_a_dense_state_dict():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _small_vit(torchvision)
    ftk.sparsify(model, density=0.3, block_size=16)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert isinstance(model.get_submodule(attn), ftk.SparseMultiheadAttention)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    state = _roundtrip(model.state_dict())

    restored = ftk.load_sparse(_small_vit(torchvision), state).eval()
    assert isinstance(restored.get_submodule(attn), ftk.SparseMultiheadAttention)
    for name, m in model.named_modules():
        if isinstance(m, ftk.nn.BlockSparseModule):
            assert restored.get_submodule(name).layout == m.layout
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)
    ftk.densify(restored)  # load_sparse's modules densify back to torch's
    assert type(restored.get_submodule(attn)) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=1e-4, atol=1e-5)

    dense_state = ftk.densify_state_dict(state)
    assert f"{attn}.in_proj_weight" in dense_state and f"{attn}.q_proj.weight" not in dense_state
    plain = _small_vit(torchvision)
    plain.load_state_dict(dense_state)  # strict: exactly torchvision's keys
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, rtol=1e-4, atol=1e-5)

    bare = {k: v for k, v in state.items()}  # no metadata: the dense model tells shapes and attentions
    plain2 = _small_vit(torchvision)
    plain2.load_state_dict(ftk.densify_state_dict(bare, like=plain2))
    with torch.no_grad():
        torch.testing.assert_close(plain2.eval()(x), expected, rtol=1e-4, atol=1e-5)

    other = _small_vit(torchvision)  # sparsified with other arguments
    ftk.sparsify(other, density=0.6, block_size=8, exclude=["*.out_proj"])
    with torch.no_grad():
        torch.testing.assert_close(ftk.load_sparse(other, state).eval()(x), expected)

    back = ftk.load_sparse(model, _small_vit(torchvision).state_dict())  # a dense checkpoint: dense again
    assert not any(isinstance(m, (ftk.nn.BlockSparseModule, ftk.SparseMultiheadAttention)) for m in back.modules())
    assert type(back.get_submodule(attn)) is nn.MultiheadAttention


def test_sparse_attention_with_kdim_vdim_densifies_to_separate_projection_weights():
    torch.manual_seed(0)
    def build():
        return nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, kdim=24, vdim=16)})
    model = build()
    ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform")
    q, k, v = torch.randn(5, 2, 32), torch.randn(7, 2, 24), torch.randn(7, 2, 16)
    expected = model["attn"](q, k, v, need_weights=False)[0]
    state = _roundtrip(model.state_dict())
    torch.testing.assert_close(ftk.load_sparse(build(), state)["attn"](q, k, v, need_weights=False)[0], expected)
    dense_state = ftk.densify_state_dict(state)
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.in_proj_bias"} <= set(dense_state)
    plain = build()
    plain.load_state_dict(dense_state)
    torch.testing.assert_close(plain["attn"](q, k, v, need_weights=False)[0], expected, rtol=1e-4, atol=1e-5)


def test_conv1d_model_roundtrip():
    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv1d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv1d(24, 16, 5, padding="same"),
                             nn.Flatten(), nn.Linear(16 * 20, 5))
    model = build()
    ftk.sparsify(model, density=0.4, block_size=8, distribution="uniform")
    assert isinstance(model[0], ftk.SparseConv1d) and isinstance(model[2], ftk.SparseConv1d)
    x = torch.randn(3, 8, 20)
    with torch.no_grad():
        expected = model(x)
    state = _roundtrip(model.state_dict())
    restored = ftk.load_sparse(build(), state)
    assert isinstance(restored[0], ftk.SparseConv1d) and restored[2].layout == model[2].layout
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected)
    plain = build()
    plain.load_state_dict(ftk.densify_state_dict(state))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)

    wrong = build()
    wrong[2] = nn.Conv1d(24, 16, 3, padding=1)  # a k=3 where the checkpoint has k=5
    with pytest.raises(ValueError, match="2: the saved mask does not fit the model's Conv1d"):
        ftk.load_sparse(wrong, state)
    assert not any(isinstance(m, ftk.nn.BlockSparseModule) for m in wrong.modules())  # nothing changed


class _TransposedLinear(nn.Module):
    """GPT-2-style projection: weight [in, out], y = x @ W + b (converted by a registered conversion)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def _transposed_to_sparse(module, density, block_size, criterion):
    nx, nf = module.weight.shape
    lin = nn.Linear(nx, nf)
    with torch.no_grad():
        lin.weight.copy_(module.weight.t())
        lin.bias.copy_(module.bias)
    return ftk.SparseLinear.from_dense(lin, density, block_size, criterion)


def _transposed_to_dense(sparse):
    conv = _TransposedLinear(sparse.out_features, sparse.in_features)
    with torch.no_grad():
        conv.weight.copy_(sparse.weight.t())
        conv.bias.copy_(sparse.bias)
    return conv


def test_registered_conversion_roundtrips_through_load_sparse_and_densify_state_dict():
    ftk.register_conversion(_TransposedLinear, _transposed_to_sparse, _transposed_to_dense,
                            weight_shape=lambda m: tuple(m.weight.shape[::-1]))
    try:
        def build():
            return nn.Sequential(_TransposedLinear(48, 24), nn.ReLU(), _TransposedLinear(8, 48))
        torch.manual_seed(0)
        model = build()
        ftk.sparsify(model, density=0.5, block_size=8, distribution="uniform")
        assert isinstance(model[0], ftk.SparseLinear)
        x = torch.randn(3, 24)
        with torch.no_grad():
            expected = model(x)
        state = _roundtrip(model.state_dict())
        restored = ftk.load_sparse(build(), state)
        with torch.no_grad():
            torch.testing.assert_close(restored(x), expected)
        assert type(ftk.densify(restored)[0]) is _TransposedLinear  # the origin is kept
        dense_state = ftk.densify_state_dict(state)
        assert dense_state["0.weight"].shape == (24, 48)  # the registered type's [in, out]
        plain = build()
        plain.load_state_dict(dense_state)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)
    finally:
        ftk.nn.unregister_conversion(_TransposedLinear)
