"""A plain line chart drawn with PIL (no plotting dependency): the run's metrics.png and
the benchmarks' figures."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Series = dict[str, list[tuple[float, float]]]


def nice_step(span: float, ticks: int = 5) -> float:
    """The smallest of 1, 2, 5 x 10^k that divides ``span`` into at most ``ticks`` parts."""
    magnitude = 10 ** math.floor(math.log10(span / ticks))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude * ticks >= span)


def line_chart(
    series: Series,
    colours: dict[str, str],
    xlabel: str,
    title: str,
    path: Path,
    levels: dict[str, float] | None = None,
    image_format: str | None = None,
) -> None:
    """One line per series of (x, y) points, x from 0, y padded by 5% of its range; each
    of ``levels`` a dashed horizontal line (a baseline) in its series' colour."""
    levels = levels or {}
    width, height, margin = 720, 440, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points] + list(levels.values())
    x1, y0, y1 = max(max(xs), 1), min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0  # a flat line: pad around it
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            margin + x / x1 * (width - 2 * margin),
            height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin),
        )

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        draw.text((5, to_px(0, y)[1] - 6), f"{y:.3g}", fill="black", font=font)
    step = nice_step(x1)
    if all(float(x).is_integer() for x in xs):  # epochs: no half epochs on the axis
        step = max(step, 1)
    for k in range(int(x1 / step) + 1):  # labels at round values, where they belong
        x = k * step
        draw.text((to_px(x, y0)[0] - 10, height - margin + 5), f"{x:g}", fill="black", font=font)
    draw.text((width // 2 - 60, height - 25), xlabel, fill="black", font=font)
    draw.text((margin, 20), title, fill="black", font=font)
    for name, level in levels.items():
        (left, y), (right, _) = to_px(0, level), to_px(x1, level)
        for start in range(int(left), int(right), 12):
            draw.line([(start, y), (min(start + 6, right), y)], fill=colours[name], width=1)
    for name, points in series.items():
        draw.line([to_px(x, y) for x, y in points], fill=colours[name], width=2)
        if len(points) == 1:  # a line needs two points: mark the one
            x, y = to_px(*points[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
    for i, name in enumerate([*series, *levels]):  # the legend, on white over the lines
        x, y = width - margin - 200, margin + 8 + 14 * i
        box = draw.textbbox((x, y), name, font=font)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
        draw.text((x, y), name, fill=colours[name], font=font)
    image.save(path, format=image_format)  # a format for names without a suffix
