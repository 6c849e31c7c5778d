"""One distributed training-mode call of the layer, on the current engine.

Run as `python -m tests.distributed_worker OUT.npz SYNC SIZES [GROUP]` in
a fresh process (or `OUT.npz sync_moving WORLD` for `sync_moving_statistics`
over WORLD gloo ranks) (the engines need their devices set before they start):
`tf.distribute.MirroredStrategy` over logical CPUs, `keras.distribution`
DataParallel over forced host devices (JAX), or `torch.distributed` with
gloo over processes. SIZES is the per-replica batch sizes, e.g. `9,7`; GROUP, if given, is
`synchronized_group_size`.
Writes the replicas' outputs and input gradients in global batch order, the
summed gamma/beta gradients, and each replica's moving statistics.
"""

from __future__ import annotations

import os
import sys

import numpy as np

MOMENTUM = 0.5
SHAPE = (5, 3)  # per-sample shape; channels last


def global_batch(total: int):
    """Inputs whose per-channel mean is up to 1e4 x their std, and dy."""
    rng = np.random.default_rng(0)
    std = np.array([1.0, 0.05, 3.0])
    x = rng.normal(size=(total,) + SHAPE) * std + np.array([1e4, -2e2, 0.5]) * std
    dy = rng.normal(size=(total,) + SHAPE)
    gamma = rng.uniform(0.5, 1.5, SHAPE[-1])
    beta = rng.normal(size=SHAPE[-1])
    return x.astype("float32"), dy.astype("float32"), gamma, beta


def _layer(sync: bool, group: int | None):
    import keras

    import keras_bn

    if group is None:
        layer = keras_bn.BatchNormalization(
            momentum=MOMENTUM, synchronized=sync, epsilon=1e-3)
    else:  # as a user would group a model's Keras layers
        layer = keras_bn.convert(
            keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=1e-3),
            synchronized=sync, synchronized_group_size=group)
    layer.build((None,) + SHAPE)
    return layer


def _set_affine(layer, gamma, beta):
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))


def run_tensorflow(sync, sizes, group):
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * len(sizes))
    devices = [f"/cpu:{i}" for i in range(len(sizes))]
    strategy = tf.distribute.MirroredStrategy(devices)
    x, dy, gamma, beta = global_batch(sum(sizes))
    bounds = np.cumsum(sizes)[:-1]
    xs, dys = np.split(x, bounds), np.split(dy, bounds)
    with strategy.scope():
        layer = _layer(sync, group)
        _set_affine(layer, gamma, beta)
    per_replica = lambda parts: strategy.experimental_distribute_values_from_function(  # noqa
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))

    @tf.function
    def step(xv, dyv):
        def fn(xv, dyv):
            with tf.GradientTape() as tape:
                tape.watch(xv)
                y = layer(xv, training=True)
                loss = tf.reduce_sum(y * dyv)
            dx, dg, db = tape.gradient(loss, [xv, layer.gamma, layer.beta])
            return y, dx, dg, db
        return strategy.run(fn, args=(xv, dyv))

    y, dx, dg, db = step(per_replica(xs), per_replica(dys))
    local = strategy.experimental_local_results
    return dict(
        y=np.concatenate([t.numpy() for t in local(y)]),
        dx=np.concatenate([t.numpy() for t in local(dx)]),
        dgamma=np.sum([t.numpy() for t in local(dg)], axis=0),
        dbeta=np.sum([t.numpy() for t in local(db)], axis=0),
        moving_mean=np.stack([v.numpy() for v in layer.moving_mean.value.values]),
        moving_variance=np.stack(
            [v.numpy() for v in layer.moving_variance.value.values]),
    )


def run_jax(sync, sizes, group):
    if len(set(sizes)) != 1:
        raise ValueError("GSPMD shards a global array evenly")
    import jax
    import jax.numpy as jnp
    import keras

    devices = jax.devices()[: len(sizes)]
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    x, dy, gamma, beta = global_batch(sum(sizes))
    layer = _layer(sync, group)
    _set_affine(layer, gamma, beta)
    sharding = jax.sharding.NamedSharding(
        distribution.device_mesh.backend_mesh,
        jax.sharding.PartitionSpec(distribution.batch_dim_name))
    xs = jax.device_put(jnp.asarray(x), sharding)
    dys = jax.device_put(jnp.asarray(dy), sharding)

    @jax.jit
    def step(xv, dyv, trainable, non_trainable):
        def loss_fn(xv, trainable):
            y, new = layer.stateless_call(trainable, non_trainable, xv,
                                          training=True)
            return jnp.sum(y * dyv), (y, new)
        (_, (y, new)), grads = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(xv, trainable)
        return y, grads, new

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    y, (dx, (dg, db)), new = step(xs, dys, trainable, non_trainable)
    names = [v.name for v in layer.non_trainable_variables]
    state = dict(zip(names, (np.asarray(v) for v in new)))
    return dict(y=np.asarray(y), dx=np.asarray(dx), dgamma=np.asarray(dg),
                dbeta=np.asarray(db), moving_mean=state["moving_mean"][None],
                moving_variance=state["moving_variance"][None])


def _torch_rank(rank, world, sync, sizes, group, store_path, out_prefix):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"file://{store_path}")
    try:
        x, dy, gamma, beta = global_batch(sum(sizes))
        bounds = np.cumsum(sizes)[:-1]
        xs, dys = np.split(x, bounds)[rank], np.split(dy, bounds)[rank]
        layer = _layer(sync, group)
        _set_affine(layer, gamma, beta)
        xt = torch.tensor(xs, requires_grad=True)
        y = layer(xt, training=True)
        loss = (y * torch.tensor(dys)).sum()
        loss.backward()
        np.savez(f"{out_prefix}{rank}.npz", y=y.detach().numpy(),
                 dx=xt.grad.numpy(), dgamma=layer.gamma.value.grad.numpy(),
                 dbeta=layer.beta.value.grad.numpy(),
                 moving_mean=layer.moving_mean.numpy(),
                 moving_variance=layer.moving_variance.numpy())
    finally:
        dist.destroy_process_group()


def run_torch(sync, sizes, group, out):
    import torch.multiprocessing as mp

    store = out + ".store"
    if os.path.exists(store):
        os.remove(store)
    mp.spawn(_torch_rank,
             args=(len(sizes), sync, sizes, group, store, out + ".rank"),
             nprocs=len(sizes), join=True)
    parts = [dict(np.load(f"{out}.rank{r}.npz")) for r in range(len(sizes))]
    return dict(
        y=np.concatenate([p["y"] for p in parts]),
        dx=np.concatenate([p["dx"] for p in parts]),
        dgamma=np.sum([p["dgamma"] for p in parts], axis=0),
        dbeta=np.sum([p["dbeta"] for p in parts], axis=0),
        moving_mean=np.stack([p["moving_mean"] for p in parts]),
        moving_variance=np.stack([p["moving_variance"] for p in parts]),
    )


def moving_statistics_of_rank(rank: int):
    """The moving statistics rank `rank` holds before `sync_moving_statistics`
    (different on every rank, as after unsynchronized training): our
    layer's (C=3) and a Keras layer's (C=2)."""
    rng = np.random.default_rng(100 + rank)
    return (rng.normal(size=3) * 5, rng.uniform(0.5, 3.0, 3),
            rng.normal(size=2), rng.uniform(0.1, 1.0, 2))


def _torch_sync_rank(rank, world, store_path, out_prefix):
    import keras
    import torch.distributed as dist

    import keras_bn

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            init_method=f"file://{store_path}")
    try:
        inputs = keras.Input((3,))
        h = keras_bn.BatchNormalization(name="ours")(inputs)
        h = keras.layers.Dense(2)(h)
        model = keras.Model(inputs, keras.layers.BatchNormalization(
            name="theirs")(h))
        m1, v1, m2, v2 = moving_statistics_of_rank(rank)
        for name, m, v in (("ours", m1, v1), ("theirs", m2, v2)):
            layer = model.get_layer(name)
            layer.moving_mean.assign(m.astype("float32"))
            layer.moving_variance.assign(v.astype("float32"))
        count = keras_bn.sync_moving_statistics(model)
        np.savez(f"{out_prefix}{rank}.npz", count=count, **{
            f"{name}_{stat}": keras.ops.convert_to_numpy(
                getattr(model.get_layer(name), f"moving_{stat}"))
            for name in ("ours", "theirs") for stat in ("mean", "variance")})
    finally:
        dist.destroy_process_group()


def run_torch_sync(world: int, out: str):
    import torch.multiprocessing as mp

    store = out + ".store"
    if os.path.exists(store):
        os.remove(store)
    mp.spawn(_torch_sync_rank, args=(world, store, out + ".rank"),
             nprocs=world, join=True)
    parts = [dict(np.load(f"{out}.rank{r}.npz")) for r in range(world)]
    np.savez(out, **{key: np.stack([p[key] for p in parts])
                     for key in parts[0]})


def main(out: str, sync: bool, sizes: list[int], group: int | None) -> None:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        result = run_tensorflow(sync, sizes, group)
    elif backend == "jax":
        result = run_jax(sync, sizes, group)
    else:
        result = run_torch(sync, sizes, group, out)
    np.savez(out, **result)


if __name__ == "__main__":
    if sys.argv[2] == "sync_moving":  # OUT sync_moving WORLD (torch)
        run_torch_sync(int(sys.argv[3]), sys.argv[1])
        sys.exit()
    if os.environ.get("KERAS_BACKEND") == "jax":
        count = len(sys.argv[3].split(","))
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={count}")
    main(sys.argv[1], sys.argv[2] == "1", [int(s) for s in sys.argv[3].split(",")],
         int(sys.argv[4]) if len(sys.argv) > 4 else None)
