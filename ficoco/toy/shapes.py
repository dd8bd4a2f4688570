"""The toy world's images and questions: small coloured shapes on a two-tone floor.

An image is IMAGE_SIZE x IMAGE_SIZE pixels, divided into GRID x GRID cells of CELL pixels. The
cell size equals the toy model's patch size, so every object covers exactly one vision patch:
dropping that one visual token removes the object from the model's view. Objects never touch
(no two objects in neighbouring cells, diagonals included), so every object is one connected blob
of colour. The floor is dark on the left half and lighter on the right half, so an object's side
is visible inside its own patch. A scene has 1-6 objects (asked-about object(s) + 0-3 distractors).

Each sample is one image with one question whose answer is one vocabulary word:

| kind     | question                                   | answer                   |
|----------|--------------------------------------------|--------------------------|
| color    | what color is the {shape} ?                | red, green, ... (6)      |
| shape    | which shape is {color} ?                   | square, circle, ... (4)  |
| count    | how many objects are {color} ?             | one, two, three          |
| position | on which side is the {shape} ?             | left, right              |

The scene is drawn *for* its question (the asked-about object is unique, the count is exact), and
the answer is sampled uniformly before the scene, so every answer word is equally likely within
its kind. Everything is a function of (seed, split, index): `sample(seed, split, i)` is the same
image bytes and question on every machine.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 96                     # pixels per side
CELL = 8                            # pixels per grid cell (= the toy model's patch size)
GRID = IMAGE_SIZE // CELL           # 12 cells per side -> 144 patches
# The floor: a dark left half and a lighter right half, so an object's side is visible in its own patch.
BACKGROUND_LEFT = (24, 24, 24)
BACKGROUND_RIGHT = (72, 72, 72)

# name -> RGB; far apart from each other and from the background
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
    "cyan": (40, 220, 230),
}


def _shape_masks() -> dict[str, np.ndarray]:
    """name -> (CELL, CELL) bool mask; each shape fits rows/cols 1..6 and covers pixel (3, 3) and (4, 4).

    The areas differ (square 36, circle 32, triangle 24, cross 20 pixels), which lets a test
    recognise a shape from the rendered pixels alone.
    """
    rows, cols = np.mgrid[0:CELL, 0:CELL]                          # (CELL, CELL) each
    inside = (rows >= 1) & (rows <= 6) & (cols >= 1) & (cols <= 6)
    square = inside
    circle = inside & ((rows - 3.5) ** 2 + (cols - 3.5) ** 2 <= 9.0)
    half_width = np.array([0, 1, 1, 2, 2, 3, 3, 0])                # per row: columns 4-w .. 3+w
    triangle = inside & (cols >= 4 - half_width[rows]) & (cols <= 3 + half_width[rows])
    cross = inside & (((rows >= 3) & (rows <= 4)) | ((cols >= 3) & (cols <= 4)))
    return {"square": square, "circle": circle, "triangle": triangle, "cross": cross}


SHAPE_NAMES = ("square", "circle", "triangle", "cross")
COLOR_NAMES = tuple(COLORS)
NUMBER_WORDS = ("one", "two", "three")
SIDES = ("left", "right")
KINDS = ("color", "shape", "count", "position")
SPLITS = {"train": 1, "test": 2, "val": 3}    # split name -> code mixed into the random stream

# The asked-about word is always the last one before "?", so it sits at the same distance from
# the answer position in every kind (a tiny model learns a fixed offset far faster than many).
QUESTION_TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "which shape is {color} ?",
    "count": "how many objects are {color} ?",
    "position": "on which side is the {shape} ?",
}
# A caption lists the objects in raster order ("red square left , blue circle right ."): the text
# side of the vision tower's CLIP-style pretraining (ficoco/toy/clip.py).
CAPTION_SEPARATOR, CAPTION_END = ",", "."


def vocabulary() -> list[str]:
    """Every word a question or an answer can contain, in a fixed order."""
    words: list[str] = []
    for template in QUESTION_TEMPLATES.values():
        for word in template.split():
            if not word.startswith("{") and word not in words:
                words.append(word)
    for word in (*COLOR_NAMES, *SHAPE_NAMES, *NUMBER_WORDS, *SIDES, CAPTION_SEPARATOR, CAPTION_END):
        if word not in words:
            words.append(word)
    return words


@dataclass(frozen=True)
class ToyObject:
    shape: str
    color: str
    row: int                        # grid cell row, 0 = top
    col: int                        # grid cell column, 0 = left

    @property
    def center_pixel(self) -> tuple[int, int]:
        """(y, x) of a pixel inside the object's shape (every mask covers (4, 4) of its cell)."""
        return self.row * CELL + 4, self.col * CELL + 4

    @property
    def patch_index(self) -> int:
        """Raster index of the object's patch in the GRID x GRID patch grid."""
        return self.row * GRID + self.col


@dataclass(frozen=True)
class ToySample:
    id: str
    kind: str
    question: str
    answer: str
    objects: tuple[ToyObject, ...]
    target: tuple[int, ...]         # indices into objects that the answer depends on

    def image(self) -> Image.Image:
        return render(self.objects)

    def caption(self) -> str:
        return caption(self.objects)

    def all_questions(self) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """Every unambiguous (kind, question, answer, target) about this scene (multi-turn training)."""
        return scene_questions(self.objects)

    def meta(self) -> dict:
        """JSON-able description of the scene (benchmark `meta` column)."""
        return {
            "kind": self.kind,
            "objects": [[o.shape, o.color, o.row, o.col] for o in self.objects],
            "target": list(self.target),
            "target_patches": [self.objects[i].patch_index for i in self.target],
        }


def column_side(col: int) -> str:
    """The floor half a grid column lies on."""
    return SIDES[0] if col < GRID // 2 else SIDES[1]


def side(obj: ToyObject) -> str:
    return column_side(obj.col)


def caption(objects) -> str:
    """The scene in words, objects in raster order: "red square left , blue circle right ."."""
    ordered = sorted(objects, key=lambda o: (o.row, o.col))
    parts = [f"{o.color} {o.shape} {side(o)}" for o in ordered]
    return f" {CAPTION_SEPARATOR} ".join(parts) + f" {CAPTION_END}"


def scene_questions(objects) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(kind, question, answer, target object indices) for every question the scene answers
    unambiguously, in a fixed order."""
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPE_NAMES}
    color_counts = {c: sum(o.color == c for o in objects) for c in COLOR_NAMES}
    questions = []
    for index, obj in enumerate(objects):
        if shape_counts[obj.shape] == 1:
            questions.append(("color", QUESTION_TEMPLATES["color"].format(shape=obj.shape), obj.color, (index,)))
            questions.append(("position", QUESTION_TEMPLATES["position"].format(shape=obj.shape), side(obj), (index,)))
        if color_counts[obj.color] == 1:
            questions.append(("shape", QUESTION_TEMPLATES["shape"].format(color=obj.color), obj.shape, (index,)))
    for color, count in color_counts.items():
        if 1 <= count <= len(NUMBER_WORDS):
            target = tuple(i for i, o in enumerate(objects) if o.color == color)
            questions.append(("count", QUESTION_TEMPLATES["count"].format(color=color), NUMBER_WORDS[count - 1], target))
    return questions


def render_pixels(objects, masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Draw the objects on the background: (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB.

    masks: `_shape_masks()`, passed by callers that draw many scenes (training draws tens of thousands)."""
    masks = _shape_masks() if masks is None else masks
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)   # (H, W, 3)
    pixels[:, :IMAGE_SIZE // 2] = BACKGROUND_LEFT
    pixels[:, IMAGE_SIZE // 2:] = BACKGROUND_RIGHT
    for obj in objects:
        cell = pixels[obj.row * CELL:(obj.row + 1) * CELL, obj.col * CELL:(obj.col + 1) * CELL]
        cell[masks[obj.shape]] = COLORS[obj.color]
    return pixels


def render(objects) -> Image.Image:
    """Draw the objects on the background; RGB, IMAGE_SIZE x IMAGE_SIZE."""
    return Image.fromarray(render_pixels(objects), mode="RGB")


def batch_pixels(rows) -> list[np.ndarray]:
    """Every row's image as its uint8 array (`render_pixels`), the masks built once: what training feeds
    `ficoco.toy.model.pixel_values`, without a round trip through PIL."""
    masks = _shape_masks()
    return [render_pixels(row.objects, masks) for row in rows]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: valid splits are {sorted(SPLITS)}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _free_cells(rng: np.random.Generator, count: int, placed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`placed` + more grid cells up to `count`, no two of them neighbours (Chebyshev distance >= 2)."""
    cells = list(placed)
    while len(cells) < count:
        row, col = (int(v) for v in rng.integers(0, GRID, size=2))
        if all(max(abs(row - r), abs(col - c)) >= 2 for r, c in cells):
            cells.append((row, col))
    return cells


def _pick(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample(seed: int, split: str, index: int, kind: str | None = None, max_others: int = 3) -> ToySample:
    """Sample `index` of a split. `kind=None` cycles through KINDS by index (balanced kinds).

    max_others: most distractors besides the asked-about object(s) (1..max_others; 0 = none).
    Evaluation data uses the default 3; training starts lower (a curriculum).
    """
    rng = _rng(seed, split, index)
    kind = KINDS[index % len(KINDS)] if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: valid kinds are {list(KINDS)}")
    if not 0 <= max_others <= 3:
        raise ValueError(f"max_others={max_others}: must be in 0..3")
    n_others = int(rng.integers(min(1, max_others), max_others + 1))   # distractors

    if kind == "count":
        color = _pick(rng, COLOR_NAMES)
        count = int(rng.integers(1, len(NUMBER_WORDS) + 1))
        specs = [(_pick(rng, SHAPE_NAMES), color) for _ in range(count)]
        specs += [(_pick(rng, SHAPE_NAMES), _pick(rng, [c for c in COLOR_NAMES if c != color]))
                  for _ in range(n_others)]
        question = QUESTION_TEMPLATES["count"].format(color=color)
        answer = NUMBER_WORDS[count - 1]
        target = tuple(range(count))
    elif kind == "shape":
        color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPE_NAMES)
        specs = [(shape, color)]
        specs += [(_pick(rng, SHAPE_NAMES), _pick(rng, [c for c in COLOR_NAMES if c != color]))
                  for _ in range(n_others)]
        question = QUESTION_TEMPLATES["shape"].format(color=color)
        answer, target = shape, (0,)
    else:                                                           # color, position: a unique shape
        color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPE_NAMES)
        specs = [(shape, color)]
        specs += [(_pick(rng, [s for s in SHAPE_NAMES if s != shape]), _pick(rng, COLOR_NAMES))
                  for _ in range(n_others)]
        question = QUESTION_TEMPLATES[kind].format(shape=shape)
        answer, target = color, (0,)

    placed: list[tuple[int, int]] = []
    if kind == "position":
        target_side = _pick(rng, SIDES)                             # balanced answer: place the target
        half = GRID // 2                                            # columns 0..5 left, 6..11 right
        low = 0 if target_side == "left" else half
        placed.append((int(rng.integers(0, GRID)), int(rng.integers(low, low + half))))
        answer = target_side
    cells = _free_cells(rng, len(specs), placed)
    objects = [ToyObject(shape, color, r, c) for (shape, color), (r, c) in zip(specs, cells)]
    order = rng.permutation(len(objects))                           # target not always first
    objects_shuffled = tuple(objects[i] for i in order)
    new_index = {int(old): new for new, old in enumerate(order)}
    target = tuple(sorted(new_index[t] for t in target))
    return ToySample(id=f"toy-{split}-{seed}-{index:06d}", kind=kind, question=question, answer=answer,
                     objects=objects_shuffled, target=target)


def samples(seed: int, split: str, rows: int) -> list[ToySample]:
    return [sample(seed, split, i) for i in range(rows)]


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def checksum(rows: list[ToySample]) -> str:
    """sha256 over every row's id, question, answer and image pixels."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.id, row.question, row.answer]).encode())
        digest.update(np.asarray(row.image()).tobytes())
    return digest.hexdigest()
