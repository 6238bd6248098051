"""SVG charts made on the server for the statistics page: no script, no library, no CDN.

A chart is bars (stacked, for counts) or lines (for sizes and times) over equal time
buckets. Every bar and every point carries ``data-series``, ``data-t`` (the bucket's
start, epoch seconds) and ``data-value``, and the page renders the same numbers as a
table, for screen readers and for tests. Colours are presentation attributes (the
console's Content-Security-Policy allows no inline style).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Chart", "Series", "render"]

WIDTH, HEIGHT = 760, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28
PALETTE = ("#1f6fb2", "#d0602a", "#2f8a3e", "#8a3fa8", "#b8932a", "#2a9fa8", "#b03a5b", "#5a6678")


@dataclass
class Series:
    """One named line or layer of bars: a value per bucket."""

    name: str
    values: list[float]

    @property
    def total(self) -> float:
        return sum(self.values)

    @property
    def peak(self) -> float:
        return max(self.values, default=0.0)


@dataclass
class Chart:
    """What one chart shows. ``kind``: ``bars`` (stacked) or ``lines``; ``unit``: how
    the values read (``""``, ``"s"``, ``"messages"``)."""

    id: str
    title: str
    buckets: list[int]
    step: int
    series: list[Series]
    kind: str = "bars"
    unit: str = ""
    summary: str = "total"  # what the table's figure is: the total or the peak


def _nice(top: float) -> float:
    """A round upper bound for the axis (1, 2, 2.5 or 5 times a power of ten)."""
    if top <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(top))
    for factor in (1, 2, 2.5, 5, 10):
        if top <= factor * power:
            return float(factor * power)
    return float(10 * power)


def number(value: float, unit: str = "") -> str:
    """A value as the axis and the table show it."""
    if unit == "s":
        if value >= 3600:
            return f"{value / 3600:.1f}h"
        if value >= 60:
            return f"{value / 60:.1f}m"
        return f"{value:.3g}s"
    return f"{value:g}" if value == int(value) else f"{value:.3g}"


def _label(t: int, step: int) -> str:
    layout = "%m-%d" if step >= 86400 else ("%m-%d %H:%M" if step >= 3600 else "%H:%M")
    return time.strftime(layout, time.gmtime(t))


def render(chart: Chart) -> Markup:
    """The chart as an inline ``<svg>`` element."""
    n = max(1, len(chart.buckets))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    if chart.kind == "bars":
        top = max((sum(s.values[i] for s in chart.series) for i in range(len(chart.buckets))), default=0.0)
    else:
        top = max((s.peak for s in chart.series), default=0.0)
    top = _nice(top)
    slot = plot_w / n

    def y(value: float) -> float:
        return TOP + plot_h - value / top * plot_h

    out = [
        f'<svg id="{escape(chart.id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(chart.title)}" xmlns="http://www.w3.org/2000/svg" data-kind="{chart.kind}" '
        f'data-step="{chart.step}">'
    ]
    for i in range(5):  # grid and axis labels
        value = top * i / 4
        gy = y(value)
        out.append(f'<line x1="{LEFT}" y1="{gy:.1f}" x2="{WIDTH - RIGHT}" y2="{gy:.1f}" stroke="#e2e6ec"/>')
        out.append(f'<text x="{LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end" font-size="11" fill="#5a6678">'
                   f'{escape(number(value, chart.unit))}</text>')
    every = max(1, math.ceil(n / 8))
    for i, t in enumerate(chart.buckets):
        if i % every == 0:
            out.append(f'<text x="{LEFT + i * slot + slot / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle" '
                       f'font-size="11" fill="#5a6678">{escape(_label(t, chart.step))}</text>')
    if chart.kind == "bars":
        base = [0.0] * n
        for index, series in enumerate(chart.series):
            colour = PALETTE[index % len(PALETTE)]
            for i, value in enumerate(series.values):
                if not value:
                    continue
                y0, y1 = y(base[i]), y(base[i] + value)
                base[i] += value
                out.append(
                    f'<rect x="{LEFT + i * slot + slot * 0.1:.1f}" y="{y1:.1f}" width="{max(slot * 0.8, 1):.1f}" '
                    f'height="{max(y0 - y1, 0.5):.1f}" fill="{colour}" data-series="{escape(series.name)}" '
                    f'data-t="{chart.buckets[i]}" data-value="{value:g}"><title>{escape(series.name)} '
                    f'{escape(_label(chart.buckets[i], chart.step))}: {escape(number(value, chart.unit))}</title></rect>'
                )
    else:
        for index, series in enumerate(chart.series):
            colour = PALETTE[index % len(PALETTE)]
            points = " ".join(f"{LEFT + i * slot + slot / 2:.1f},{y(v):.1f}" for i, v in enumerate(series.values))
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" '
                       f'data-series="{escape(series.name)}"/>')
            for i, value in enumerate(series.values):
                if value:
                    out.append(
                        f'<circle cx="{LEFT + i * slot + slot / 2:.1f}" cy="{y(value):.1f}" r="2.5" fill="{colour}" '
                        f'data-series="{escape(series.name)}" data-t="{chart.buckets[i]}" data-value="{value:g}">'
                        f'<title>{escape(series.name)}: {escape(number(value, chart.unit))}</title></circle>'
                    )
    out.append("</svg>")
    return Markup("".join(out))


def legend(chart: Chart) -> list[tuple[str, str]]:
    """(series name, colour) for the legend."""
    return [(s.name, PALETTE[i % len(PALETTE)]) for i, s in enumerate(chart.series)]
