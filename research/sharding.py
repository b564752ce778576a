"""The device mesh and how arrays lie on it: a batch's rows split over all devices (the
``data`` and ``fsdp`` axes), the train state replicated, or with ``mesh.fsdp`` > 1 sharded over
the ``fsdp`` axis (``state_shardings``).

One code path serves one CPU, eight forced host devices, all GPUs of a host, or many hosts
(``jax.distributed``): each process holds its own rows of a batch (``data.process_rows``).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from research.errors import ConfigError

AXES = ("data", "fsdp")


def make_mesh(cfg) -> jax.sharding.Mesh:
    """A ``data`` × ``fsdp`` mesh: ``cfg.fsdp`` devices (default 1) share each parameter's
    shards, ``cfg.data`` (-1 or None: all the others) hold copies of them."""
    fsdp = cfg.get("fsdp", 1)
    if fsdp < 1 or jax.device_count() % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} must be a positive divisor of the "
                          f"{jax.device_count()} visible devices.")
    n = cfg.get("data", -1)
    n = jax.device_count() // fsdp if n in (-1, None) else n
    if n * fsdp > jax.device_count():
        raise ConfigError(f"mesh.data={n} × mesh.fsdp={fsdp} but only {jax.device_count()} "
                          "devices are visible.")
    # Auto axes: XLA propagates the batch sharding through the model (dropout masks, BN means).
    return jax.make_mesh((n, fsdp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n * fsdp])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array (metrics; parameters and optimizer state where
    ``fsdp`` is 1)."""
    return NamedSharding(mesh, P())


def rows(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A batch's leading axis split over all the mesh's devices (both axes)."""
    return NamedSharding(mesh, P(AXES))


def fsdp_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An array of ``shape`` split over the ``fsdp`` axis along its largest dimension that the
    axis size divides (the first of equals), or replicated where none does or fsdp is 1."""
    size = mesh.shape["fsdp"]
    divisible = [d for d in range(len(shape)) if shape[d] % size == 0]
    if size == 1 or not divisible:
        return replicated(mesh)
    axis = max(divisible, key=lambda d: (shape[d], -d))
    return NamedSharding(mesh, P(*[None] * axis, "fsdp"))


def state_shardings(mesh: jax.sharding.Mesh, tree):
    """``fsdp_sharding`` of each array of ``tree`` (a train state: parameters, optimizer
    state, BatchNorm statistics, step and RNG)."""
    return jax.tree.map(lambda a: fsdp_sharding(mesh, a.shape), tree)


def global_batch(mesh: jax.sharding.Mesh, *arrays) -> tuple[jax.Array, ...]:
    """Host-local rows → arrays sharded by ``rows(mesh)``: the global batch is every
    process's rows in process order."""
    return tuple(jax.make_array_from_process_local_data(rows(mesh), a) for a in arrays)
