"""Small bar charts, drawn on the server as SVG (no script, no library): each series' points
become rectangles the template writes out, with a title per bar for its exact figures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from workers.ops.overview import Series

WIDTH, HEIGHT, LEFT, BOTTOM = 720, 140, 44, 18


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass
class Chart:
    title: str
    bars: list[Bar]
    top: float  # the value at the top of the scale
    first: str
    last: str
    legend: list[tuple[str, str]]

    @property
    def top_label(self) -> str:
        return (
            f"{self.top:,.0f}" if self.top >= 10 or self.top == int(self.top) else f"{self.top:.1f}"
        )

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom: int = BOTTOM


def bar_chart(title: str, series: Series, colors: dict[str, str], label: str = "%d %H:00") -> Chart:
    """Grouped bars: one group per label, one bar per line, on one scale from zero."""
    names = [name for name in colors if name in series.lines]
    top = max((max(series.lines[name], default=0) for name in names), default=0) or 1
    slots = max(len(series.labels), 1)
    group = (WIDTH - LEFT) / slots
    width = max(group / (len(names) + 1), 1.0)
    plot = HEIGHT - BOTTOM
    bars = []
    for i, at in enumerate(series.labels):
        for j, name in enumerate(names):
            value = series.lines[name][i]
            tall = plot * value / top
            bars.append(
                Bar(
                    x=LEFT + i * group + j * width,
                    y=plot - tall,
                    width=width,
                    height=tall,
                    color=colors[name],
                    title=f"{stamp(at, label)}: {name} {value:g}",
                )
            )
    return Chart(
        title=title,
        bars=bars,
        top=top,
        first=stamp(series.labels[0], label) if series.labels else "",
        last=stamp(series.labels[-1], label) if series.labels else "",
        legend=[(name, colors[name]) for name in names],
    )


def stamp(at: datetime, label: str) -> str:
    return at.strftime(label)
