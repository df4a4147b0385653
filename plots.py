"""Plots drawn with Pillow: line plots of training curves and labelled scatter plots.

Both share one `Figure`: a white canvas with a framed plotting area, "nice" axis ticks
(steps of 1, 2, 2.5 or 5 times a power of ten, like matplotlib's default locator), a title,
axis labels and a legend. Colours are matplotlib's ten 'tab10' colours, so plots look
like the ones in papers and reports.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import util

TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def nice_ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """About `count` round tick values covering [low, high]: step = {1, 2, 2.5, 5} x 10^k.
    whole: the values are counts (steps, epochs), so are the ticks: steps of 1, 2 or 5
    x 10^k, at least 1."""
    if not high > low:
        low, high = (low - 1, high + 1) if whole else (low - 0.5, high + 0.5)
    raw_step = (high - low) / count
    power = 10 ** math.floor(math.log10(raw_step))
    multipliers = (1, 2, 5, 10) if whole else (1, 2, 2.5, 5, 10)
    step = next(m * power for m in multipliers if m * power >= raw_step)
    step = max(step, 1) if whole else step
    first = math.ceil(low / step - 1e-9)
    ticks = [(first + i) * step for i in range(int(math.floor(high / step + 1e-9)) - first + 1)]
    return [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.2e}"


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class Figure:
    """Canvas with one plotting area; `to_pixels` maps data coordinates into it."""

    def __init__(self, x_range, y_range, title="", xlabel="", ylabel="", size=(640, 420),
                 legend: list[str] = (), whole_x: bool = False):
        self.font, self.title_font = _font(12), _font(15)
        # the legend gets its own column right of the plot, so it never hides data
        self.legend_width = (max(int(self.font.getlength(n)) for n in legend) + 40
                             if legend else 0)
        self.image = Image.new("RGB", (size[0] + self.legend_width, size[1]), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.top = 70, 40
        self.right, self.bottom = size[0] - 20, size[1] - 50
        self.x_ticks, self.y_ticks = nice_ticks(*x_range, whole=whole_x), nice_ticks(*y_range)
        self.x_range = (min(x_range[0], self.x_ticks[0]), max(x_range[1], self.x_ticks[-1]))
        self.y_range = (min(y_range[0], self.y_ticks[0]), max(y_range[1], self.y_ticks[-1]))
        self._axes(title, xlabel, ylabel)

    def to_pixels(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = self.left + (np.asarray(x, float) - x0) / max(x1 - x0, 1e-12) * (self.right - self.left)
        py = self.bottom - (np.asarray(y, float) - y0) / max(y1 - y0, 1e-12) * (self.bottom - self.top)
        return px, py

    def _axes(self, title, xlabel, ylabel):
        draw, font = self.draw, self.font
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        for tick, px in zip(self.x_ticks, self.to_pixels(self.x_ticks, [0] * len(self.x_ticks))[0]):
            draw.line([px, self.bottom, px, self.bottom + 4], fill="black")
            draw.text((px, self.bottom + 6), _label(tick), fill="black", font=font, anchor="mt")
        for tick, py in zip(self.y_ticks, self.to_pixels([0] * len(self.y_ticks), self.y_ticks)[1]):
            draw.line([self.left - 4, py, self.left, py], fill="black")
            draw.text((self.left - 6, py), _label(tick), fill="black", font=font, anchor="rm")
        draw.text(((self.left + self.right) / 2, 12), title, fill="black", font=self.title_font, anchor="mt")
        draw.text(((self.left + self.right) / 2, self.image.height - 8), xlabel, fill="black",
                  font=font, anchor="mb")
        if ylabel:  # rotated text: draw on a strip, turn it, paste it at the left edge
            strip = Image.new("RGB", (int(font.getlength(ylabel)) + 4, 16), "white")
            ImageDraw.Draw(strip).text((2, 1), ylabel, fill="black", font=font)
            rotated = strip.rotate(90, expand=True)
            self.image.paste(rotated, (4, int((self.top + self.bottom - rotated.height) / 2)))

    def legend(self, entries: list[tuple[str, str]]):
        """Colour swatches with names, in the column right of the plotting area."""
        x, y = self.right + 12, self.top
        for i, (name, colour) in enumerate(entries):
            row = y + 4 + 16 * i
            self.draw.rectangle([x + 6, row + 3, x + 18, row + 11], fill=colour)
            self.draw.text((x + 24, row), name, fill="black", font=self.font)

    def save(self, path) -> Path:
        return util.write_image(self.image, path)


def line_plot(series: dict, path, title="", xlabel="step", ylabel="", x=None) -> Path:
    """One line per named series (a sequence of y values, NaNs skipped). x: the shared x
    values, or {name: x values} when the series were measured at different x."""
    ys = {name: np.asarray(values, float) for name, values in series.items() if len(values)}
    longest = max((len(v) for v in ys.values()), default=1)
    shared = np.arange(1, longest + 1, dtype=float) if x is None else x
    xs = {name: np.asarray(shared[name] if isinstance(shared, dict) else shared, float)
          for name in ys} or {"": shared}
    every_x = np.concatenate([v.reshape(-1) for v in xs.values()])
    finite = np.concatenate([v[np.isfinite(v)] for v in ys.values()] or [np.zeros(1)])
    figure = Figure((every_x.min(), every_x.max()),
                    (finite.min(), finite.max()) if finite.size else (0, 1),
                    title, xlabel, ylabel, legend=list(ys),
                    whole_x=bool(np.all(every_x == np.round(every_x))))
    for colour, (name, values) in zip(TAB10 * 10, ys.items()):
        px, py = figure.to_pixels(xs[name][:len(values)], values)
        points = [(a, b) for a, b, v in zip(px, py, values) if np.isfinite(v)]
        if len(points) > 1:
            figure.draw.line(points, fill=colour, width=2)
        elif points:
            figure.draw.ellipse([points[0][0] - 2, points[0][1] - 2,
                                 points[0][0] + 2, points[0][1] + 2], fill=colour)
    figure.legend([(name, colour) for colour, name in zip(TAB10 * 10, ys)])
    return figure.save(path)


def scatter_plot(points, labels, path, title="", names=None, radius: float = 2.0) -> Path:
    """2-D points coloured by integer label (tab10), legend from `names` (default: label)."""
    points, labels = np.asarray(points, float), np.asarray(labels, int)
    margin = 0.03 * (points.max(axis=0) - points.min(axis=0) + 1e-12)
    low, high = points.min(axis=0) - margin, points.max(axis=0) + margin
    present = np.unique(labels)
    names = names or [str(c) for c in range(present.max() + 1)]
    figure = Figure((low[0], high[0]), (low[1], high[1]), title, size=(640, 600),
                    legend=[names[c] for c in present])
    px, py = figure.to_pixels(points[:, 0], points[:, 1])
    order = np.random.default_rng(0).permutation(len(points))  # no class hides the others
    colours = np.array([[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in TAB10], np.uint8)
    canvas = np.array(figure.image)
    reach = int(np.ceil(radius))
    for dy in range(-reach, reach + 1):  # stamp a disc: one vectorised write per offset
        for dx in range(-reach, reach + 1):
            if dx * dx + dy * dy <= radius * radius:
                rows = np.clip(np.rint(py[order]).astype(int) + dy, 0, canvas.shape[0] - 1)
                cols = np.clip(np.rint(px[order]).astype(int) + dx, 0, canvas.shape[1] - 1)
                canvas[rows, cols] = colours[labels[order] % 10]
    figure.image.paste(Image.fromarray(canvas))
    figure.legend([(names[c], TAB10[c % 10]) for c in present])
    return figure.save(path)


def label_grid(image: Image.Image, cell: int, rows=(), columns=(), title: str = "",
               padding: int = 2) -> Image.Image:
    """An image grid (data.grid_image's layout: square cells of `cell` pixels with
    `padding` around each) with `rows` beside each row, `columns` above each column and
    `title` on top."""
    image = image.convert("RGB")
    font = _font(12)
    left = max((int(font.getlength(text)) for text in rows), default=-8) + 8
    top = (20 if title else 0) + (18 if columns else 0)
    canvas = Image.new("RGB", (max(image.width + left, int(font.getlength(title)) + 8),
                               image.height + top), "white")
    canvas.paste(image, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    centre = padding + cell / 2            # of the first cell; the others follow each step
    for index, text in enumerate(columns):
        draw.text((left + centre + index * (cell + padding), top - 3), text, fill="black",
                  font=font, anchor="mb")
    for index, text in enumerate(rows):
        draw.text((left - 4, top + centre + index * (cell + padding)), text, fill="black",
                  font=font, anchor="rm")
    return canvas
