"""Synchronized and per-replica statistics on each backend's own engine.

Each case runs tests/distributed_worker.py in a fresh process (TF logical
CPUs, JAX forced host devices, torch gloo processes) and compares with the
float64 NumPy reference of one device seeing the whole global batch (or each
replica's own batch, for synchronized=False).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_bn
from tests import reference as ref
from tests.distributed_worker import MOMENTUM, global_batch
from tests.distributed_worker import moving_statistics_of_rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
# GSPMD (JAX) shards a global array evenly; the others take any split.
UNEVEN = (8, 8) if BACKEND == "jax" else (9, 7)


def _run_worker(tmp_path, sync, sizes, group=None):
    out = str(tmp_path / "result.npz")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", out, "1" if sync else "0",
         ",".join(map(str, sizes))] + ([str(group)] if group else []),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return dict(np.load(out))


def _expected(groups, gamma, beta, ranks_per_group=1):
    """Reference outputs/gradients/moving statistics for batch `groups`,
    each normalized on its own (one per `ranks_per_group` replicas).

    Where the engine mirrors variables (TF: aggregation="mean"; JAX: one
    global program) the replicas' moving statistics are the average of their
    updates (every group has as many replicas); torch ranks each keep their
    own, their group's, as torch.nn.BatchNorm does.
    """
    ys, dxs, dgs, dbs, means, variances = [], [], [], [], [], []
    for xg, dyg in groups:
        y, mu, var = ref.forward_train(xg, (2,), gamma, beta, 1e-3)
        dx, dg, db = ref.backward_train(xg, dyg, (2,), gamma, 1e-3)
        ys.append(y), dxs.append(dx), dgs.append(dg), dbs.append(db)
        means.append(mu.reshape(-1)), variances.append(var.reshape(-1))
    if BACKEND == "torch":
        means = np.repeat(means, ranks_per_group, axis=0)
        variances = np.repeat(variances, ranks_per_group, axis=0)
    else:
        means, variances = np.mean(means, 0)[None], np.mean(variances, 0)[None]
    return dict(
        y=np.concatenate(ys), dx=np.concatenate(dxs), dgamma=np.sum(dgs, 0),
        dbeta=np.sum(dbs, 0),
        moving_mean=ref.ema(0.0, means, MOMENTUM),
        moving_variance=ref.ema(1.0, variances, MOMENTUM),
    )


def _check(result, expected):
    for key in ("y", "dx", "dgamma", "dbeta"):
        ref.assert_close(result[key], expected[key], tol=1e-5, what=key)
    for key in ("moving_mean", "moving_variance"):
        expected_values = np.broadcast_to(expected[key], result[key].shape)
        np.testing.assert_allclose(result[key], expected_values, rtol=1e-5,
                                   atol=1e-6, err_msg=key)


def test_synchronized_equals_one_device_on_the_global_batch(tmp_path):
    result = _run_worker(tmp_path, True, UNEVEN)
    x, dy, gamma, beta = global_batch(sum(UNEVEN))
    _check(result, _expected([(x, dy)], gamma, beta))


def test_unsynchronized_normalizes_each_replica_on_its_own(tmp_path):
    sizes = (8, 8)
    result = _run_worker(tmp_path, False, sizes)
    x, dy, gamma, beta = global_batch(sum(sizes))
    groups = list(zip(np.split(x, 2), np.split(dy, 2)))
    _check(result, _expected(groups, gamma, beta))


def test_synchronized_groups_pool_consecutive_replicas(tmp_path):
    """4 replicas in groups of 2: each group normalizes its concatenated
    batch (uneven per-replica batches where the engine allows them)."""
    sizes = (4, 4, 4, 4) if BACKEND == "jax" else (5, 3, 6, 2)
    result = _run_worker(tmp_path, True, sizes, group=2)
    x, dy, gamma, beta = global_batch(sum(sizes))
    cut = sizes[0] + sizes[1]
    groups = [(x[:cut], dy[:cut]), (x[cut:], dy[cut:])]
    _check(result, _expected(groups, gamma, beta, ranks_per_group=2))


def test_synchronized_without_distribution_is_plain_batch_norm():
    x, dy, gamma, beta = global_batch(12)
    outputs = []
    for sync in (False, True):
        layer = keras_bn.BatchNormalization(synchronized=sync, momentum=MOMENTUM)
        layer.build(x.shape)
        outputs.append((keras.ops.convert_to_numpy(layer(x, training=True)),
                        keras.ops.convert_to_numpy(layer.moving_variance)))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def test_sync_moving_statistics(tmp_path):
    """torch.distributed: every rank ends with the ranks' pooled statistics
    (mean of means; mean of variances plus variance of means), ours and
    Keras's layers alike. Elsewhere there is one copy: nothing to do."""
    if BACKEND != "torch":
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras_bn.BatchNormalization()(inputs))
        before = keras.ops.convert_to_numpy(model.layers[-1].moving_mean)
        assert keras_bn.sync_moving_statistics(model) == 0
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(model.layers[-1].moving_mean), before)
        return
    world = 4
    out = str(tmp_path / "sync.npz")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.distributed_worker", out, "sync_moving",
         str(world)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = dict(np.load(out))
    assert list(result["count"]) == [2] * world
    ranks = [moving_statistics_of_rank(r) for r in range(world)]
    for name, (m, v) in (("ours", (0, 1)), ("theirs", (2, 3))):
        means = np.array([r[m] for r in ranks], np.float64)
        variances = np.array([r[v] for r in ranks], np.float64)
        # The float32 values each rank held, pooled in float64.
        means = means.astype(np.float32).astype(np.float64)
        variances = variances.astype(np.float32).astype(np.float64)
        pooled_mean = means.mean(0)
        pooled_var = variances.mean(0) + ((means - pooled_mean) ** 2).mean(0)
        for rank in range(world):
            ref.assert_close(result[f"{name}_mean"][rank], pooled_mean,
                             what=f"{name} mean, rank {rank}")
            ref.assert_close(result[f"{name}_variance"][rank], pooled_var,
                             what=f"{name} variance, rank {rank}")


def test_group_size_must_divide_the_replicas(monkeypatch):
    """Checked at the call, where the number of replicas is known."""
    from keras_bn import backends

    monkeypatch.setattr(backends.get(), "num_replicas", lambda: 4)
    x, _, _, _ = global_batch(8)
    layer = keras_bn.BatchNormalization(synchronized=True,
                                        synchronized_group_size=3)
    layer.build(x.shape)
    with pytest.raises(ValueError, match="synchronized_group_size=3.*4 replicas"):
        layer(x, training=True)
