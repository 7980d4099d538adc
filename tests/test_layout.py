"""BlockSparseLayout: index invariants, conversions, slot stability, validation."""

import pytest
import torch

from freetickets_kernels.layout import BlockSparseLayout, to_gemm_blocks

from conftest import random_layout, random_values

SHAPES = [
    ((10, 7), (4, 3)),
    ((64, 64), (16, 16)),
    ((33, 17), (1, 1)),
    ((12, 6, 3, 3), (4, 4)),
    ((17, 5, 3, 2), (4, 3)),
    ((8, 3, 1, 1), (8, 8)),
]


def _entries(ptr, idx, slot, transposed):
    out = set()
    for outer in range(ptr.numel() - 1):
        for e in range(int(ptr[outer]), int(ptr[outer + 1])):
            r, c = (int(idx[e]), outer) if transposed else (outer, int(idx[e]))
            out.add((r, c, int(slot[e])))
    return out


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_index_invariants(shape, block, density):
    layout = random_layout(shape, block, density, seed=3)
    ix = layout.indices
    r, c = layout.grid_shape
    for t in ix.as_tuple():
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert ix.row_ptr.numel() == r + 1 and ix.col_ptr.numel() == c + 1
    assert int(ix.row_ptr[-1]) == int(ix.col_ptr[-1]) == layout.nnzb
    assert (ix.row_ptr.diff() >= 0).all() and (ix.col_ptr.diff() >= 0).all()
    # within a row, columns ascend (BSR order); within a column, rows ascend
    for ptr, idx in ((ix.row_ptr, ix.col_idx), (ix.col_ptr, ix.row_idx)):
        for i in range(ptr.numel() - 1):
            seg = idx[int(ptr[i]) : int(ptr[i + 1])]
            assert (seg.diff() > 0).all()
    bsr = _entries(ix.row_ptr, ix.col_idx, ix.slot, False)
    bsc = _entries(ix.col_ptr, ix.row_idx, ix.tslot, True)
    assert bsr == bsc
    expected = {(i, j, int(layout.slot_map[i, j])) for i, j in layout.block_mask.nonzero().tolist()}
    assert bsr == expected
    assert sorted(s for _, _, s in bsr) == list(range(layout.nnzb))


@pytest.mark.parametrize("shape,block", SHAPES)
def test_pack_unpack_round_trip(shape, block):
    layout = random_layout(shape, block, 0.5, seed=4)
    dense = torch.randn(shape, dtype=torch.float64)
    values = layout.pack(dense)
    assert values.shape == layout.values_shape
    masked = dense * layout.element_mask()
    torch.testing.assert_close(layout.unpack(values), masked, rtol=0, atol=0)
    torch.testing.assert_close(layout.pack(masked), values, rtol=0, atol=0)


@pytest.mark.parametrize("shape,block", SHAPES)
def test_ragged_padding_is_zero(shape, block):
    layout = random_layout(shape, block, 1.0)
    values = layout.pack(torch.ones(shape))
    # a value slot is 1 exactly where it covers a real weight element
    assert values.sum().item() == torch.tensor(shape).prod().item()


def test_conv_column_order_is_tap_then_channel():
    # weight[o, c, i, j] lands in column block (tap=i*kw+j, channel block c // Bi)
    w = torch.zeros(4, 6, 2, 3)
    w[0, 5, 1, 2] = 1.0  # tap 5, channel 5 -> channel block 2 (Bi=2), inner column 1
    blocks = to_gemm_blocks(w, (4, 2))
    assert blocks.shape == (1, 6 * 3, 4, 2)
    nz = blocks.nonzero().tolist()
    assert nz == [[0, 5 * 3 + 2, 0, 1]]


@pytest.mark.parametrize("shape,block", SHAPES)
def test_element_mask_block_mask_round_trip(shape, block):
    layout = random_layout(shape, block, 0.4, seed=5)
    emask = layout.element_mask()
    assert emask.shape == shape
    again = BlockSparseLayout.from_element_mask(emask, block)
    assert torch.equal(again.block_mask, layout.block_mask)


def test_from_dense_keeps_largest_blocks():
    w = torch.zeros(8, 8)
    w[:4, 4:] = 5.0  # block (0, 1)
    w[4:, :4] = 1.0  # block (1, 0)
    w[:4, :4] = 0.1
    values, layout = BlockSparseLayout.from_dense(w, 4, density=0.5)
    assert layout.block_mask.tolist() == [[False, True], [True, False]]
    torch.testing.assert_close(layout.unpack(values), w * layout.element_mask())


def test_from_dense_density_extremes():
    w = torch.randn(6, 10, 3, 3)
    _, none = BlockSparseLayout.from_dense(w, (4, 4), density=0.0)
    _, full = BlockSparseLayout.from_dense(w, (4, 4), density=1.0)
    assert none.nnzb == 0 and none.density == 0.0
    assert full.block_mask.all() and full.density == 1.0


def test_replace_blocks_keeps_surviving_slots():
    layout = random_layout((32, 32), (4, 4), 0.5, seed=6)
    live = layout.block_mask
    drop = torch.zeros_like(live)
    drop.view(-1)[live.view(-1).nonzero()[:5, 0]] = True
    grow = torch.zeros_like(live)
    grow.view(-1)[(~live).view(-1).nonzero()[:5, 0]] = True
    new = layout.replace_blocks(drop, grow)
    assert new.nnzb == layout.nnzb
    keep = live & ~drop
    assert torch.equal(new.slot_map[keep], layout.slot_map[keep])
    assert sorted(new.slot_map[grow].tolist()) == sorted(layout.slot_map[drop].tolist())
    assert torch.equal(new.block_mask, keep | grow)


def test_replace_blocks_validation():
    layout = random_layout((16, 16), (4, 4), 0.5, seed=7)
    live = layout.block_mask
    with pytest.raises(ValueError, match="same number"):
        layout.replace_blocks(live & False, ~live)
    with pytest.raises(ValueError, match="not alive"):
        layout.replace_blocks(~live, live & False)
    first_live = live.view(-1).nonzero()[:2, 0]
    drop = torch.zeros_like(live)
    drop.view(-1)[first_live[0]] = True
    grow = torch.zeros_like(live)
    grow.view(-1)[first_live[1]] = True  # alive and not dropped
    with pytest.raises(ValueError, match="already alive"):
        layout.replace_blocks(drop, grow)


def test_state_round_trip_and_equality():
    layout = random_layout((12, 6, 3, 3), (4, 4), 0.5)
    again = BlockSparseLayout.from_state(layout.state())
    assert again == layout
    with pytest.raises(ValueError, match="missing"):
        BlockSparseLayout.from_state({"slot_map": layout.slot_map})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(block_size=0), ValueError, "block_size must be positive"),
        (dict(block_size=(4, -1)), ValueError, "block_size must be positive"),
        (dict(block_size=2.5), TypeError, "block_size must be an int"),
        (dict(block_size=(1, 2, 3)), TypeError, "block_size"),
        (dict(out_features=0), ValueError, "out_features must be a positive int"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    args = dict(slot_map=torch.full((2, 2), -1), out_features=8, in_features=8, block_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        BlockSparseLayout(**args)


def test_slot_map_validation():
    with pytest.raises(ValueError, match="block grid"):
        BlockSparseLayout(torch.full((3, 2), -1), 8, 8, 4)
    with pytest.raises(ValueError, match="permutation"):
        BlockSparseLayout(torch.tensor([[0, 0], [-1, -1]]), 8, 8, 4)
    with pytest.raises(ValueError, match="-1"):
        BlockSparseLayout(torch.tensor([[-2, 0], [-1, -1]]), 8, 8, 4)
    with pytest.raises(TypeError, match="integer"):
        BlockSparseLayout(torch.zeros(2, 2), 8, 8, 4)


def test_pack_and_values_shape_errors():
    layout = random_layout((8, 8), (4, 4), 1.0)
    with pytest.raises(ValueError, match="layout is for"):
        layout.pack(torch.zeros(8, 9))
    with pytest.raises(ValueError, match="expected"):
        layout.unpack(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="density"):
        BlockSparseLayout.from_dense(torch.zeros(8, 8), 4, density=1.5)


def test_int32_overflow_is_refused():
    # 50k x 50k blocks of 16x16 would need > 2**31 value elements
    with pytest.raises(ValueError, match="int32"):
        BlockSparseLayout.from_block_mask(torch.ones(3200, 3200, dtype=torch.bool), 51200, 51200, 16)


def test_to_device_returns_same_layout_on_same_device():
    layout = random_layout((8, 8), (4, 4), 0.5)
    assert layout.to("cpu") is layout
    assert random_values(layout).shape == layout.values_shape


@pytest.mark.parametrize("shape,block", SHAPES)
def test_valid_mask_marks_real_elements(shape, block):
    layout = random_layout(shape, block, 0.6, seed=8)
    torch.testing.assert_close(layout.valid_mask(), layout.pack(torch.ones(shape)) > 0, rtol=0, atol=0)
