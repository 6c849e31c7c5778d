"""torch specifics: cross-replica statistics and fused kernels."""


def cross_replica(count, mean, m2):
    return count, mean, m2
