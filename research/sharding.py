"""The device mesh and how arrays lie on it: a batch's rows split over the ``data`` axis, the
train state replicated.

One code path serves one CPU, eight forced host devices, all GPUs of a host, or many hosts
(``jax.distributed``): each process holds its own rows of a batch (``data.process_rows``).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from research.errors import ConfigError


def make_mesh(cfg) -> jax.sharding.Mesh:
    """A one-axis (``data``) mesh of ``cfg.data`` devices, -1 or None: all visible ones."""
    n = cfg.get("data", -1)
    n = jax.device_count() if n in (-1, None) else n
    if n > jax.device_count():
        raise ConfigError(f"mesh.data={n} but only {jax.device_count()} devices are visible.")
    # Auto axes: XLA propagates the batch sharding through the model (dropout masks, BN means).
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, P())


def rows(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A batch's leading axis split over the mesh's devices."""
    return NamedSharding(mesh, P("data"))


def global_batch(mesh: jax.sharding.Mesh, *arrays) -> tuple[jax.Array, ...]:
    """Host-local rows → arrays sharded by ``rows(mesh)``: the global batch is every
    process's rows in process order."""
    return tuple(jax.make_array_from_process_local_data(rows(mesh), a) for a in arrays)
