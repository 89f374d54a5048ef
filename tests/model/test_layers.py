"""Tensor-parallel shards: each rank's ``weight_loader`` cuts its slice of a full tensor."""

from __future__ import annotations

import pytest
import torch

from yaie.model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def _load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard_id=None) -> torch.Tensor:
    param = getattr(layer, name)
    layer.weight_loader(param, tensor, shard_id)
    return param.data


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_and_row_shards_reassemble_the_full_weight(tp_size: int) -> None:
    w, b = torch.randn(8, 12), torch.randn(8)
    col = [ColumnParallelLinear(12, 8, bias=True, tp_size=tp_size, tp_rank=r)
           for r in range(tp_size)]
    assert torch.equal(torch.cat([_load(c, "weight", w) for c in col]), w)
    assert torch.equal(torch.cat([_load(c, "bias", b) for c in col]), b)
    w_row = torch.randn(8, 12)
    row = [RowParallelLinear(12, 8, bias=True, tp_size=tp_size, tp_rank=r)
           for r in range(tp_size)]
    assert torch.equal(torch.cat([_load(r, "weight", w_row) for r in row], dim=1), w_row)
    assert all(torch.equal(_load(r, "bias", b), b) for r in row)  # whole, added once


@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_gate_up_shards(tp_size: int) -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    for rank in range(tp_size):
        layer = MergedColumnParallelLinear(4, [6, 6], tp_size=tp_size, tp_rank=rank)
        _load(layer, "weight", gate, 0)
        _load(layer, "weight", up, 1)
        n = 6 // tp_size
        expected = torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]])
        assert torch.equal(layer.weight.data, expected)


@pytest.mark.parametrize(("tp_size", "num_kv_heads"), [(1, 2), (2, 2), (4, 2)])
def test_qkv_shards_and_kv_head_replication(tp_size: int, num_kv_heads: int) -> None:
    head_dim, num_heads, hidden = 2, 4, 6
    q = torch.randn(num_heads * head_dim, hidden)
    k = torch.randn(num_kv_heads * head_dim, hidden)
    v = torch.randn(num_kv_heads * head_dim, hidden)
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads,
                                  tp_size=tp_size, tp_rank=rank)
        for shard_id, tensor in (("q", q), ("k", k), ("v", v)):
            _load(layer, "weight", tensor, shard_id)
        q_rows = num_heads // tp_size * head_dim
        kv_head = rank * num_kv_heads // tp_size  # ranks sharing a KV head hold the same one
        kv_rows = max(1, num_kv_heads // tp_size) * head_dim
        kv_start = kv_head * head_dim
        expected = torch.cat([
            q[rank * q_rows : (rank + 1) * q_rows],
            k[kv_start : kv_start + kv_rows],
            v[kv_start : kv_start + kv_rows],
        ])
        assert torch.equal(layer.weight.data, expected)


def test_vocab_shards_and_tied_head() -> None:
    table = torch.randn(8, 3)
    shards = [VocabParallelEmbedding(8, 3, tp_size=2, tp_rank=r) for r in range(2)]
    assert torch.equal(torch.cat([_load(s, "weight", table) for s in shards]), table)
    head = ParallelLMHead(8, 3)
    head.tie(shards[0])
    assert head.weight is shards[0].weight


def test_indivisible_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 2"):
        ColumnParallelLinear(4, 7, tp_size=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(ColumnParallelLinear(4, 6), "weight", torch.randn(6, 5))


def _tp_worker(rank: int, world: int, init_file: str) -> None:
    """One rank of a 2-way tensor-parallel MLP, embedding and LM head vs the unsharded math;
    a failed assertion here fails the test through ``start_processes``."""
    import torch.distributed as dist

    from yaie.kernels import silu_and_mul

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same full tensors on every rank
        hidden, inter, vocab = 8, 12, 10
        gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
        down, down_bias = torch.randn(hidden, inter), torch.randn(hidden)
        table = torch.randn(vocab, hidden)
        x, ids = torch.randn(3, hidden), torch.tensor([0, 4, 5, 9])

        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], tp_size=world, tp_rank=rank)
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        down_proj = RowParallelLinear(inter, hidden, bias=True, tp_size=world, tp_rank=rank)
        down_proj.weight_loader(down_proj.weight, down)
        down_proj.weight_loader(down_proj.bias, down_bias)
        embed = VocabParallelEmbedding(vocab, hidden, tp_size=world, tp_rank=rank)
        embed.weight_loader(embed.weight, table)
        head = ParallelLMHead(vocab, hidden, tp_size=world, tp_rank=rank)
        head.tie(embed)
        for layer in (gate_up, down_proj, head):
            layer.pack()

        with torch.no_grad():
            mlp = down_proj(silu_and_mul(gate_up(x)))
            expected_mlp = torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T + down_bias
            torch.testing.assert_close(mlp, expected_mlp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(embed(ids), table[ids])
            torch.testing.assert_close(head(x), x @ table.T, rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()


def test_two_way_tensor_parallel_matches_unsharded(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_tp_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method="spawn")
