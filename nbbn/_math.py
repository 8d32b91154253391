"""Per-element math shared by the CPU and CUDA kernels, written once as plain Python.

Each function here uses only operations both Numba targets compile (``math``,
not ``numpy`` ufuncs: ``np.isfinite`` has no CUDA lowering). CPU kernels call
them as they are: ``_cpu/_jit.py`` registers each as a Numba overload of
itself, compiled without fastmath wherever a kernel calls it (so they may call
each other too). The CUDA backend compiles each as a device function whose
globals are the device versions of the others, and ``fma`` as ``cuda.fma``
(``_cuda/launch.py``).

Double-doubles: the statistics carry a mean as an unevaluated sum ``hi + lo``
of two float64 (``hi`` the float64 nearest to the sum, about 106 bits in all),
kept exact by error-free transformations (TwoSum, the FMA remainder). These are
exact only as written: compiled with reassociation or contraction the compiler
would cancel the compensation (``(a + b) - a`` is ``b`` to it), hence strict builds.
``fma`` is the one primitive each backend supplies (the hardware instruction).
The functions without ``fma`` (``two_sum``, ``dd_add``) also work elementwise on
NumPy arrays (``Moments.merge``).
"""
import math
from fractions import Fraction


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, m2) states (Chan et al.); exact for unequal counts and count 0
    (pooled batches' statistics, ``merge``)."""
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    if delta == 0:  # exact for constant data
        mean = mean_a
    elif math.isfinite(delta):  # weights <= 1: no overflow near the float64 limit
        mean = mean_a + delta * (n_b / n)
    else:  # inf/nan data: NumPy's (sum / n) semantics
        mean = (n_a * mean_a + n_b * mean_b) / n
    return n, mean, m2_a + m2_b + delta * delta * (n_a * n_b / n)


def fma(a, b, c):
    """``a * b + c`` rounded once.

    Each backend compiles calls to this name as the hardware instruction (the
    CPU one in ``_cpu/_jit.py``); this body, exact rational arithmetic, is what
    runs where Python itself runs the kernels (the CUDA simulator).
    """
    if math.isfinite(a) and math.isfinite(b) and math.isfinite(c):
        return float(Fraction(a) * Fraction(b) + Fraction(c))
    return a * b + c


def two_sum(a, b):
    """(s, e): s = a + b rounded, and a + b = s + e exactly (Knuth's TwoSum)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def quotient(num, den):
    """num / den as a double-double (hi, lo): hi rounded, lo from the exact remainder."""
    hi = num / den
    return hi, fma(-hi, den, num) / den


def dd_add(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as a normalized double-double."""
    s, e = two_sum(a_hi, b_hi)
    return two_sum(s, e + (a_lo + b_lo))


def accumulate(hi, lo, value):
    """A double-double sum hi + lo with ``value`` added (lo not renormalized). A sum that
    became inf (inf data, or an overflow) stays inf: its error term, nan, is dropped."""
    s, e = two_sum(hi, value)
    if not math.isfinite(s):
        return s, lo
    return s, lo + e


def shifted_moments(n, k, s1_hi, s1_lo, s2_hi, s2_lo):
    """(mean hi, mean lo, m2) of n values from their sums shifted by k, double-doubles
    ``s1 = sum(x - k)`` and ``s2 = sum((x - k)**2)``.

    The mean ``k + s1 / n`` is exact to double-double accuracy (the FMA
    remainder of the division). ``m2 = s2 - s1**2 / n`` is rounded once (an FMA)
    where the cancellation is: exact for exact sums (integer or constant data);
    otherwise the sums' own rounding errors, in units of s2, are what remains,
    so k should lie near the data (s2 not much larger than m2).
    """
    q_hi = s1_hi / n
    q_lo = (fma(-q_hi, n, s1_hi) + s1_lo) / n
    mean_hi, mean_lo = dd_add(k, 0.0, q_hi, q_lo)
    m2 = (fma(-s1_hi, q_hi, s2_hi) + s2_lo) - (s1_hi * q_lo + s1_lo * q_hi)
    return mean_hi, mean_lo, m2


def chan_merge_dd(n_a, a_hi, a_lo, m2_a, n_b, b_hi, b_lo, m2_b):
    """Chan et al.'s merge of two (count, mean, m2) states whose means are double-doubles.

    The mean moves by ``delta * n_b / n``, computed to double-double accuracy
    (an FMA product and remainder), so a chain of merges keeps the mean exact
    to about 2**-100 relative: correctly rounded at the end. Equal means give
    ``delta == 0`` exactly (constant data stays exact). Where the means' difference is
    not finite (inf/nan data, or means near the float64 limit), the mean is NumPy's
    weighted sum (weights <= 1: no overflow) and m2 what float64 makes of Chan's term.
    """
    if n_b == 0:
        return n_a, a_hi, a_lo, m2_a
    if n_a == 0:
        return n_b, b_hi, b_lo, m2_b
    n = n_a + n_b
    d_hi, d_lo = dd_add(b_hi, b_lo, -a_hi, -a_lo)
    if not math.isfinite(d_hi):
        delta = b_hi - a_hi
        return (n, a_hi * (n_a / n) + b_hi * (n_b / n), 0.0,
                m2_a + m2_b + delta * delta * (n_a * (n_b / n)))
    p_hi = d_hi * n_b                                  # delta * n_b, exactly as p_hi + p_lo
    p_lo = fma(d_hi, n_b, -p_hi) + d_lo * n_b
    s_hi, s_lo = quotient(p_hi, n)                     # ... / n
    m_hi, m_lo = dd_add(a_hi, a_lo, s_hi, s_lo + p_lo / n)
    return n, m_hi, m_lo, m2_a + m2_b + d_hi * d_hi * (n_a * (n_b / n))


def renorm_factors(mean, var, running_mean, running_var, rmax, dmax, eps):
    """Batch renorm's (r, d) of one channel (Ioffe 2017) from the batch's mean and biased
    variance and the running buffers: r = clip(sigma_b / sigma, 1/rmax, rmax),
    d = clip((mean - running_mean) / sigma, -dmax, dmax). NaN stays NaN (no clipping)."""
    sigma = math.sqrt(running_var + eps)
    r = math.sqrt(var + eps) / sigma
    if r > rmax:
        r = rmax
    elif r < 1.0 / rmax:
        r = 1.0 / rmax
    d = (mean - running_mean) / sigma
    if d > dmax:
        d = dmax
    elif d < -dmax:
        d = -dmax
    return r, d


def pooled_variance(vbar_a, n, n_b, var_b):
    """The count-weighted mean of batches' unbiased variances, vbar_a over the batches so far,
    with one more batch folded in (n_b values, biased variance var_b; n values in all)."""
    if n_b == 0:
        return vbar_a
    return vbar_a + (var_b * (n_b / (n_b - 1)) - vbar_a) * (n_b / n)


def affine_coefficients(mean, var, weight, bias, eps):
    """(scale, shift) of batch norm as ``x * scale + shift``: ``scale = weight / sqrt(var +
    eps)`` as ``(1 / sqrt(var + eps)) * weight``, ``shift = bias - mean * scale``, each
    operation rounded as NumPy rounds it elementwise (no fused multiply-add)."""
    scale = (1.0 / math.sqrt(var + eps)) * weight
    return scale, bias - mean * scale


def grad_coefficients(var, weight, eps, sum_dy, sum_dy_xmu, count):
    """(G, H, K, 1 / sqrt(var + eps)) of the training backward's ``dx = G * dy + H * (x -
    mean) + K``, the gradients of the batch mean and variance folded in; rounded as NumPy
    rounds ``-g * invstd * invstd * sum_dy_xmu / count`` and ``-g * sum_dy / count``."""
    return grad_of_std(math.sqrt(var + eps), weight, sum_dy, sum_dy_xmu, count, 0.0)


def grad_of_std(std, weight, sum_dy, sum_dy_xmu, count, inverse):
    """``grad_coefficients`` from ``std = sqrt(var + eps)``, the divisions by count as
    ``per_count``'s."""
    invstd = 1.0 / std
    g = invstd * weight
    return (g, per_count(-g * invstd * invstd * sum_dy_xmu, count, inverse),
            per_count(-g * sum_dy, count, inverse), invstd)


def per_count(value, count, inverse):
    """``value / count``: as ``value * inverse`` where ``inverse`` is 1 / count, exact (count a
    power of two: the same correctly rounded result without a division, the slowest step of
    a loop of coefficients); divided where it is 0."""
    if inverse != 0.0:
        return value * inverse
    return value / count


def exact_inverse(count):
    """1 / count (a positive integer) where that is exact (a power of two), else 0
    (``per_count``)."""
    return 1.0 / count if count & (count - 1) == 0 else 0.0
