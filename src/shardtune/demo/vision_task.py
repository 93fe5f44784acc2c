"""A synthetic image question that a tiny Llama 3.2 Vision model learns in a minute on a CPU.

Each image is one filled shape (square, circle or triangle) of random size and place on a plain
grey background; the question is always the same, so only the image tells the answer::

    {"images": ["images/train-00042.png"],
     "texts": [{"user": "What colour is the shape?", "assistant": "blue"}]}

Why this task. The answer is one of four colour words whose first tokens differ in the demo
tokenizer (``g re e n``, ``b l u e``, ``y el l ow``, ``v i o let``), so the image has to decide one
token and the text tower can finish the word; a model that ignores the image can do no better
than the most common colour (chance: 1/4), and an untrained one scores 0. The colour is a mean
over the pixels of a patch, which the vision encoder's 14-pixel patch embedding reads almost
linearly, so a model with one cross-attention layer learns it in under 200 small steps.

Every answer is four tokens: ``--batching_strategy padding`` puts samples of equal length in one
batch, and with ``red`` (one token) every batch held only red shapes or none; two seeds of four
then learned far less in the same number of steps (52% and 83% held-out accuracy, not 100%).

Held-out images are new: shape, colour jitter, size, place and background are drawn at random,
and no held-out drawing occurs among the training rows. Rows are a pure function of the seed.
:func:`write_vision_task` writes them in the_cauldron format that ``ocrvqa_dataset`` reads
(one JSON object a line, image paths relative to the file's folder) plus the PNG files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, ImageDraw

QUESTION = "What colour is the shape?"
# Answer word -> base RGB. Each drawing jitters every channel by up to JITTER.
COLOURS: dict[str, tuple[int, int, int]] = {
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 215, 40),
    "violet": (180, 40, 210),
}
SHAPES = ("square", "circle", "triangle")
JITTER = 25


@dataclass(frozen=True)
class Drawing:
    """Everything that decides an image's pixels."""
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    box: tuple[int, int, int, int]  # left, top, right, bottom
    background: int  # grey level


def _draw_params(rng: random.Random, size: int) -> Drawing:
    colour = rng.choice(sorted(COLOURS))
    rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in COLOURS[colour])
    side = rng.randint(size * 3 // 8, size * 3 // 4)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    return Drawing(colour, rgb, rng.choice(SHAPES), (left, top, left + side, top + side),
                   rng.randint(60, 190))


def render(d: Drawing, size: int) -> Image.Image:
    """The image of ``d``: a ``size`` x ``size`` RGB picture."""
    img = Image.new("RGB", (size, size), (d.background,) * 3)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = d.box
    if d.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=d.rgb)
    elif d.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=d.rgb)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=d.rgb)
    return img


def make_drawings(n: int, seed: int, size: int) -> list[Drawing]:
    """``n`` distinct drawings in a seed-determined order."""
    rng = random.Random(seed)
    seen: set[Drawing] = set()
    out: list[Drawing] = []
    while len(out) < n:
        d = _draw_params(rng, size)
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def row_for(image_path: str, answer: str) -> dict:
    """One the_cauldron row: the image and a single question/answer turn."""
    return {"images": [image_path], "texts": [{"user": QUESTION, "assistant": answer}]}


def write_vision_task(out_dir: Union[str, Path], n_train: int, n_eval: int, seed: int,
                      image_size: int = 28) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (the_cauldron rows) and their PNGs under
    ``out_dir/images``. Returns ``(train_path, eval_path)``; no held-out drawing is trained on."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    drawings = make_drawings(n_train + n_eval, seed, image_size)
    paths = []
    for name, part in (("eval", drawings[:n_eval]), ("train", drawings[n_eval:])):
        lines = []
        for i, d in enumerate(part):
            rel = f"images/{name}-{i:05d}.png"
            render(d, image_size).save(out / rel)
            lines.append(json.dumps(row_for(rel, d.colour)))
        path = out / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    eval_path, train_path = paths
    return train_path, eval_path


def read_rows(path: Union[str, Path]) -> list[dict]:
    """The rows of a JSONL file written by :func:`write_vision_task`, image paths made absolute."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        row["images"] = [str(path.parent / p) for p in row["images"]]
    return rows
