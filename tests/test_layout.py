import pytest
import torch

from dist_attn.layout import (check_layout, check_seq_len, gathered_to_global_index, position_ids,
                              rank_ranges, shard, unshard)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_shard_roundtrip_and_positions(layout, p):
    s = 2 * p * 5
    x = torch.randn(2, s, 3, 4)
    parts = [shard(x, r, p, layout) for r in range(p)]
    assert all(t.shape == (2, s // p, 3, 4) for t in parts)
    assert torch.equal(unshard(parts, layout), x)
    for r in range(p):
        pos = position_ids(s, r, p, layout)
        assert torch.equal(parts[r], x[:, pos])
    idx = gathered_to_global_index(s, p, layout)
    assert torch.equal(torch.cat(parts, dim=1)[:, idx], x)


def test_zigzag_chunks_balanced():
    # rank r holds chunks r and 2P-1-r: the causal work (sum of positions + 1) is equal on every rank
    p, s = 4, 64
    work = [int((position_ids(s, r, p, "zigzag") + 1).sum()) for r in range(p)]
    assert len(set(work)) == 1


def test_layout_errors():
    with pytest.raises(ValueError, match="expected one of"):
        check_layout("ring")
    with pytest.raises(ValueError, match="divisible by 8"):
        check_seq_len(100, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by 3"):
        shard(torch.zeros(1, 10, 1, 1), 0, 3, "contiguous")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_rank_ranges_are_the_positions_of_the_local_chunks(layout, p):
    s = 2 * p * 5
    for r in range(p):
        ranges = rank_ranges(s, r, p, layout)
        assert len(ranges) == (2 if layout == "zigzag" else 1)
        assert torch.equal(torch.cat([torch.arange(a, b) for a, b in ranges]), position_ids(s, r, p, layout))
