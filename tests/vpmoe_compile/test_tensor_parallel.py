"""The tensor-parallel layout of a parameter (vpmoe_compile.tensor_parallel) and the TPA factor
weight's checkpoint split (vpmoe_compile.checkpoint_tp), in one process: shards made by
``TPLayout.shard`` reassemble to the whole tensor, the factor-block factory cuts the blocks a
one-rank checkpoint holds. (Across processes: tests/parallel, TP 2.)"""

import pytest
import torch

from vpmoe_compile.ops.tpa_attention.layout import tpa_factor_rows
from vpmoe_compile.tensor_parallel import TPLayout, is_tp_partitioned, tp_layout


def _tpa_segments(H, G, d, Rq, R, tp):
    segs, start = [], 0
    for name, n in tpa_factor_rows(H // tp, G // tp, d, Rq, R):
        segs.append((start, n, name.startswith("a_")))
        start += n
    return tuple(segs)


def _assemble(layout, shards):
    """What ``TPLayout.gather`` computes from the ranks' shards, without a process group."""
    pieces = []
    for start, n, sharded in layout.segments:
        if sharded:
            pieces.extend(s.narrow(layout.dim, start, n) for s in shards)
        else:
            pieces.append(shards[0].narrow(layout.dim, start, n))
    return torch.cat(pieces, layout.dim)


@pytest.mark.parametrize("tp", [2, 4])
def test_tpa_layout_shards_reassemble_the_one_rank_weight(tp):
    H, G, d, Rq, R, h = 8, 4, 16, 4, 2, 24
    full_rows = tpa_factor_rows(H, G, d, Rq, R)
    F = sum(n for _, n in full_rows)
    whole = torch.randn(F, h, dtype=torch.float64)
    layouts = [TPLayout(0, _tpa_segments(H, G, d, Rq, R, tp), tp, r) for r in range(tp)]
    assert layouts[0].full_length() == F and layouts[0].full_shape((99, h)) == (F, h)
    shards = [lay.shard(whole) for lay in layouts]
    # rank r holds the head-factor rows of its heads / groups and every token-factor row
    off, start = {}, 0
    for name, n in full_rows:
        off[name] = (start, n)
        start += n
    for r, s in enumerate(shards):
        a_q = s[: H // tp * Rq]
        assert torch.equal(a_q, whole[r * H // tp * Rq : (r + 1) * H // tp * Rq])
        b0, bn = off["b_q"][0], F - off["b_q"][0]
        assert torch.equal(s[-bn:], whole[b0:])
    assert torch.equal(_assemble(layouts[0], shards), whole)
    # the split / replicated views cover the local shard exactly once
    split, rep = layouts[1].split_sharded(shards[1])
    assert sum(t.numel() for t in split + rep) == shards[1].numel()
    assert sum(t.shape[0] for t in rep) == (Rq + 2 * R) * d


def test_column_and_row_parallel_layouts():
    col = torch.nn.Parameter(torch.randn(6, 5))
    col.tensor_model_parallel, col.partition_dim = True, 0
    row = torch.nn.Parameter(torch.randn(5, 3))
    row.tensor_model_parallel, row.partition_dim = True, 1
    assert tp_layout(col, 1, 0) is None  # TP 1: nothing split
    lc, lr = tp_layout(col, 2, 1), tp_layout(row, 2, 0)
    assert (lc.dim, lc.full_shape(col.shape)) == (0, (12, 5))
    assert (lr.dim, lr.full_shape(row.shape)) == (1, (5, 6))
    whole = torch.randn(5, 6)
    halves = [TPLayout(1, ((0, 3, True),), 2, r).shard(whole) for r in range(2)]
    assert torch.equal(torch.cat(halves, 1), whole)
    # replicated parameters and routed experts are never TP-split here
    norm = torch.nn.Parameter(torch.ones(5))
    expert = torch.nn.Parameter(torch.randn(2, 4, 5))
    expert.tensor_model_parallel, expert.partition_dim, expert.expert_stack = True, 1, True
    assert not is_tp_partitioned(norm) and tp_layout(norm, 2, 0) is None
    assert not is_tp_partitioned(expert) and tp_layout(expert, 2, 0) is None


def test_factor_blocks_factory_cuts_the_one_rank_blocks(megatron_env):
    """At TP 1 the factory saves six whole blocks under ``<key>.a_q`` ... ``.b_v`` and merges them
    back to the weight; the same factory cuts a ``[F, 1]`` second moment."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from vpmoe_compile.checkpoint_tp import factor_blocks_factory

    rows = tpa_factor_rows(8, 2, 16, 4, 2)
    F = sum(n for _, n in rows)
    w = torch.nn.Parameter(torch.randn(F, 64))
    w.tpa_factor_rows = rows
    base = ShardedTensor.from_rank_offsets("layer.linear_qkv.weight", w.detach(), replica_id=(0, 0, 0))
    fac = factor_blocks_factory(base, w)
    built = fac.build()
    assert list(built) == [n for n, _ in rows]
    for (name, n), sh in zip(rows, built.values()):
        assert sh.key == f"layer.linear_qkv.weight.{name}" and sh.global_shape == (n, 64)
        assert sh.replica_id == (0, 0, 0)
    merged = fac.merge_fn({k: v.data.clone() for k, v in built.items()})
    assert torch.equal(merged, w.detach())
    v = torch.rand(F, 1)
    vb = fac.build_fn("opt.v", v, (0, 0, 0), None)
    assert [sh.global_shape for sh in vb.values()] == [(n, 1) for _, n in rows]
    with pytest.raises(ValueError, match="cover"):
        fac.build_fn("bad", torch.zeros(F + 1, 64), (0, 0, 0), None)
