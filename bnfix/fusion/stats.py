"""Numbers over seeds: means, Student-t intervals, paired differences, Shapley contributions.

No SciPy: the t quantile comes from the regularised incomplete beta function (a continued
fraction, as in Numerical Recipes' ``betacf``), inverted by bisection, accurate to ~1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PAIRED_METRICS",
    "interval",
    "paired",
    "shapley",
    "stats_tree",
    "t_quantile",
]

#: Per-arm numbers compared seed by seed in ``paired`` (name -> path in an arm's summary).
PAIRED_METRICS = {
    "fused": ("test", "fused"),
    "audio": ("test", "audio"),
    "visual": ("test", "visual"),
    "probe_audio": ("probe", "audio"),
    "probe_visual": ("probe", "visual"),
}


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (e.g. 0.975 for a two-sided 95% interval)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got {p}, {df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def _numbers(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if _is_number(v) and math.isfinite(float(v))]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def interval(values: Sequence[Any]) -> dict[str, Any]:
    """``{mean, std, ci95: [lo, hi], n}`` of the numbers among ``values`` (None ignored).

    std is the sample standard deviation (n − 1); ci95 the two-sided 95% Student-t interval
    of the mean, mean ± t(0.975, n − 1)·std/√n. With fewer than two numbers std and ci95 are
    None (one seed gives no interval).
    """
    xs = _numbers(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = math.fsum(xs) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": n}
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def stats_tree(trees: Sequence[Any]) -> Any:
    """The shared structure of ``trees`` (one summary per seed) with each number replaced by
    :func:`interval` over the seeds; strings and other non-numbers are left out."""
    dicts = [t for t in trees if isinstance(t, Mapping)]
    if dicts and len(dicts) == len([t for t in trees if t is not None]):
        keys: list[str] = []
        for tree in dicts:
            keys.extend(k for k in tree if k not in keys)
        out = {}
        for key in keys:
            sub = stats_tree([tree.get(key) for tree in dicts])
            if sub is not None:
                out[key] = sub
        return out or None
    if any(_is_number(t) for t in trees) and all(_is_number(t) or t is None for t in trees):
        return interval(trees)
    return None


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = tree
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def paired(runs: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """``"<arm>-<first arm>"`` -> metric -> ``{mean, ci95, std, n, wins, losses}`` over seeds.

    ``runs``: each seed's ``compare`` table. A seed counts for a metric when both arms have
    it; wins/losses count the seeds where the arm is above/below the first arm (ties neither).
    """
    base = arms[0]
    out: dict[str, Any] = {}
    for arm in arms[1:]:
        table = {}
        for metric, path in PAIRED_METRICS.items():
            diffs = []
            for run in runs:
                a, b = _get(run, (arm, *path)), _get(run, (base, *path))
                if _is_number(a) and _is_number(b):
                    diffs.append(float(a) - float(b))
            stats = interval(diffs)
            table[metric] = {
                "mean": stats["mean"],
                "ci95": stats["ci95"],
                "std": stats["std"],
                "n": stats["n"],
                "wins": sum(d > 0 for d in diffs),
                "losses": sum(d < 0 for d in diffs),
            }
        out[f"{arm}-{base}"] = table
    return out


def shapley(
    fused: float | None, audio: float | None, visual: float | None, none: float | None
) -> dict[str, float | None]:
    """Exact two-player Shapley values of audio and visual for the value function v
    (accuracy): v(AV) = fused, v(A) = audio-only, v(V) = visual-only, v(∅) = neither.

    φ_a = ½[(v(A) − v(∅)) + (v(AV) − v(V))], φ_v likewise; φ_a + φ_v = v(AV) − v(∅).
    ``share_audio`` = φ_a / (φ_a + φ_v) (None when the sum is 0).
    """
    if None in (fused, audio, visual, none):
        return {"shapley_audio": None, "shapley_visual": None, "share_audio": None}
    phi_a = 0.5 * ((audio - none) + (fused - visual))  # type: ignore[operator]
    phi_v = 0.5 * ((visual - none) + (fused - audio))  # type: ignore[operator]
    total = phi_a + phi_v
    share = phi_a / total if abs(total) > 1e-12 else None
    return {"shapley_audio": phi_a, "shapley_visual": phi_v, "share_audio": share}
