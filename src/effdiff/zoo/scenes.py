"""Digit scenes: a compositional (GenEval-style) benchmark built from the offline MNIST digits.

A scene is a 64×64 RGB canvas split into a 2×2 grid of 32×32 cells (0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right). Each cell is empty or holds one MNIST digit tinted with a palette
colour. Every caption describes *all* objects of its scene, so a prompt's structured spec is
exactly what the judge has to check: which digits, how many, which colours, which relation. The
fixed grid keeps the judging simple (per-cell heads) while "left of", "above" and counts still need
the generator to coordinate the whole canvas, which is where few-step sampling loses quality.

Everything here is pure Python / torch: layout sampling and captions are seeded ``numpy`` draws, and
rendering is a batched tensor op that runs on the GPU during training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from effdiff.zoo.data import DIGIT_WORDS, NUM_CLASSES

CANVAS = 64
CELL = 32
NUM_CELLS = 4
DIGIT_SIZE = 28
MAX_JITTER = 2  # a digit sits centred in its cell ± this many pixels
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.85, 0.15),
    "blue": (0.25, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
COLOURS = tuple(PALETTE)
CATEGORIES = ("single", "two-object", "counting", "colour", "position", "colour-attribution")
RELATIONS = ("left of", "above")  # objects[0] is left of / above objects[1]
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")
EVAL_PER_CATEGORY = 48  # "single" has only 60 distinct captions (10 digits × 6 paraphrases)
EVAL_SEED = 1234


@dataclass(frozen=True)
class Obj:
    """One described object: a digit class and, when the caption names it, a colour."""

    digit: int
    colour: str | None = None


@dataclass(frozen=True)
class Prompt:
    """A caption with the structured spec the judge checks it against.

    ``objects`` lists every object of the scene (a count of N is N equal objects); ``relation``
    relates ``objects[0]`` to ``objects[1]``. ``template`` picks the paraphrase of ``text``.
    """

    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None
    template: int = 0

    @property
    def text(self) -> str:
        return caption(self)


# --- captions -------------------------------------------------------------------------------------------------------


def _article(words: str) -> str:
    return "an" if words.split()[0] in ("eight", "8") else "a"  # no colour word starts with a vowel


def _noun(obj: Obj, numeral: bool) -> str:
    """"a red 3" / "a red three" / "an eight"."""
    name = str(obj.digit) if numeral else DIGIT_WORDS[obj.digit]
    words = f"{obj.colour} {name}" if obj.colour else name
    return f"{_article(words)} {words}"


# Paraphrases per category; even template indices spell digits as words, odd ones as numerals
# (``template // 2`` picks the sentence).
_SENTENCES: dict[str, tuple[str, ...]] = {
    "single": ("{o1}", "a picture of {o1}", "{o1} on a black background"),
    "colour": ("{o1}", "a picture of {o1}", "{o1} on a black background"),
    "two-object": ("{o1} and {o2}", "a picture of {o1} and {o2}", "{o1} together with {o2}"),
    "colour-attribution": ("{o1} and {o2}", "a picture of {o1} and {o2}", "{o1} together with {o2}"),
    "counting": ("{count} {plural}", "a picture of {count} {plural}", "exactly {count} {plural}"),
}
# position sentences per relation, the last one naming it from the second object's side
_POSITION_SENTENCES: dict[str, tuple[str, ...]] = {
    "left of": ("{o1} left of {o2}", "{o1} to the left of {o2}", "{o2} right of {o1}"),
    "above": ("{o1} above {o2}", "{o1} on top of {o2}", "{o2} below {o1}"),
}
_SENTENCES["position"] = _POSITION_SENTENCES["left of"]  # for the template count


def num_templates(category: str) -> int:
    return 2 * len(_SENTENCES[category])


def caption(prompt: Prompt) -> str:
    """The caption text of a prompt (deterministic: the template index picks the paraphrase)."""
    sentence = _SENTENCES[prompt.category][prompt.template // 2]
    numeral = prompt.template % 2 == 1
    objs = prompt.objects
    if prompt.category == "counting":
        first = objs[0]
        plural = f"{first.digit}s" if numeral else PLURALS[first.digit]
        if first.colour:
            plural = f"{first.colour} {plural}"
        return sentence.format(count=COUNT_WORDS[len(objs)], plural=plural)
    if prompt.category == "position":
        sentence = _POSITION_SENTENCES[prompt.relation][prompt.template // 2]
    return sentence.format(**{f"o{i + 1}": _noun(o, numeral) for i, o in enumerate(objs)})


# --- prompt and layout sampling -------------------------------------------------------------------------------------


def sample_prompt(category: str, rng: np.random.Generator) -> Prompt:
    """A random prompt of one category (distinct digits wherever two objects must be told apart)."""
    template = int(rng.integers(num_templates(category)))

    def colour(p: float) -> str | None:
        return COLOURS[int(rng.integers(len(COLOURS)))] if rng.random() < p else None

    a, b = (int(d) for d in rng.choice(NUM_CLASSES, size=2, replace=False))
    if category == "single":
        objects: tuple[Obj, ...] = (Obj(a),)
    elif category == "colour":
        objects = (Obj(a, colour(1.0)),)
    elif category == "two-object":
        objects = (Obj(a), Obj(b))
    elif category == "colour-attribution":
        ca, cb = rng.choice(len(COLOURS), size=2, replace=False)
        objects = (Obj(a, COLOURS[int(ca)]), Obj(b, COLOURS[int(cb)]))
    elif category == "counting":
        objects = (Obj(a, colour(0.5)),) * int(rng.integers(2, 5))
    elif category == "position":
        objects = (Obj(a, colour(0.3)), Obj(b, colour(0.3)))
        return Prompt(category, objects, RELATIONS[int(rng.integers(2))], template)
    else:
        raise ValueError(f"unknown category {category!r}; one of {', '.join(CATEGORIES)}")
    return Prompt(category, objects, None, template)


def relation_cells(relation: str, index: int) -> tuple[int, int]:
    """The two cells of row (``left of``) or column (``above``) ``index``: (first object's, second's)."""
    return (2 * index, 2 * index + 1) if relation == "left of" else (index, index + 2)


def sample_layout(prompt: Prompt, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A scene that shows exactly the prompt: (digit per cell, -1 if empty; colour index per cell).

    Colours the caption leaves open are drawn at random; so are cells, within the relation.
    """
    digits = np.full(NUM_CELLS, -1, dtype=np.int64)
    colours = np.zeros(NUM_CELLS, dtype=np.int64)
    if prompt.relation is not None:
        cells = list(relation_cells(prompt.relation, int(rng.integers(2))))
    else:
        cells = [int(c) for c in rng.choice(NUM_CELLS, size=len(prompt.objects), replace=False)]
    for cell, obj in zip(cells, prompt.objects, strict=True):
        digits[cell] = obj.digit
        colours[cell] = COLOURS.index(obj.colour) if obj.colour else int(rng.integers(len(COLOURS)))
    return digits, colours


def random_layouts(n: int, rng: np.random.Generator, p_present: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained layouts (each cell filled with probability ``p_present``): the judge's training data."""
    present = rng.random((n, NUM_CELLS)) < p_present
    digits = np.where(present, rng.integers(0, NUM_CLASSES, (n, NUM_CELLS)), -1)
    return digits.astype(np.int64), rng.integers(0, len(COLOURS), (n, NUM_CELLS)).astype(np.int64)


def eval_prompts(per_category: int = EVAL_PER_CATEGORY, seed: int = EVAL_SEED) -> list[Prompt]:
    """The fixed evaluation set: ``per_category`` distinct prompts of each category, in category order."""
    rng = np.random.default_rng(seed)
    prompts: list[Prompt] = []
    for category in CATEGORIES:
        seen: dict[str, Prompt] = {}
        for _ in range(10_000 * per_category):
            if len(seen) == per_category:
                break
            p = sample_prompt(category, rng)
            seen.setdefault(p.text, p)
        else:
            raise ValueError(f"{category!r} has fewer than {per_category} distinct captions")
        prompts.extend(seen.values())
    return prompts


# --- judging a detected layout against a prompt ---------------------------------------------------------------------


def _matches(obj: Obj, digit: int, colour: int) -> bool:
    return digit == obj.digit and (obj.colour is None or COLOURS[colour] == obj.colour)


def _relation_holds(relation: str, first: int, second: int) -> bool:
    return any(relation_cells(relation, i) == (first, second) for i in range(2))


def satisfies(prompt: Prompt, digits: np.ndarray, colours: np.ndarray) -> bool:
    """GenEval's rule for one image: counting needs the exact count, the rest need every object found.

    ``digits`` is -1 where a cell is empty. Objects are matched to distinct cells, and a relation
    must hold between the cells the two objects were matched to.
    """
    found = [(c, int(digits[c]), int(colours[c])) for c in range(NUM_CELLS) if digits[c] >= 0]
    if prompt.category == "counting":
        return sum(_matches(prompt.objects[0], d, k) for _, d, k in found) == len(prompt.objects)
    for chosen in itertools.permutations(found, len(prompt.objects)):
        if not all(_matches(o, d, k) for o, (_, d, k) in zip(prompt.objects, chosen, strict=True)):
            continue
        if prompt.relation is None or _relation_holds(prompt.relation, chosen[0][0], chosen[1][0]):
            return True
    return False


def score_by_category(prompts: list[Prompt], correct: list[bool]) -> dict[str, float]:
    """Per-category success rates and ``overall``, their mean (GenEval averages the tasks)."""
    scores = {}
    for category in CATEGORIES:
        hits = [ok for p, ok in zip(prompts, correct, strict=True) if p.category == category]
        if hits:
            scores[category] = sum(hits) / len(hits)
    scores["overall"] = sum(scores.values()) / len(scores) if scores else 0.0
    return scores


# --- rendering ------------------------------------------------------------------------------------------------------


def palette_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(COLOURS), 3) RGB in [0, 1]."""
    return torch.tensor([PALETTE[c] for c in COLOURS], device=device)


def render(
    glyphs: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor, instances: torch.Tensor,
    offsets: torch.Tensor, brightness: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scenes in [-1, 1] of shape (B, 3, 64, 64); batched, so it runs on the training device.

    ``glyphs`` (M, 28, 28) uint8 digit images; per cell (B, 4): ``digits`` (-1 = empty), ``colours``
    (palette index), ``instances`` (index into ``glyphs``) and ``offsets`` (B, 4, 2) in
    [-MAX_JITTER, MAX_JITTER] (dy, dx); optional ``brightness`` (B, 4) scales the colour.
    """
    device = glyphs.device
    batch = digits.shape[0]
    pad = CELL - DIGIT_SIZE + MAX_JITTER  # 6: a jittered 32-pixel window always stays inside
    padded = torch.nn.functional.pad(glyphs.float() / 255.0, (pad,) * 4)  # (M, 40, 40)
    base = torch.arange(CELL, device=device) + (CELL - DIGIT_SIZE) // 2 + MAX_JITTER  # centre offset 4
    ys = base.view(1, 1, CELL) - offsets[..., 0:1].to(device)  # (B, 4, 32)
    xs = base.view(1, 1, CELL) - offsets[..., 1:2].to(device)
    inst = instances.to(device)
    cells = padded[inst[..., None, None], ys[..., :, None], xs[..., None, :]]  # (B, 4, 32, 32)
    cells = cells * (digits.to(device) >= 0)[..., None, None]
    tint = palette_tensor(device)[colours.to(device)]  # (B, 4, 3)
    if brightness is not None:
        tint = tint * brightness.to(device)[..., None]
    rgb = cells[:, :, None] * tint[..., None, None]  # (B, 4, 3, 32, 32)
    grid = rgb.view(batch, 2, 2, 3, CELL, CELL).permute(0, 3, 1, 4, 2, 5).reshape(batch, 3, CANVAS, CANVAS)
    return grid * 2.0 - 1.0


def pick_instances(digits: torch.Tensor, by_class: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each cell a random glyph of its digit: ``by_class`` (10, K) lists the glyph indices per class."""
    column = torch.randint(0, by_class.shape[1], digits.shape, generator=gen).to(by_class.device)
    return by_class[digits.to(by_class.device).clamp(min=0), column]


def random_offsets(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-MAX_JITTER, MAX_JITTER + 1, (*shape, 2), generator=gen)


def glyphs_by_class(labels: torch.Tensor) -> torch.Tensor:
    """(10, K) glyph indices per class, K the smallest class size (the split is balanced: 400 / 100)."""
    per = [torch.nonzero(labels == d).flatten() for d in range(NUM_CLASSES)]
    k = min(len(p) for p in per)
    return torch.stack([p[:k] for p in per])


def render_layouts(digits: np.ndarray, colours: np.ndarray, glyphs: torch.Tensor, labels: torch.Tensor,
                   seed: int) -> torch.Tensor:
    """Render given layouts with glyphs of the right class and jitter drawn from ``seed`` (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    d, c = torch.as_tensor(digits), torch.as_tensor(colours)
    instances = pick_instances(d, glyphs_by_class(labels.cpu()).to(glyphs.device), gen)
    return render(glyphs, d, c, instances, random_offsets(tuple(d.shape), gen))
