"""Small line charts drawn with Pillow (no plotting library in the host's environment)."""

from __future__ import annotations

import math
from dataclasses import dataclass

PALETTE = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (127, 127, 127),
]


@dataclass
class Panel:
    title: str
    x_label: str
    series: dict[str, list[tuple[float, float]]]  # name → points (x, y)
    log_y: bool = False
    # "higher"/"lower": a series whose x values are all distinct (a sweep along compute) is joined in x order;
    # one with repeated x values (a sweep at similar compute) is joined along its frontier (the best y at ≤ x).
    # None: always joined in x order; "points": markers only.
    better: str | None = None


def frontier(points: list[tuple[float, float]], better: str) -> list[tuple[float, float]]:
    """The points that beat every point of lower or equal x (sorted by x)."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if better == "higher" else p[1])):
        if not out or (y > out[-1][1] if better == "higher" else y < out[-1][1]):
            if out and out[-1][0] == x:
                continue
            out.append((x, y))
    return out


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo or 1.0
    raw = span / (count - 1)
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def line_chart(panels: list[Panel], path, panel_size: tuple[int, int] = (420, 300)) -> None:
    """Panels side by side with a shared legend below; writes a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # an old Pillow without scalable default font
        font = ImageFont.load_default()
    names = list(dict.fromkeys(n for p in panels for n in p.series))
    margin_l, margin_r, margin_t, margin_b = 62, 18, 34, 46
    pw, ph = panel_size
    legend_h = 24 * math.ceil(len(names) / 4) + 10
    width = len(panels) * (pw + margin_l + margin_r)
    height = ph + margin_t + margin_b + legend_h
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for index, panel in enumerate(panels):
        ox = index * (pw + margin_l + margin_r) + margin_l
        oy = margin_t
        points = [pt for s in panel.series.values() for pt in s]
        xs = [x for x, _ in points]
        ys = [math.log10(y) if panel.log_y else y for _, y in points]
        x_lo, x_hi = min(0.0, min(xs)), max(xs) * 1.05
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.08 or 0.05
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def px(x, ox=ox, x_lo=x_lo, x_hi=x_hi):
            return ox + (x - x_lo) / (x_hi - x_lo) * pw

        def py(y, oy=oy, y_lo=y_lo, y_hi=y_hi, log=panel.log_y):
            value = math.log10(y) if log else y
            return oy + ph - (value - y_lo) / (y_hi - y_lo) * ph

        draw.text((ox + pw / 2, 8), panel.title, fill="black", font=font, anchor="mt")
        draw.text((ox + pw / 2, oy + ph + 24), panel.x_label, fill="black", font=font, anchor="mt")
        if panel.log_y:
            y_ticks = [10**t for t in _ticks(y_lo, y_hi)]
        else:
            y_ticks = _ticks(y_lo, y_hi)
        for t in y_ticks:
            y = py(t)
            if oy <= y <= oy + ph:
                draw.line([(ox, y), (ox + pw, y)], fill=(235, 235, 235))
                draw.text((ox - 5, y), f"{t:.3g}", fill="black", font=font, anchor="rm")
        for t in _ticks(x_lo, x_hi):
            x = px(t)
            if ox <= x <= ox + pw:
                draw.line([(x, oy + ph), (x, oy + ph + 4)], fill="black")
                draw.text((x, oy + ph + 6), f"{t:g}", fill="black", font=font, anchor="mt")
        draw.rectangle([ox, oy, ox + pw, oy + ph], outline=(80, 80, 80))
        for name, series in panel.series.items():
            color = PALETTE[names.index(name) % len(PALETTE)]
            pts = sorted(series)
            coords = [(px(x), py(y)) for x, y in pts]
            if panel.better in ("higher", "lower") and len({x for x, _ in pts}) < len(pts):
                line = [(px(x), py(y)) for x, y in frontier(pts, panel.better)]
            elif panel.better != "points":
                line = coords
            else:
                line = []
            if len({round(x) for x, _ in line}) > 1:
                draw.line(line, fill=color, width=2)
            for x, y in coords:
                draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=color)
    for i, name in enumerate(names):
        x = margin_l + (i % 4) * 220
        y = ph + margin_t + margin_b + 6 + 24 * (i // 4)
        color = PALETTE[i % len(PALETTE)]
        draw.ellipse([x, y + 2, x + 10, y + 12], fill=color)
        draw.text((x + 16, y), name, fill="black", font=font)
    image.save(path)
