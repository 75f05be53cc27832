"""Device mesh, logical-axis rules and the helpers that turn them into shardings.

Every parameter and key activation in sora_jax carries *logical* axis names
("embed", "mlp", "heads", "activation_batch", ...). The config maps those names
onto the physical mesh axes ("data", "fsdp", "tensor", "sequence"), as MaxText
does, so one model file runs unchanged on 1 CPU, 8 fake devices or a pod.

Since JAX 0.9 `jax.make_mesh` defaults to Explicit axis types; logical rules and
`with_sharding_constraint` need Auto axes, so we always pass them explicitly.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
# The first matching rule wins, so a name may be listed twice as a fallback.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_kv", None),
    ("activation_text_length", None),
    # VAE activations shard spatially over "sequence" when it is > 1.
    ("activation_frames", None),
    ("activation_height", "sequence"),
    ("activation_width", None),
    ("activation_channels", None),
    # Parameters: FSDP shards the embedding dim, tensor parallelism the MLP/heads.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("kernel_t", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("norm", None),
)


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a config mesh like {data: -1, fsdp: 2} into a full shape.

    -1 means "the rest of the devices"; at most one axis may use it. Missing axes are 1.
    """
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(axes)}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {dict(axes)}: {num_devices} devices are not divisible by {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh {dict(axes)} needs {int(np.prod(sizes))} devices but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds the (data, fsdp, tensor, sequence) mesh with Auto axis types."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(dict(axes or {"data": -1}), len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Normalises config rules (lists from ml_collections) into hashable tuples."""
    out = []
    for name, target in rules:
        if isinstance(target, (list, tuple)):
            target = tuple(target)
        out.append((str(name), target))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> P:
    """Maps a tuple of logical names to a PartitionSpec, never using a mesh axis twice."""
    table: dict[str, Any] = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = target if isinstance(target, tuple) else (target,) if target else ()
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def logical_sharding(mesh, names: Sequence[str | None], rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def state_shardings(abstract_state: Any, mesh) -> Any:
    """NamedShardings for an nnx.State whose variables carry logical annotations.

    Call under `nnx.logical_axis_rules(rules)` so names resolve to mesh axes.
    """
    specs = nnx.get_partition_spec(abstract_state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    # get_partition_spec gives empty subtrees (optax's MaskedNode for the parameters a
    # masked or partitioned optimizer skips) a spec of their own: keep them empty, so the
    # shardings have the state's structure.
    return jax.tree.map(lambda node, s: node if _is_empty(node) else s, abstract_state, shardings, is_leaf=_is_empty)


def _is_empty(node) -> bool:
    return node is not None and not jax.tree.leaves(node)


def _active_rules():
    """The rules set by nnx.logical_axis_rules(...), or None outside a mesh or without rules."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    from flax.core import spmd

    return spmd.get_logical_axis_rules() or None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh (plain CPU use) or
    without logical rules (a bare mesh has no meaning for the names; replicating would be wrong)."""
    rules = _active_rules()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(names), rules))


def gather_for_compute(w: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains a parameter to its sharding minus the batch's mesh axes, right before use.

    This is FSDP (ZeRO-3) spelled out: a weight is *stored* sharded over "fsdp" but
    *used* whole along that axis, while the activations stay sharded over the batch.
    It is also a workaround for an XLA SPMD partitioner miscompile (jax/jaxlib 0.10.2,
    Shardy and GSPMD alike): for x[B, K] @ w[K, N] with B over ("data", "fsdp"), K over
    "tensor" in both operands, N of w over "fsdp" and the result wanted as
    [B over ("data", "fsdp"), N over "tensor"], the partitioner collective-permutes
    x's batch shards into ("fsdp", "data") device order but labels the product with
    the original order, so batch rows 1 and 2 (of 4 shards) swap silently. Every
    ("mlp", "embed") kernel (attention out, MLP fc2) hits this on mesh data=2, fsdp=2,
    tensor=2 once activations are constrained to the batch sharding. Gathering the
    fsdp axis first leaves the partitioner only the correct plan (it all-gathers w
    over fsdp in the buggy plan too, so this costs nothing). Repro: docs/dit.md.
    """
    rules = _active_rules()
    if rules is None:
        return w
    batch_axes = logical_to_spec(("activation_batch",), rules)[0]
    batch_axes = set(batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ())
    spec = []
    for entry in logical_to_spec(tuple(names), rules):
        axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,) if entry else ()) if a not in batch_axes)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return jax.lax.with_sharding_constraint(w, P(*spec))


def partitioned(init_fn, names: Sequence[str | None]):
    """Attaches logical names to an initializer (params become sharded variables)."""
    return nnx.with_partitioning(init_fn, tuple(names))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh, rules, axes: Mapping[str, Sequence[str | None]]) -> dict:
    """Builds global jax.Arrays from this process's slice of the batch.

    `axes[key]` gives the logical names of each batch entry (first one normally
    "activation_batch"). Each process holds only its own rows; the result is one
    global array per key, sharded over data and fsdp.
    """
    out = {}
    for key, value in local_batch.items():
        names = tuple(axes.get(key, ("activation_batch",)))
        names = names + (None,) * (np.ndim(value) - len(names))
        sharding = logical_sharding(mesh, names[: np.ndim(value)], rules)
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out
