"""The device mesh for each llama-recipes sharding strategy.

FSDP2 shards over the last mesh dimension and replicates over the first, so every strategy is
a (replicate, shard) shape: FULL_SHARD / SHARD_GRAD_OP shard over all ranks, NO_SHARD
replicates over all ranks (shard groups of one), HYBRID_SHARD shards within a group (a node by
default) and replicates across groups.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config.configs import ShardingStrategy
from ..config.errors import ConfigError

REPLICATE, SHARD = "dp_replicate", "dp_shard"


def mesh_shape(strategy: ShardingStrategy, world_size: int, local_world_size: int,
               sharding_group_size: int = 0, replica_group_size: int = 0) -> tuple[int, int]:
    """``(replicas, shards)`` with ``replicas * shards == world_size``."""
    if strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        return 1, world_size
    if strategy == ShardingStrategy.NO_SHARD:
        return world_size, 1
    shard = sharding_group_size or (world_size // replica_group_size if replica_group_size else local_world_size)
    replicas = replica_group_size or (world_size // shard if shard else 0)
    if shard < 1 or replicas < 1 or shard * replicas != world_size:
        raise ConfigError(
            f"HYBRID_SHARD needs sharding_group_size x replica_group_size = world size, but got "
            f"{shard} x {replicas} for {world_size} ranks. Set --fsdp_config.sharding_group_size "
            "(ranks that shard one copy, usually the GPUs of a node) and "
            "--fsdp_config.replica_group_size (number of copies, usually the number of nodes) so "
            "that they multiply to the world size, or leave both at 0 for one shard group per node.")
    return replicas, shard


def build_mesh(fsdp_cfg, *, world_size: int, local_world_size: int, device_type: str) -> DeviceMesh:
    """A 1-D mesh for FULL_SHARD / SHARD_GRAD_OP, a 2-D (replicate, shard) mesh otherwise."""
    replicas, shards = mesh_shape(fsdp_cfg.sharding_strategy, world_size, local_world_size,
                                  fsdp_cfg.sharding_group_size, fsdp_cfg.replica_group_size)
    if replicas == 1:
        return init_device_mesh(device_type, (shards,), mesh_dim_names=(SHARD,))
    return init_device_mesh(device_type, (replicas, shards), mesh_dim_names=(REPLICATE, SHARD))
