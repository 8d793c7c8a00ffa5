"""PromQL text for the dashboards: sums of rates and increases, histogram quantiles, and the
concrete form of an expression with Grafana's variables filled in (what promtool and a real
Prometheus can check)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

RATE_INTERVAL = "$__rate_interval"
RANGE = "$__range"

# What promql_expressions() puts in place of Grafana's variables: concrete, valid PromQL.
CONCRETE_VALUES: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "model": ".*",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def _selector(metric: str, matchers: str) -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def _sum(inner: str, by: Sequence[str]) -> str:
    return f"sum by ({', '.join(by)}) ({inner})" if by else f"sum({inner})"


def rate(
    metric: str, matchers: str = "", by: Sequence[str] = (), window: str = RATE_INTERVAL
) -> str:
    """`sum(rate(metric{matchers}[window]))`, by `by` when given."""
    return _sum(f"rate({_selector(metric, matchers)}[{window}])", by)


def increase(
    metric: str, matchers: str = "", by: Sequence[str] = (), window: str = RATE_INTERVAL
) -> str:
    """`sum(increase(metric{matchers}[window]))`, by `by` when given."""
    return _sum(f"increase({_selector(metric, matchers)}[{window}])", by)


def quantile(q: float, histogram: str, matchers: str = "", by: Sequence[str] = ()) -> str:
    """The q-quantile of a histogram's buckets, summed over everything but `by` and `le`."""
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', matchers, (*by, 'le'))})"


def ratio(numerator: str, denominator: str) -> str:
    """numerator / denominator, and 0 (not no data) where the denominator has a series and the
    numerator none: an endpoint without errors has an error ratio of 0."""
    return f"({numerator} or 0 * {denominator}) / {denominator}"


def concrete(expr: str, values: Mapping[str, str] = CONCRETE_VALUES) -> str:
    """`expr` with each Grafana variable replaced by a concrete value; unknown ones raise."""

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise KeyError(f"no concrete value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)
