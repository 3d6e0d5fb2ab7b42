"""The synthetic world: scenes of coloured shapes with known counts, positions and sizes.

Every scene is drawn with PIL from a seeded RNG, and every question about it has a known answer. The
question kinds are few and learnable by a tiny model (colour, shape, count, left/right, closer = bigger),
and the multiple-choice kinds are the same in the SFT data and in the CV-Bench-style evaluation set, so
a model finetuned on the first can beat chance on the second. :mod:`data_prep.synthetic` writes all of
this in the real raw formats.

The cues are kept plain enough for a model of a few hundred thousand parameters trained for minutes:
shapes come in two sizes well apart (:data:`SIZES`), and the captions say which (``a big red circle on
the top left``); a scene of several shapes always has one in the left column and one in the right column
and one of each size. A Relation question names two shapes in opposite outer columns and a Depth question
a big and a small one, so each asks about what the captions describe of the shapes the question names
(the other shapes are distractors).
"""
from __future__ import annotations

import dataclasses
import io
import random

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 170, 40),
                                           "blue": (30, 60, 220), "yellow": (235, 205, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
GRID = 3          # shapes sit in distinct cells of a GRID x GRID layout
# Half-extent (fraction of the image width) of a shape in a scene of several: 10 and 19 pixels wide in a
# 64-pixel image (a grid cell is 21); the caption word of each. A lone shape is drawn larger, centred.
SIZES: dict[str, float] = {"small": 0.08, "big": 0.15}
LONE_SIZES = (0.2, 0.25, 0.3)


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float        # centre, as a fraction of the image width
    y: float
    size: float     # half-extent, as a fraction of the image width

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def size_word(self) -> str:
        return "small" if self.size < SIZES["big"] else "big"

    @property
    def column(self) -> int:
        return min(GRID - 1, int(self.x * GRID))

    def box(self, side: int) -> tuple[float, float, float, float]:
        """COCO ``[x, y, w, h]`` in pixels for an image ``side`` pixels wide."""
        return ((self.x - self.size) * side, (self.y - self.size) * side, 2 * self.size * side,
                2 * self.size * side)


@dataclasses.dataclass(frozen=True)
class Scene:
    id: int
    shapes: tuple[Shape, ...]
    word: str = ""         # a word printed on the image (OCR captions); empty for most scenes


def make_scene(rng: random.Random, scene_id: int, max_shapes: int = 4, word: bool = False) -> Scene:
    """1..max_shapes shapes of distinct colours in distinct grid cells; with several, one of them in the left
    column and one in the right column, at least one small and one big (:data:`SIZES`)."""
    count = rng.randint(1, max_shapes)
    colors = rng.sample(list(COLORS), count)
    if count == 1:
        return Scene(scene_id, (Shape(rng.choice(SHAPES), colors[0], 0.5, 0.5, rng.choice(LONE_SIZES)),),
                     _word(rng, word))
    column = {c: [cell for cell in range(GRID * GRID) if cell % GRID == c] for c in range(GRID)}
    cells = [rng.choice(column[0]), rng.choice(column[GRID - 1])]
    cells += rng.sample([c for c in range(GRID * GRID) if c not in cells], count - 2)
    rng.shuffle(cells)
    sizes = ["small", "big", *(rng.choice(list(SIZES)) for _ in range(count - 2))]
    rng.shuffle(sizes)
    shapes = tuple(Shape(rng.choice(SHAPES), color, (cell % GRID + 0.5) / GRID, (cell // GRID + 0.5) / GRID,
                         SIZES[size]) for color, cell, size in zip(colors, cells, sizes))
    return Scene(scene_id, shapes, _word(rng, word))


def _word(rng: random.Random, word: bool) -> str:
    return rng.choice(["SALE", "OPEN", "STOP", "EXIT"]) if word else ""


def render(scene: Scene, side: int = 64) -> bytes:
    """The scene as JPEG bytes, ``side`` x ``side`` pixels on a light grey background."""
    img = Image.new("RGB", (side, side), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, w, h = s.box(side)
        x1, y1 = x0 + w, y0 + h
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    if scene.word:
        draw.text((2, side - 12), scene.word, fill=(0, 0, 0), font=ImageFont.load_default())
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()


def caption(scene: Scene) -> str:
    """A short description naming every shape and where it is."""
    n = len(scene.shapes)
    parts = [f"a {s.size_word} {s.name} on the {position(s)}" for s in scene.shapes]
    head = f"{NUMBERS[n]} shape{'s' if n > 1 else ''}: "
    text = head + ", ".join(parts) + "."
    return f'{text} the image shows the word "{scene.word}".' if scene.word else text


def position(s: Shape) -> str:
    col = "left" if s.x < 0.4 else "right" if s.x > 0.6 else "center"
    row = "top" if s.y < 0.4 else "bottom" if s.y > 0.6 else "middle"
    return "center" if (col, row) == ("center", "middle") else f"{row} {col}"


@dataclasses.dataclass(frozen=True)
class Question:
    """A question about a scene: short answer, and the choices for the multiple-choice form."""

    task: str                  # count | color | shape | relation | depth
    question: str              # short-answer wording
    answer: str
    mc_question: str           # multiple-choice wording (CV-Bench style)
    choices: tuple[str, ...]   # in a fixed order per kind (numbers ascending, "left" before "right", ...)
    correct: str               # the right one of ``choices``


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """Every question kind that applies to ``scene``."""
    shapes = scene.shapes
    n = len(shapes)
    out = [Question("count", "How many shapes are there?", str(n), "How many shapes are in the image?",
                    tuple(str(i) for i in range(1, 5)), str(n))]
    for s in shapes:
        others = [c for c in COLORS if c != s.color]
        ask = "the shape" if n == 1 else f"the {s.kind}" if sum(o.kind == s.kind for o in shapes) == 1 else None
        if ask:
            shown = {s.color, *rng.sample(others, 2)}
            out.append(Question("color", f"What color is {ask}?", s.color, f"What color is {ask}?",
                                tuple(c for c in COLORS if c in shown), s.color))
        out.append(Question("shape", f"What shape is the {s.color} object?", s.kind,
                            f"What shape is the {s.color} object?", SHAPES, s.kind))
    sides = [(a, b) for a in shapes for b in shapes if {a.column, b.column} == {0, GRID - 1}]
    if sides:
        a, b = rng.choice(sides)
        left = a.x < b.x
        out.append(Question("relation", f"Is the {a.name} left of the {b.name}?", "yes" if left else "no",
                            f"Is the {a.name} to the left or to the right of the {b.name}?",
                            ("left", "right"), "left" if left else "right"))
    sized = [(a, b) for a in shapes for b in shapes if a.size_word != b.size_word]
    if sized:
        a, b = rng.choice(sized)
        closer = a if a.size > b.size else b
        out.append(Question("depth", f"Which shape is closer to the camera, the {a.name} or the {b.name}?",
                            closer.name, f"Which shape is closer to the camera, the {a.name} or the {b.name}?",
                            (a.name, b.name), closer.name))
    return out


def mc_choices(q: Question) -> tuple[list[str], int]:
    """The choices and the index of the correct one.

    Choices keep a fixed order per question kind (as benchmark authors usually list them: numbers
    ascending, "left" before "right", the two shapes in the order the question names them), so an option
    letter means the same answer across questions of one kind, while the correct letter still varies
    with the image.
    """
    return list(q.choices), q.choices.index(q.correct)
