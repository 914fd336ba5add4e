"""Server-rendered inline SVG line charts: no plotting script in the browser, and the page
stays readable in a screenshot or with JavaScript off."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

W, H, PAD = 560, 150, 34


def _fmt(v: float) -> str:
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"


def line_chart(title: str, xs: Sequence[float], ys: Sequence[float | None], *,
               unit: str = "", width: int = W, height: int = H) -> str:
    """One series as an SVG; gaps (None) break the line. Empty data says so."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None]
    head = (f'<svg class="chart" role="img" aria-label="{escape(title)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
            f'<text x="4" y="14" class="ct">{escape(title)}{escape(unit and f" ({unit})")}'
            '</text>')
    if len(pts) < 2:
        return head + f'<text x="{width // 2}" y="{height // 2}" class="empty" ' \
            'text-anchor="middle">no data yet</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = (width - PAD - 8) / max(x1 - x0, 1e-9)
    sy = (height - 40) / (y1 - y0)

    def xy(x: float, y: float) -> str:
        return f"{PAD + (x - x0) * sx:.1f},{height - 18 - (y - y0) * sy:.1f}"

    segs: list[list[str]] = [[]]
    for x, y in zip(xs, ys, strict=False):
        if y is None:
            segs.append([])
        else:
            segs[-1].append(xy(x, y))
    lines = "".join(f'<polyline class="ln" points="{" ".join(s)}"/>' for s in segs if s)
    axis = (f'<text x="2" y="{height - 18}" class="ax">{_fmt(y0)}</text>'
            f'<text x="2" y="26" class="ax">{_fmt(y1)}</text>'
            f'<text x="{PAD}" y="{height - 4}" class="ax">-{x1 - x0:.0f} s</text>'
            f'<text x="{width - 30}" y="{height - 4}" class="ax">now</text>')
    return head + axis + lines + "</svg>"


def sparkline(ys: Sequence[float | None], width: int = 120, height: int = 24) -> str:
    """A tiny trend for a table cell."""
    vals = [y for y in ys if y is not None]
    if len(vals) < 2:
        return '<span class="muted">–</span>'
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    step = width / (len(vals) - 1)
    pts = " ".join(f"{i * step:.1f},{height - 2 - (v - lo) / span * (height - 4):.1f}"
                   for i, v in enumerate(vals))
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}"><polyline class="ln" points="{pts}"/></svg>')
