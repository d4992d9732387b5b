"""A plain line chart drawn with PIL (no plotting dependency), shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Series = dict[str, list[tuple[float, float]]]


def line_chart(
    series: Series, colours: dict[str, str], xlabel: str, title: str, path: Path
) -> None:
    """One line per series of (x, y) points, x from 0, y padded by 5% of its range."""
    width, height, margin = 720, 440, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x1, y0, y1 = max(xs), min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 1.0
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
        x = x1 * i / 4
        draw.text((to_px(x, y0)[0] - 10, height - margin + 5), f"{x:.0f}", fill="black", font=font)
    draw.text((width // 2 - 60, height - 25), xlabel, fill="black", font=font)
    draw.text((margin, 20), title, fill="black", font=font)
    for i, (name, points) in enumerate(series.items()):
        draw.line([to_px(x, y) for x, y in points], fill=colours[name], width=2)
        draw.text((width - margin - 90, margin + 8 + 14 * i), name, fill=colours[name], font=font)
    image.save(path)
