"""Figures a paper can use, from an analysis (research.analytics): SVG or PNG, drawn with matplotlib.

- `forest`: every between-arm difference with its 95% bootstrap interval, one row per (figure, pair of
  arms), a dashed line at no difference; the difference, its interval and Holm's p are printed in a
  column to the right of the plotting area, so no label sits on a whisker.
- `distribution`: per arm, the share of agreement ratings at each point of the 7-point scale, for the
  chosen statements and for all shown statements.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
# SVG text stays text (searchable, editable in a paper's figure), not outlines.
matplotlib.rcParams["svg.fonttype"] = "none"
matplotlib.rcParams["svg.hashsalt"] = "concord"  # stable element ids: the same data gives the same file

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .analytics import Analysis  # noqa: E402

PLOTS = ("forest", "distribution")
FORMATS = {"svg": "image/svg+xml", "png": "image/png"}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def forest_figure(analysis: Analysis, *, title: str) -> Figure:
    rows = [c for c in analysis.comparisons if c.difference.value is not None]
    height = 1.5 + 0.38 * max(len(rows), 1)
    figure, axes = plt.subplots(figsize=(10, height))
    figure.subplots_adjust(left=0.4, right=0.66, top=1 - 0.85 / height, bottom=0.5 / height)
    figure.suptitle(title, fontsize=10, x=0.01, y=1 - 0.12 / height, ha="left", va="top")
    if not rows:
        axes.text(0.5, 0.5, "No comparison yet: two arms need ratings.", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    positions = list(range(len(rows)))[::-1]
    for y, comparison in zip(positions, rows):
        d = comparison.difference
        assert d.value is not None
        if d.low is not None and d.high is not None:
            axes.plot([d.low, d.high], [y, y], color="#1b2a4a", linewidth=1.6, solid_capstyle="butt")
        axes.plot([d.value], [y], marker="s", color="#1b2a4a", markersize=5)
    axes.axvline(0, color="#c33", linestyle="--", linewidth=1)
    axes.set_yticks(positions)
    axes.set_yticklabels([f"{c.label}\n{c.arm_a} − {c.arm_b}" for c in rows], fontsize=7.5)
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.set_xlabel("Difference (arm a − arm b), 95% cluster-bootstrap interval", fontsize=8)
    axes.tick_params(axis="x", labelsize=8)
    span = [v for c in rows for v in (c.difference.low, c.difference.high, c.difference.value) if v is not None and math.isfinite(v)]
    low, high = min(span + [0.0]), max(span + [0.0])
    margin = (high - low) * 0.08 or 0.5
    axes.set_xlim(low - margin, high + margin)
    # The numbers go in their own column, outside the axes: they can never overlap a whisker.
    transform = axes.get_yaxis_transform()
    axes.text(1.04, len(rows) - 0.35, "a − b   [95% CI]          Holm p", transform=transform, fontsize=7.5, fontweight="bold", va="bottom")
    for y, comparison in zip(positions, rows):
        d = comparison.difference
        text = f"{_fmt(d.value):>6} [{_fmt(d.low):>6}, {_fmt(d.high):>6}]  {_p(comparison.p_holm):>6}"
        axes.text(1.04, y, text, transform=transform, fontsize=7.5, va="center", family="monospace")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure


def distribution_figure(analysis: Analysis, *, title: str) -> Figure:
    distributions = analysis.distributions
    figure, panels = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    figure.suptitle(title, fontsize=10, x=0.01, ha="left")
    width = 0.8 / max(len(distributions), 1)
    for panel, (which, heading) in zip(panels, (("chosen", "Chosen statement"), ("all_shown", "All shown statements"))):
        for i, distribution in enumerate(distributions):
            counts = getattr(distribution, which)
            total = sum(counts)
            shares = [c / total if total else 0 for c in counts]
            offsets = [value + 1 - 0.4 + width * (i + 0.5) for value in range(7)]
            panel.bar(offsets, shares, width=width * 0.95, label=f"{distribution.arm} (n={total})")
        panel.set_title(heading, fontsize=9)
        panel.set_xticks(range(1, 8))
        panel.set_xlabel("Agreement (1 strongly disagree … 7 strongly agree)", fontsize=8)
        panel.tick_params(labelsize=8)
        panel.legend(fontsize=7, frameon=False, loc="upper left")
        for side in ("top", "right"):
            panel.spines[side].set_visible(False)
    panels[0].set_ylabel("Share of ratings", fontsize=8)
    if not distributions:
        panels[0].text(0.5, 0.5, "No ratings yet.", ha="center", transform=panels[0].transAxes)
    figure.tight_layout()
    return figure


def render(analysis: Analysis, *, plot: str, fmt: str, title: str) -> bytes:
    """One figure as SVG or PNG bytes (PNG at 200 dpi, for print)."""
    if plot not in PLOTS or fmt not in FORMATS:
        raise ValueError(f"unknown plot {plot!r} or format {fmt!r}")
    figure = forest_figure(analysis, title=title) if plot == "forest" else distribution_figure(analysis, title=title)
    buffer = io.BytesIO()
    # A fixed date and no creator keep the SVG identical for identical data.
    metadata = {"Date": None} if fmt == "svg" else {}
    figure.savefig(buffer, format=fmt, dpi=200 if fmt == "png" else 72, metadata=metadata)
    plt.close(figure)
    return buffer.getvalue()


def data_uri(analysis: Analysis, *, plot: str, title: str) -> str:
    """The figure as an SVG data URI, for an <img> on the page."""
    return "data:image/svg+xml;base64," + base64.b64encode(render(analysis, plot=plot, fmt="svg", title=title)).decode("ascii")
