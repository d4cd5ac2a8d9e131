"""The embedded small-object benchmark: a deterministic generator of a COCO-format dataset.

Why it exists: the paper's method super-resolves small RoIs, and to train and judge that we want
(a) objects whose identity lives in fine detail (a ring is a disk with a hole, a frame is a square
with a hole), so that small instances are genuinely hard and a sharper view genuinely helps, and
(b) the exact high-resolution twin of every low-resolution image, so SR quality can be measured
against ground truth instead of a bicubic guess.

How: an image is first *described* as a plain JSON-able dict (a "scene": background parameters,
objects, distractors, blur, noise seed), sampled from a numpy Generator seeded per image, so an
image never depends on how many worker processes made it. The scene is then rendered at
``render_scale`` (k, default 4) times the image size with exact per-pixel shape tests, and the
low-resolution (LR) image is the k x k area average of that uint8 render. The render itself is the
exact HR twin: ``area_downsample(twin, k) == LR`` pixel for pixel. Scenes are stored beside the
COCO json, so any image can be rendered again at any scale (``render_twin``).

Layout written by ``generate`` (see data/README.md)::

    DIR/annotations/instances_{train,val}.json   COCO detection json
    DIR/annotations/scenes_{train,val}.json      {"version", "render_scale", "scenes": {id: scene}}
    DIR/{train,val}/{id:06d}.png                 LR images (RGB, 8 bit)
    DIR/{train,val}_x{K}/{id:06d}.png            HR twins (only with hr_scale=K)
    DIR/{train,val}_x{d}/{id:06d}.png            their area averages at every d < K dividing K (x2 for
                                                 x4), which a reader at xd would otherwise make on load

Annotation semantics follow COCO: ``area`` is the number of *visible* object pixels at LR
resolution (measured on the render, so fractional), ``bbox`` is the tight [x, y, w, h] box of the
visible mask in LR pixel coordinates, precise to 1/k pixel. Objects drawn later occlude earlier
ones; an object less than half visible is removed from the scene before the image is made.
"""
from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from sodlab.data.coco import MEDIUM_MAX_AREA, SMALL_MAX_AREA, area_downsample, read_twin, size_bucket, twin_source
from sodlab.io import atomic_write_json

SYNTH_VERSION = 1

# Class identity is in the shape's detail, never in its colour (colours are drawn independently
# of the class): the disk family and the square family differ only by a hole, a notch or a cut.
CLASS_NAMES = (
    "disk",
    "ring",
    "notched_disk",
    "square",
    "frame",
    "slashed_square",
    "cross",
    "triangle",
)
CLASS_DESCRIPTIONS = {
    "disk": "filled disk",
    "ring": "hollow disk (annulus); wall 25-40% of the radius",
    "notched_disk": "filled disk with a 60-100 degree wedge cut out (a pac-man)",
    "square": "filled square",
    "frame": "hollow square; wall 25-40% of the half side",
    "slashed_square": "filled square cut in two along a diagonal by a gap of 8-14% of the side",
    "cross": "plus sign; arms 28-40% of the extent wide",
    "triangle": "filled equilateral triangle",
}
DISTRACTOR_KINDS = ("ellipse", "segment", "blob", "star")

# Scene sampling knobs. Object *area* is sampled per COCO bucket, so the bucket mix is controlled
# directly; the extent (side or diameter) follows from the class's fill fraction.
BUCKET_PROBS = (0.52, 0.28, 0.20)  # small, medium, large (before occlusion, which shrinks areas)
# COCO's size buckets (sodlab.data.coco), in LR pixels of area.
AREA_RANGES = ((9.0, SMALL_MAX_AREA), (SMALL_MAX_AREA, MEDIUM_MAX_AREA), (MEDIUM_MAX_AREA, 128.0**2))
SMALL_MAX_EXTENT = 32.0
MAX_LARGE_PER_IMAGE = 3  # a 256 px image holds few 100 px objects without burying the rest
OBJECTS_PER_IMAGE = (5, 30)
MIN_VISIBLE_FRACTION = 0.5
LOW_CONTRAST_PROB = 0.3
BLUR_SIGMA_RANGE = (0.3, 1.0)  # LR pixels; applied at HR as sigma * scale
NOISE_SIGMA_RANGE = (1.0, 6.0)  # grey levels of the LR image


# --------------------------------------------------------------------------------------------
# Shapes: exact inside-tests on pixel centres, in the object's rotated frame (u, v), LR units.
# Evaluating the geometry per pixel centre (instead of rasterising with ImageDraw) makes every
# scale sample the same continuous shape, which is what makes twins at different scales agree.
# --------------------------------------------------------------------------------------------


def _object_mask(obj: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a scene object. ``extent`` is the side (squares, cross, triangle) or the
    diameter (disks); ``detail`` is the class's free parameter (see ``_sample_detail``)."""
    category, extent, detail = obj["category"], obj["extent"], obj["detail"]
    h = extent / 2
    if category in ("disk", "ring", "notched_disk"):
        r2 = u * u + v * v
        inside = r2 <= h * h
        if category == "ring":
            inside &= r2 >= (h * (1 - detail)) ** 2
        elif category == "notched_disk":
            # The wedge opens towards +u; detail is its full opening angle in degrees.
            inside &= np.arctan2(np.abs(v), u) >= math.radians(detail) / 2
        return inside
    if category in ("square", "frame", "slashed_square"):
        au, av = np.abs(u), np.abs(v)
        inside = (au <= h) & (av <= h)
        if category == "frame":
            inner = h * (1 - detail)
            inside &= (au >= inner) | (av >= inner)
        elif category == "slashed_square":
            inside &= np.abs(u - v) >= detail * extent * math.sqrt(2) / 2
        return inside
    if category == "cross":
        arm = detail * extent / 2
        au, av = np.abs(u), np.abs(v)
        return ((au <= h) & (av <= arm)) | ((av <= h) & (au <= arm))
    if category == "triangle":
        # Equilateral with side = extent, centroid at the centre, one vertex towards -v (up).
        inradius = extent / (2 * math.sqrt(3))
        inside = v <= inradius
        for angle in (math.radians(-30), math.radians(210)):
            inside &= u * math.cos(angle) + v * math.sin(angle) <= inradius
        return inside
    raise ValueError(f"unknown object category {category!r}; known: {CLASS_NAMES}")


def _fill_fraction(category: str, detail: float) -> float:
    """Shape area / extent^2, used to turn a sampled target area into an extent."""
    if category == "disk":
        return math.pi / 4
    if category == "ring":
        return math.pi / 4 * (1 - (1 - detail) ** 2)
    if category == "notched_disk":
        return math.pi / 4 * (1 - detail / 360)
    if category == "square":
        return 1.0
    if category == "frame":
        return 1 - (1 - detail) ** 2
    if category == "slashed_square":
        return 1 - math.sqrt(2) * detail + detail**2 / 2
    if category == "cross":
        return 2 * detail - detail**2
    if category == "triangle":
        return math.sqrt(3) / 4
    raise ValueError(f"unknown object category {category!r}; known: {CLASS_NAMES}")


def _object_radius(category: str, extent: float) -> float:
    """Radius of a circle around the centre that contains the shape at any rotation."""
    if category in ("disk", "ring", "notched_disk"):
        return extent / 2
    if category == "triangle":
        return extent / math.sqrt(3)
    return extent / math.sqrt(2)


def _distractor_mask(distractor: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a distractor: clutter with edges and corners that is not any class."""
    kind, params = distractor["kind"], distractor["params"]
    a = distractor["extent"] / 2
    if kind == "ellipse":
        (aspect,) = params
        return (u / a) ** 2 + (v / (a * aspect)) ** 2 <= 1
    if kind == "segment":
        (half_width,) = params
        return (np.abs(u) <= a) & (np.abs(v) <= half_width)
    if kind == "blob":
        # A radius that wobbles with angle: lumpy, never a clean disk.
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        radius = np.full_like(rho, a)
        for k, (amp, phase) in enumerate(zip(params[0::2], params[1::2]), start=2):
            radius += a * amp * np.cos(k * theta + phase)
        return rho <= radius
    if kind == "star":
        points, inner = int(params[0]), params[1]
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        # Triangle wave in angle: 1 at the tips, 0 halfway between them.
        tri = np.abs(((theta * points / (2 * math.pi)) % 1.0) * 2 - 1)
        return rho <= a * (inner + (1 - inner) * tri)
    raise ValueError(f"unknown distractor kind {kind!r}; known: {DISTRACTOR_KINDS}")


def _distractor_radius(kind: str, extent: float, params: list[float]) -> float:
    if kind == "blob":
        return extent / 2 * (1 + sum(abs(p) for p in params[0::2]))
    return extent / 2


def _shape_window(cx: float, cy: float, radius: float, rotation: float, scale: int):
    """HR pixel window (x0, y0, x1, y1, unclipped) around a shape, and the rotated pixel-centre
    coordinates (u, v) in LR units. Per-shape windows keep the cost proportional to the shape."""
    x0, x1 = math.floor((cx - radius) * scale) - 1, math.ceil((cx + radius) * scale) + 1
    y0, y1 = math.floor((cy - radius) * scale) - 1, math.ceil((cy + radius) * scale) + 1
    # float32 is ample (pixel centres are known to ~1e-5 LR px) and halves the memory traffic.
    dx = ((np.arange(x0, x1, dtype=np.float64) + 0.5) / scale - cx).astype(np.float32)[None, :]
    dy = ((np.arange(y0, y1, dtype=np.float64) + 0.5) / scale - cy).astype(np.float32)[:, None]
    c, s = np.float32(math.cos(math.radians(rotation))), np.float32(math.sin(math.radians(rotation)))
    return (x0, y0, x1, y1), dx * c + dy * s, dy * c - dx * s


# --------------------------------------------------------------------------------------------
# Background: smooth gradient + value noise at two frequencies + optional stripes. All fields are
# functions of LR coordinates sampled at HR pixel centres, so every scale shows the same texture.
# --------------------------------------------------------------------------------------------


def _axis_weights(t: np.ndarray, cells: int, smooth: bool) -> tuple[np.ndarray, np.ndarray]:
    """For positions ``t`` in grid units (0..cells): the lower node index and the upper weight."""
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    w = (t - i0).astype(np.float32)
    if smooth:  # smoothstep: value noise without the creases of bilinear interpolation
        w = w * w * (3 - 2 * w)
    return i0, w


def _grid_sample(nodes: np.ndarray, tx: np.ndarray, ty: np.ndarray, smooth: bool) -> np.ndarray:
    """Interpolate a (gy+1, gx+1, C) node grid at the outer product of positions ty x tx (grid
    units), separably: one pass along x on the few node rows, one pass along y at full size."""
    ix, wx = _axis_weights(tx, nodes.shape[1] - 1, smooth)
    iy, wy = _axis_weights(ty, nodes.shape[0] - 1, smooth)
    rows = nodes[:, ix] * (1 - wx)[None, :, None] + nodes[:, ix + 1] * wx[None, :, None]
    # Flatten (x, channel) so numpy's inner loops run over W*C values rather than over C.
    rows = rows.reshape(rows.shape[0], -1)
    steps = rows[1:] - rows[:-1]
    # rows[iy] + wy * steps[iy], one band of output rows per grid cell: two in-place passes at
    # full size and no gathers (this is the background's dominant cost).
    out = np.empty((len(ty), rows.shape[1]), dtype=np.float32)
    bounds = np.flatnonzero(np.diff(iy)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(ty)]):
        cell = iy[start]
        band = out[start:stop]
        np.multiply(wy[start:stop, None], steps[cell], out=band)
        band += rows[cell]
    return out.reshape(len(ty), len(tx), nodes.shape[2])


def _pixel_centres(length: int, scale: int) -> np.ndarray:
    """Render pixel centres along one axis as a fraction (0..1) of the image."""
    return (np.arange(length * scale, dtype=np.float64) + 0.5) / (length * scale)


def _background(bg: dict, width: int, height: int, scale: int) -> np.ndarray:
    """float32 (H*scale, W*scale, 3) background of a scene, values roughly 0..255."""
    # Node grids span the image: node j of an n-cell grid sits at j/n of the width (height).
    cells = bg["texture_cells"]
    fine = np.random.default_rng(bg["texture_seed"]).random((cells + 1, cells + 1, 3), dtype=np.float32)
    nodes = (fine - 0.5) * (2 * bg["texture_amplitude"])
    coarse_cells = bg["coarse_cells"]
    coarse = np.random.default_rng(bg["coarse_seed"]).random((coarse_cells + 1, coarse_cells + 1, 3), dtype=np.float32)
    coarse = (coarse - 0.5) * (2 * bg["coarse_amplitude"])
    corners = np.asarray(bg["corners"], np.float32).reshape(2, 2, 3)
    # Fold the gradient and the coarse noise into the fine grid's nodes: both are far smoother
    # than the fine node spacing, so a single full-size interpolation renders all three.
    node_pos = np.arange(cells + 1, dtype=np.float64) / cells
    nodes += _grid_sample(corners, node_pos, node_pos, smooth=False)
    nodes += _grid_sample(coarse, node_pos * coarse_cells, node_pos * coarse_cells, smooth=True)
    xs, ys = _pixel_centres(width, scale) * cells, _pixel_centres(height, scale) * cells
    field = _grid_sample(nodes, xs, ys, smooth=True)
    stripes = bg.get("stripes")
    if stripes:
        # sin(a x + b y + phase), separable: two outer products instead of a full-size sin.
        theta = math.radians(stripes["angle"])
        freq = 2 * math.pi / stripes["period"]
        x = (np.arange(width * scale, dtype=np.float32) + 0.5) / scale * (freq * math.cos(theta))
        y = (np.arange(height * scale, dtype=np.float32) + 0.5) / scale * (freq * math.sin(theta)) + stripes["phase"]
        wave = np.sin(y)[:, None] * np.cos(x)[None, :] + np.cos(y)[:, None] * np.sin(x)[None, :]
        for channel, amplitude in enumerate(stripes["colour"]):  # per channel: inner loops stay long
            field[:, :, channel] += wave * np.float32(amplitude)
    return field


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------


def _size_wh(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        width = height = int(size)
    else:
        width, height = (int(s) for s in size)
    if width < 16 or height < 16:
        raise ValueError(f"image size must be at least 16x16 pixels, got {width}x{height}")
    return width, height


def _sample_detail(rng: np.random.Generator, category: str) -> float:
    """The class's free parameter. Ranges keep every class distinct from its siblings when large
    (a ring's hole is wide enough to see, a notch is wide enough not to look like a nick)."""
    ranges = {
        "ring": (0.25, 0.40),  # wall / outer radius
        "frame": (0.25, 0.40),  # wall / half side
        "notched_disk": (60.0, 100.0),  # wedge angle, degrees
        "slashed_square": (0.08, 0.14),  # gap / side
        "cross": (0.28, 0.40),  # arm width / extent
    }
    if category not in ranges:
        return 0.0
    return round(float(rng.uniform(*ranges[category])), 3)


def _sample_colour(rng: np.random.Generator, local_bg: np.ndarray) -> list[int]:
    """Class-independent colour; sometimes deliberately close to the background underneath."""
    if rng.random() < LOW_CONTRAST_PROB:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-9
        colour = local_bg + direction * rng.uniform(20.0, 40.0)
    else:
        for _ in range(20):  # a handful of tries for a clearly visible colour
            colour = rng.integers(0, 256, size=3).astype(np.float64)
            if np.linalg.norm(colour - local_bg) >= 60:
                break
    return [int(c) for c in np.clip(np.rint(colour), 0, 255)]


def _r3(x: float) -> float:
    """Scene numbers are rounded to 3 decimals: short files, and the rounded value is the one
    rendered, so a scene read back from json renders identically."""
    return round(float(x), 3)


def sample_scene(rng: np.random.Generator, size: int | tuple[int, int] = 256) -> dict:
    """Sample a scene description: a JSON-able dict that ``render_scene`` turns into pixels.

    Coordinates and extents are in LR pixels. Objects are listed in drawing order (later ones
    occlude earlier ones). The scene may contain objects that end up less than half visible;
    ``generate`` removes those before rendering the final image (``_finalise_scene``).
    """
    width, height = _size_wh(size)
    corners = np.clip(rng.uniform(30, 225, size=(1, 1, 3)) + rng.normal(0, 35, size=(4, 1, 1)), 0, 255)
    corners = corners + rng.normal(0, 12, size=(4, 1, 3))  # a little colour drift between corners
    background = {
        "corners": [[_r3(c) for c in corner.ravel()] for corner in corners],
        "coarse_cells": int(rng.integers(2, 5)),
        "coarse_seed": int(rng.integers(2**31)),
        "coarse_amplitude": _r3(rng.uniform(10, 35)),
        # Fine texture at roughly small-object scale (8..16 px cells): clutter that looks like blobs.
        "texture_cells": int(max(2, round(max(width, height) / rng.uniform(8, 16)))),
        "texture_seed": int(rng.integers(2**31)),
        "texture_amplitude": _r3(rng.uniform(4, 22)),
        "stripes": None,
    }
    if rng.random() < 0.4:
        amplitude = rng.uniform(4, 18)
        background["stripes"] = {
            "period": _r3(rng.uniform(5, 40)),
            "angle": _r3(rng.uniform(0, 180)),
            "phase": _r3(rng.uniform(0, 2 * math.pi)),
            "colour": [_r3(amplitude * c) for c in (0.7 + 0.3 * rng.random(3))],
        }
    # The LR background, only to pick low-contrast colours relative to what lies underneath.
    lr_background = _background(background, width, height, 1)

    def local_bg(cx: float, cy: float) -> np.ndarray:
        x, y = min(int(cx), width - 1), min(int(cy), height - 1)
        return np.clip(lr_background[y, x].astype(np.float64), 0, 255)

    objects: list[dict] = []
    placed: list[tuple[float, float, float]] = []  # (cx, cy, radius) for the overlap check
    n_objects = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    n_large = 0
    max_extent = 0.8 * min(width, height)
    for _ in range(n_objects):
        category = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        detail = _sample_detail(rng, category)
        bucket = int(rng.choice(3, p=BUCKET_PROBS))
        if bucket == 2 and n_large >= MAX_LARGE_PER_IMAGE:
            bucket = 1
        n_large += bucket == 2
        low, high = AREA_RANGES[bucket]
        area = math.exp(rng.uniform(math.log(low), math.log(high)))  # log-uniform within bucket
        extent = min(math.sqrt(area / _fill_fraction(category, detail)), max_extent)
        if bucket == 0:
            # Small means small in extent too (<= 32 px), also for thin shapes (ring, cross).
            extent = min(extent, SMALL_MAX_EXTENT)
        radius = _object_radius(category, extent)
        rotation = rng.uniform(0, 360)
        # Rejection sampling of the centre: overlaps are allowed (occlusion is part of the task)
        # but a centre may not sit deep inside another object, which would bury one of them.
        for _attempt in range(30):
            margin = 0.7 * min(radius, width / 2, height / 2)  # a little truncation at borders is fine
            cx = rng.uniform(margin, width - margin)
            cy = rng.uniform(margin, height - margin)
            if all(math.hypot(cx - px, cy - py) >= 0.55 * (radius + pr) for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        objects.append(
            {
                "category": category,
                "cx": _r3(cx),
                "cy": _r3(cy),
                "extent": _r3(extent),
                "rotation": _r3(rotation),
                "detail": detail,
                "colour": _sample_colour(rng, local_bg(cx, cy)),
            }
        )
    # Draw roughly largest first (with jitter): small things mostly lie on top of big ones, as in
    # aerial imagery, while similar sizes still occlude each other in either order.
    jitter = rng.uniform(-0.7, 0.7, size=len(objects))
    order = np.argsort([-(math.log(o["extent"]) + j) for o, j in zip(objects, jitter)], kind="stable")
    objects = [objects[i] for i in order]

    distractors = []
    for _ in range(int(rng.integers(3, 21))):
        kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
        extent = math.exp(rng.uniform(math.log(3), math.log(50)))
        if kind == "ellipse":
            params = [_r3(rng.uniform(0.25, 0.55))]  # never round enough to pass for a disk
        elif kind == "segment":
            extent *= 1.5
            params = [_r3(rng.uniform(0.3, 1.2))]
        elif kind == "blob":
            params = []  # amplitude and phase of the harmonics 2, 3 and 4 of the radius
            for _ in range(3):
                params += [_r3(rng.uniform(0.08, 0.22) * rng.choice([-1, 1])), _r3(rng.uniform(0, 2 * math.pi))]
        else:  # star
            params = [int(rng.integers(5, 8)), _r3(rng.uniform(0.35, 0.55))]
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        distractors.append(
            {
                "kind": kind,
                "cx": _r3(cx),
                "cy": _r3(cy),
                "extent": _r3(extent),
                "rotation": _r3(rng.uniform(0, 360)),
                "params": params,
                "colour": _sample_colour(rng, local_bg(cx, cy)),
                # Some clutter lies on top of objects, so occluders are not always objects.
                "above_objects": bool(rng.random() < 0.25),
            }
        )

    return {
        "version": SYNTH_VERSION,
        "size": [width, height],
        "background": background,
        "objects": objects,
        "distractors": distractors,
        "blur_sigma": _r3(rng.uniform(*BLUR_SIGMA_RANGE)),
        "noise_sigma": _r3(rng.uniform(*NOISE_SIGMA_RANGE)),
        "noise_seed": int(rng.integers(2**31)),
    }


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _paint_shapes(scene: dict, scale: int, canvas: np.ndarray | None) -> list[dict]:
    """Paint distractors and objects in drawing order onto ``canvas`` (uint8, render size; None
    to only work out visibility) and return each object's visible mask (see ``render_scene``)."""
    width, height = _size_wh(scene["size"])
    hr_w, hr_h = width * scale, height * scale
    # Which object owns each render pixel (-1: none). Later shapes overwrite earlier ones, which is
    # exactly occlusion; visible masks are read back from this map at the end.
    owner = np.full((hr_h, hr_w), -1, dtype=np.int16)

    def paint(shape: dict, label: int | None):
        if "category" in shape:
            radius, mask_fn = _object_radius(shape["category"], shape["extent"]), _object_mask
        else:
            radius, mask_fn = _distractor_radius(shape["kind"], shape["extent"], shape["params"]), _distractor_mask
        (x0, y0, x1, y1), u, v = _shape_window(shape["cx"], shape["cy"], radius, shape["rotation"], scale)
        mask = mask_fn(shape, u, v)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, hr_w), min(y1, hr_h)
        if cx0 < cx1 and cy0 < cy1:
            sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            if canvas is not None:
                colour = np.asarray(shape["colour"], dtype=np.uint8)
                np.copyto(canvas[cy0:cy1, cx0:cx1], colour, where=sub[:, :, None])
            if label is not None:
                np.copyto(owner[cy0:cy1, cx0:cx1], np.int16(label), where=sub)
        # The drawn count includes any part outside the image: truncation counts as hidden.
        return (cx0, cy0, max(cx0, cx1), max(cy0, cy1)), int(np.count_nonzero(mask))

    for d in scene["distractors"]:
        if not d["above_objects"]:
            paint(d, label=None)  # under the objects: occludes nothing that is annotated
    painted = [paint(obj, label=index) for index, obj in enumerate(scene["objects"])]
    for d in scene["distractors"]:
        if d["above_objects"]:
            paint(d, label=-1)  # on top: hides the object pixels it covers

    visible = []
    for index, ((x0, y0, x1, y1), drawn) in enumerate(painted):
        mask = owner[y0:y1, x0:x1] == index
        visible.append(
            {"window": (x0, y0, x1, y1), "mask": mask, "visible_pixels": int(np.count_nonzero(mask)), "drawn_pixels": drawn}
        )
    return visible


def render_scene(scene: dict, scale: int) -> tuple[np.ndarray, list[dict]]:
    """Render a scene at ``scale`` times its size.

    Returns the uint8 image [H*scale, W*scale, 3] and, per object (in scene order), a dict with
    ``window`` (x0, y0, x1, y1) in render pixels (clipped to the image), ``mask`` (bool, the
    visible pixels inside the window), ``visible_pixels`` and ``drawn_pixels`` (the whole shape,
    including any part outside the image, so truncation counts as invisible).
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"render scale must be a positive integer, got {scale}")
    width, height = _size_wh(scene["size"])
    hr_w, hr_h = width * scale, height * scale

    background = np.rint(_background(scene["background"], width, height, scale))
    canvas = np.clip(background, 0, 255, out=background).astype(np.uint8)
    visible = _paint_shapes(scene, scale, canvas)

    # Optical blur at render resolution (sigma in LR pixels times scale), then sensor noise.
    blurred = Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(scene["blur_sigma"] * scale))
    image = np.asarray(blurred).astype(np.int16).reshape(height, scale, hr_w * 3)
    # Noise lives on the LR pixel grid (one value per LR pixel, shared by its scale x scale block):
    # it models the LR camera's sensor, is the same field at every render scale, and survives the
    # area reduction unchanged instead of being averaged away. Rounded once at LR, added in int16.
    noise = np.random.default_rng(scene["noise_seed"]).standard_normal((height, width, 3), dtype=np.float32)
    noise = np.rint(noise * np.float32(scene["noise_sigma"])).astype(np.int16)
    # Repeat along x, broadcast over the scale rows of each LR row: long inner loops, no copies.
    image += np.repeat(noise, scale, axis=1).reshape(height, 1, hr_w * 3)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8).reshape(hr_h, hr_w, 3)
    return image, visible


def visible_box_and_area(window: tuple[int, int, int, int], mask: np.ndarray, scale: int) -> tuple[list[float], float]:
    """COCO bbox [x, y, w, h] (LR pixels) and area (visible LR pixels) of a render-scale mask."""
    x0, y0 = window[0], window[1]
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise ValueError("object has no visible pixels")
    left, right = x0 + cols[0], x0 + cols[-1] + 1
    top, bottom = y0 + rows[0], y0 + rows[-1] + 1
    bbox = [float(left / scale), float(top / scale), float((right - left) / scale), float((bottom - top) / scale)]
    return bbox, np.count_nonzero(mask) / scale**2


def _is_kept(vis: dict) -> bool:
    return vis["visible_pixels"] > 0 and vis["visible_pixels"] >= MIN_VISIBLE_FRACTION * vis["drawn_pixels"]


def _finalise_scene(rng: np.random.Generator, size, scale: int):
    """Sample scenes until one has 5..30 objects that are each at least half visible.

    Mostly hidden objects are removed from the scene, judged first on a cheap 2x layout pass
    (shapes only) and then confirmed on the real render. Removing an object can only uncover
    others, so one confirmation pass nearly always suffices.
    Returns (scene, image at ``scale``, visible masks).
    """
    while True:
        scene = sample_scene(rng, size)
        layout = _paint_shapes(scene, min(scale, 2), canvas=None)
        scene["objects"] = [obj for obj, vis in zip(scene["objects"], layout) if _is_kept(vis)]
        while len(scene["objects"]) >= OBJECTS_PER_IMAGE[0]:
            image, visible = render_scene(scene, scale)
            keep = [_is_kept(vis) for vis in visible]
            if all(keep):
                return scene, image, visible
            # Borderline at the finer scale: drop and render again.
            scene["objects"] = [obj for obj, k in zip(scene["objects"], keep) if k]
        # Rare: too few objects survived placement and occlusion; draw a whole new scene.


# --------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------

SPLITS = ("train", "val")


def _png_bytes(image: np.ndarray, compress_level: int = 3) -> bytes:
    # Fixed encoder parameters and no metadata: the same pixels always give the same bytes.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _make_image(task: tuple) -> tuple[int, dict, list[dict]]:
    """Worker: sample, render and write one image (and its twin). Returns (image id, scene, anns)."""
    out_dir, split, image_id, seed, size, render_scale, hr_scale = task
    # Seeded by (seed, split, image): an image is the same whichever worker makes it, and in
    # whatever order; train and val never share a stream.
    rng = np.random.default_rng([seed, SPLITS.index(split), image_id])
    scene, hr_image, visible = _finalise_scene(rng, size, render_scale)
    file_name = f"{image_id:06d}.png"
    lr_image = area_downsample(hr_image, render_scale)
    # Workers write image files themselves so megabyte-sized twins never cross a pipe. A crash
    # leaves no instances json (written last), so a half-made dataset cannot be mistaken for one.
    (Path(out_dir) / split / file_name).write_bytes(_png_bytes(lr_image))
    if hr_scale:
        twin = hr_image if hr_scale == render_scale else render_scene(scene, hr_scale)[0]
        # Lowest zlib effort for the large twins: still deterministic, several times faster.
        (Path(out_dir) / f"{split}_x{hr_scale}" / file_name).write_bytes(_png_bytes(twin, compress_level=1))
        for d in reduced_twin_scales(hr_scale):
            # what coco.read_twin makes of the xK twin on load, pixel for pixel, without decoding it
            reduced = area_downsample(twin, hr_scale // d)
            (Path(out_dir) / f"{split}_x{d}" / file_name).write_bytes(_png_bytes(reduced, compress_level=1))
    annotations = []
    for obj, vis in zip(scene["objects"], visible):
        bbox, area = visible_box_and_area(vis["window"], vis["mask"], render_scale)
        annotations.append({"category_id": CLASS_NAMES.index(obj["category"]) + 1, "bbox": bbox, "area": area})
    return image_id, scene, annotations


def _read_info(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("info", {}) if isinstance(data, dict) else {}


def reduced_twin_scales(hr_scale: int) -> list[int]:
    """The scales d < K dividing K whose twins ``generate`` writes beside the xK ones (x2 for x4:
    G at x2 and the HR oracle at x2 read them, and a 512 px twin decodes several times faster than
    a 1024 px one)."""
    return [d for d in range(2, hr_scale) if hr_scale % d == 0]


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{out_dir}: directory is not empty; refusing to write a dataset into it (pass overwrite=True)"
            )
        # Replace only a dataset this generator wrote (its jsons carry info.sodlab_synth), or an
        # interrupted generation (nothing but a generated dataset's parts): never a real dataset.
        jsons = sorted((out_dir / "annotations").glob("instances_*.json"))
        ours = {*SPLITS, "annotations"} | {p.name for p in out_dir.glob("*_x*")}
        if jsons and not all("sodlab_synth" in (_read_info(path)) for path in jsons):
            raise ValueError(f"{out_dir}: holds a dataset sodlab synth did not write (no info.sodlab_synth in "
                             f"{jsons[0].name}); refusing to overwrite it")
        if not jsons and any(p.name not in ours for p in out_dir.iterdir()):
            raise ValueError(f"{out_dir}: holds files that are not a generated dataset; refusing to overwrite it")
        # Remove only what a generated dataset consists of, so no stale image of an earlier,
        # larger run survives next to the new json.
        for split in SPLITS:
            for path in [out_dir / split, *out_dir.glob(f"{split}_x*")]:
                if path.is_dir():
                    shutil.rmtree(path)
            for name in (f"instances_{split}.json", f"scenes_{split}.json"):
                (out_dir / "annotations" / name).unlink(missing_ok=True)


def generate(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    seed: int = 0,
    size: int | tuple[int, int] = 256,
    hr_scale: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    render_scale: int = 4,
) -> dict:
    """Write the benchmark to ``out_dir`` (layout in the module docstring) and return a summary.

    ``size`` is the LR image size (int for square, or (width, height)); object sizes are absolute
    pixels (COCO's buckets), not relative to the image. ``hr_scale=K`` also writes the exact HR
    twins at xK, and their area averages at ``reduced_twin_scales(K)``. ``workers`` defaults to
    os.cpu_count(); the output does not depend on it.
    The summary holds per-split image and object counts, the measured size-bucket fractions and
    the wall time.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"image counts must be non-negative, got train={n_train} val={n_val}")
    if hr_scale is not None and int(hr_scale) < 2:
        # x1 would be the LR image itself, which is already in DIR/{split}/.
        raise ValueError(f"hr_scale must be an integer >= 2, got {hr_scale}")
    width, height = _size_wh(size)
    hr_scale = int(hr_scale) if hr_scale else None
    workers = max(1, int(workers or os.cpu_count() or 1))
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for k in [hr_scale, *reduced_twin_scales(hr_scale)] if hr_scale else []:
            (out_dir / f"{split}_x{k}").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)

    params = {
        "seed": int(seed),
        "size": [width, height],
        "render_scale": int(render_scale),
        "hr_scale": hr_scale,
        "num_classes": len(CLASS_NAMES),
        "version": SYNTH_VERSION,
    }
    counts = {"train": int(n_train), "val": int(n_val)}
    tasks = [
        (str(out_dir), split, image_id, int(seed), [width, height], int(render_scale), hr_scale)
        for split in SPLITS
        for image_id in range(1, counts[split] + 1)
    ]
    start = time.perf_counter()
    results: dict[str, list] = {split: [] for split in SPLITS}
    bar = tqdm(total=len(tasks), desc=f"synth {out_dir}", unit="img", disable=not progress)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                results[task[1]].append(_make_image(task))
                bar.update()
        else:
            # imap keeps task order, so the json is assembled identically for any worker count.
            # Leaving the block terminates the workers: all results (and files) are done by then.
            with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
                for task, output in zip(tasks, pool.imap(_make_image, tasks, chunksize=4)):
                    results[task[1]].append(output)
                    bar.update()

    summary: dict[str, Any] = {"out_dir": str(out_dir), "splits": {}, "objects": 0}
    bucket_counts = dict.fromkeys(("small", "medium", "large"), 0)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    for split in SPLITS:
        images, annotations, scenes = [], [], {}
        for image_id, scene, anns in results[split]:
            images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": width, "height": height})
            scenes[str(image_id)] = scene
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann, "iscrowd": 0})
                bucket_counts[size_bucket(ann["area"])] += 1
        info = {"description": "sodlab embedded small-object benchmark (synthetic shapes)", "sodlab_synth": params}
        # Scenes first, instances last: the instances json marks a complete split.
        scenes_doc = {"version": SYNTH_VERSION, "render_scale": int(render_scale), "scenes": scenes}
        atomic_write_json(out_dir / "annotations" / f"scenes_{split}.json", scenes_doc, indent=None)
        coco = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        atomic_write_json(out_dir / "annotations" / f"instances_{split}.json", coco, indent=None)
        summary["splits"][split] = {"images": len(images), "objects": len(annotations)}
        summary["objects"] += len(annotations)

    seconds = time.perf_counter() - start
    total = max(1, sum(bucket_counts.values()))
    summary["size_fractions"] = {name: count / total for name, count in bucket_counts.items()}
    summary["seconds"] = round(seconds, 3)
    summary["images_per_second"] = round(len(tasks) / seconds, 2) if seconds > 0 else None
    return summary


# --------------------------------------------------------------------------------------------
# Reading twins back
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_scenes(path: str, mtime_ns: int) -> dict:
    # Keyed on mtime as well, so a regenerated dataset is never served from a stale cache.
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def render_twin(data_dir: str | os.PathLike, split: str, image_id: int, k: int) -> np.ndarray:
    """The xk HR twin of an image: read from DIR/{split}_x{k}/ if written (or area-averaged from
    written twins of a multiple of k), else rendered again from DIR/annotations/scenes_{split}.json.
    k=1 gives the LR image itself."""
    data_dir = Path(data_dir)
    file_name = f"{int(image_id):06d}.png"
    source = (data_dir / split, 1) if k == 1 else twin_source(data_dir, split, k)
    if source is not None and (source[0] / file_name).is_file():
        return np.asarray(read_twin(source, file_name, image_id))
    scenes_path = data_dir / "annotations" / f"scenes_{split}.json"
    if not scenes_path.is_file():
        raise FileNotFoundError(f"{scenes_path}: no scene file to render image {image_id} of split {split!r} from")
    doc = _load_scenes(str(scenes_path), scenes_path.stat().st_mtime_ns)
    scene = doc["scenes"].get(str(int(image_id)))
    if scene is None:
        raise KeyError(f"{scenes_path}: no scene for image id {image_id}")
    if k == 1:
        # The LR image is the area reduction of the master render, not a render at scale 1.
        master = int(doc["render_scale"])
        return area_downsample(render_scene(scene, master)[0], master)
    return render_scene(scene, k)[0]
