"""Independent float64 NumPy batch normalization: the paper, written out.

Ioffe & Szegedy (2015), Algorithm 1 and the backward equations of Section 3,
extended with 0/1 weights (masks) and Batch Renormalization's (r, d)
(Ioffe, 2017). Nothing here imports keras_bn: the tests compare the layer
against this.
"""

from __future__ import annotations

import numpy as np


def _shape(x, feature_axes):
    return [x.shape[i] if i in feature_axes else 1 for i in range(x.ndim)]


def _reduction(x, feature_axes):
    return tuple(i for i in range(x.ndim) if i not in feature_axes)


def param(v, x, feature_axes):
    """Reshapes a per-channel vector (or array over the feature axes)."""
    return np.asarray(v, np.float64).reshape(_shape(x, feature_axes))


def batch_stats(x, feature_axes, w=None):
    """Algorithm 1: per-channel count, mean and biased variance."""
    x = np.asarray(x, np.float64)
    red = _reduction(x, feature_axes)
    w = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape) * 1.0
    m = w.sum(axis=red, keepdims=True)
    mu = (w * x).sum(axis=red, keepdims=True) / m
    var = (w * (x - mu) ** 2).sum(axis=red, keepdims=True) / m
    return m, mu, var


def forward_train(x, feature_axes, gamma, beta, eps, w=None, r=None, d=None):
    """Training-mode output `gamma * (xhat * r + d) + beta`, and stats."""
    x = np.asarray(x, np.float64)
    m, mu, var = batch_stats(x, feature_axes, w)
    xhat = (x - mu) / np.sqrt(var + eps)
    if r is not None:
        xhat = xhat * param(r, x, feature_axes) + param(d, x, feature_axes)
    y = param(gamma, x, feature_axes) * xhat + param(beta, x, feature_axes)
    return y, mu, var


def backward_train(x, dy, feature_axes, gamma, eps, w=None, r=None, d=None):
    """Section 3's gradients, w.r.t. x, gamma and beta (training mode).

    The gradient flows through mu_B and sigma2_B; with a mask, masked-out
    entries are still normalized (so they get the direct term) but do not
    enter the statistics. r and d are constants (stop_gradient).
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red = _reduction(x, feature_axes)
    w = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape) * 1.0
    m, mu, var = batch_stats(x, feature_axes, w)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    g = param(gamma, x, feature_axes)
    rr = 1.0 if r is None else param(r, x, feature_axes)
    dd = 0.0 if d is None else param(d, x, feature_axes)
    dxhat = dy * g * rr
    dvar = np.sum(dxhat * (x - mu), axis=red, keepdims=True) * -0.5 * inv**3
    dmu = np.sum(dxhat * -inv, axis=red, keepdims=True) + dvar * np.sum(
        w * -2.0 * (x - mu), axis=red, keepdims=True
    ) / m
    dx = dxhat * inv + w * (dvar * 2.0 * (x - mu) / m + dmu / m)
    dgamma = np.sum(dy * (xhat * rr + dd), axis=red)
    dbeta = np.sum(dy, axis=red)
    return dx, dgamma, dbeta


def forward_infer(x, feature_axes, gamma, beta, mean, variance, eps):
    x = np.asarray(x, np.float64)
    p = lambda v: param(v, x, feature_axes)  # noqa: E731
    return p(gamma) * (x - p(mean)) / np.sqrt(p(variance) + eps) + p(beta)


def backward_infer(x, dy, feature_axes, gamma, mean, variance, eps):
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red = _reduction(x, feature_axes)
    p = lambda v: param(v, x, feature_axes)  # noqa: E731
    inv = 1.0 / np.sqrt(p(variance) + eps)
    dx = dy * p(gamma) * inv
    dgamma = np.sum(dy * (x - p(mean)) * inv, axis=red)
    dbeta = np.sum(dy, axis=red)
    return dx, dgamma, dbeta


def ema(old, new, momentum):
    """Keras's moving average: `old * momentum + new * (1 - momentum)`."""
    return np.asarray(old, np.float64) * momentum + np.asarray(
        new, np.float64
    ) * (1.0 - momentum)


def pytorch_running(running_mean, running_var, mu, var, n, factor):
    """PyTorch's update of its running statistics (`torch.nn.BatchNorm*d`).

    `mu`, `var`: the batch's mean and biased variance per channel, over `n`
    values each; `factor` is PyTorch's `momentum` (Keras's `1 - momentum`),
    or `1 / num_batches_tracked` (counted after incrementing) for
    `momentum=None`. The running variance moves towards the unbiased batch
    variance `var * n / (n - 1)`; normalization uses the biased one.
    """
    f = np.float64(factor)
    n = np.asarray(n, np.float64)
    unbiased = np.asarray(var, np.float64) * n / (n - 1.0)
    return ((1.0 - f) * np.asarray(running_mean, np.float64)
            + f * np.asarray(mu, np.float64),
            (1.0 - f) * np.asarray(running_var, np.float64) + f * unbiased)


def renorm_correction(mu, var, renorm_mean, renorm_stddev, eps, clipping):
    """Batch Renormalization's r and d, from the moving values before update.

    `renorm_stddev` is floored at sqrt(eps), as Keras does early in training.
    """
    sigma_b = np.sqrt(var + eps)
    sigma = np.maximum(renorm_stddev, np.sqrt(eps))
    r = sigma_b / sigma
    d = (mu - renorm_mean) / sigma
    if "rmin" in clipping:
        r = np.maximum(r, clipping["rmin"])
    if "rmax" in clipping:
        r = np.minimum(r, clipping["rmax"])
    if "dmax" in clipping:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    return r, d


def assert_close(actual, expected, tol=1e-5, what=""):
    """Max abs error within `tol` times the reference's scale (at least 1)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


def channel_constant_mask(shape, feature_axes, rng, keep=0.65):
    """A random mask constant along the feature axes, in two forms.

    Returns `(mask, w)`: `mask` as the layer takes it (rank `rank - 1`,
    Keras's convention, when the only feature axis is the last; the input's
    rank with size 1 at a single other feature axis; the input's shape
    without the feature axes when there are several) and `w`, its float64
    0/1 weights broadcast to `shape`. Every channel keeps the first value.
    """
    rank = len(shape)
    kept = [d for i, d in enumerate(shape) if i not in feature_axes]
    mask = rng.uniform(size=kept) < keep
    mask.flat[0] = True
    w = mask
    for a in feature_axes:
        w = np.expand_dims(w, a)
    if tuple(feature_axes) != (rank - 1,) and len(feature_axes) == 1:
        mask = w  # rank - 1 would be read the Keras way, at the last axis
    return mask, np.broadcast_to(w, shape).astype(np.float64)


def keras_mask_weights(mask, shape):
    """Keras's reading of a rank `rank - 1` mask: expanded at the last
    axis, broadcast, nonzero counts as True; float64 0/1 weights."""
    w = np.expand_dims(np.asarray(mask) != 0, -1)
    return np.broadcast_to(w, shape).astype(np.float64)


def assert_training_call(result, x, dy, feature_axes, weights, eps,
                         momentum, tol=1e-5):
    """A training call's `_execution.Result` against this module: outputs
    and dx within `tol`, d gamma / d beta and the moving statistics
    (Keras's EMA with `momentum` from `weights`' values) within 1e-5."""
    y_ref, mu, var = forward_train(x, feature_axes, weights["gamma"],
                                   weights["beta"], eps)
    dx_ref, dgamma_ref, dbeta_ref = backward_train(
        x, dy, feature_axes, weights["gamma"], eps)
    assert_close(result.outputs, y_ref, tol=tol, what="outputs")
    assert_close(result.dx, dx_ref, tol=tol, what="d inputs")
    assert_close(result.grads["gamma"], dgamma_ref, what="d gamma")
    assert_close(result.grads["beta"], dbeta_ref, what="d beta")
    for name, batch in (("moving_mean", mu), ("moving_variance", var)):
        assert_close(result.moving[name],
                     ema(weights[name], batch.ravel(), momentum), what=name)
