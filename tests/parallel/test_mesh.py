from __future__ import annotations

import pytest

from shardtune.config.configs import ShardingStrategy as S
from shardtune.config.errors import ConfigError
from shardtune.parallel.fsdp import reshard_after_forward
from shardtune.parallel.mesh import mesh_shape


@pytest.mark.parametrize("strategy,expected", [
    (S.FULL_SHARD, (1, 8)), (S.SHARD_GRAD_OP, (1, 8)), (S.NO_SHARD, (8, 1)),
    (S.HYBRID_SHARD, (2, 4)),  # default: shard within a node of 4 ranks, replicate across 2 nodes
])
def test_mesh_shape_per_strategy(strategy, expected):
    assert mesh_shape(strategy, world_size=8, local_world_size=4) == expected


def test_hybrid_group_sizes_from_flags():
    assert mesh_shape(S.HYBRID_SHARD, 8, 8, sharding_group_size=2) == (4, 2)
    assert mesh_shape(S.HYBRID_SHARD, 8, 8, replica_group_size=2) == (2, 4)
    assert mesh_shape(S.HYBRID_SHARD, 8, 8, sharding_group_size=4, replica_group_size=2) == (2, 4)


def test_hybrid_sizes_that_do_not_multiply_to_the_world_are_refused():
    with pytest.raises(ConfigError, match="sharding_group_size x replica_group_size"):
        mesh_shape(S.HYBRID_SHARD, 8, 8, sharding_group_size=3, replica_group_size=2)
    with pytest.raises(ConfigError):
        mesh_shape(S.HYBRID_SHARD, 6, 6, sharding_group_size=4)


def test_reshard_after_forward_follows_llama_recipes_names():
    assert reshard_after_forward(S.FULL_SHARD) and reshard_after_forward(S.HYBRID_SHARD)
    assert not reshard_after_forward(S.SHARD_GRAD_OP) and not reshard_after_forward(S.NO_SHARD)
