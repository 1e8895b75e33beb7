"""The demo world: rendered scenes with templated captions and controlled alt-text noise.

It stands in for a web crawl so that every later stage can be measured against ground truth on a CPU.
A scene holds one or two objects, each with a colour (8), a shape (5) and a size (small/large), two
objects stand in a spatial relation (left of / right of / above / below), on a muted background
(gray/beige/slate/brown; solid, gradient or noise texture) that no object colour resembles.

Captions come from templates and state a subset of the scene's facts; ``parse_caption`` recovers
them, ``scene_facts`` lists every fact true of a scene, and ``caption_accuracy`` says whether every
fact a caption states is true (the eval stage's attribute accuracy). Generation checks its own clean
captions with the parser, so the two can never drift apart.

Splits (see shards/README.md): ``web`` (alt-text, a share ``cfg.noise`` of it noisy: ``swap`` = the
caption of another image, ``attribute`` = one stated attribute wrong, ``junk`` = file names and
boilerplate), ``human`` (clean, 2 references: ``json["captions"]``, ``txt`` = the first) and ``test``
(clean, 5 references, same layout). Ground truth goes to ``truth.parquet`` only, never into shards.
Everything is a function of ``cfg.seed``: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from capfilt.data.sample import Sample
from capfilt.data.writer import atomic_open, check_bucket, write_samples_shard

COLORS = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 45, 185),
    "orange": (250, 135, 15),
    "pink": (245, 125, 195),
    "cyan": (40, 205, 220),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "beige": (196, 186, 162),
    "slate": (88, 98, 112),
    "brown": (118, 100, 88),
}
TEXTURES = ("solid", "gradient", "noise")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": (0.10, 0.13), "large": (0.19, 0.23)}  # radius as a share of the image side
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
SPLITS = ("web", "human", "test")
REFERENCES = {"web": 1, "human": 2, "test": 5}
NOISE_TYPES = ("swap", "attribute", "junk")
JUNK = (
    "IMG_{n4}.jpg",
    "DSC{n5}.JPG",
    "click to enlarge",
    "image",
    "stock photo {n5}",
    "untitled",
    "thumbnail",
    "view larger",
    "picture {n1} of 12",
    "download now",
    "no description available",
    "photo_{n4}_final.png",
)

# Templates: {o0}/{o1} an object with size, {c0} colour and shape only, {rel}/{inv} a relation phrase.
ONE = (
    "{o0}",
    "{c0} on a {bg} background",
    "a photo of {o0}",
    "{o0} on a {bg} background",
    "there is {c0} in the picture",
    "{c0}",
)
TWO = (
    "{o0} {rel} {o1}",
    "{o1} {inv} {o0}",
    "{o0} and {o1} on a {bg} background",
    "{c0} {rel} {c1}",
    "two shapes: {o0} {rel} {o1}",
    "{o0} is {rel} {o1}",
)

Scene = dict  # {"background": {"color", "texture"}, "objects": [{"shape", "color", "size", "x", "y", "r"}],
#               "relation": "left_of"|"right_of"|"above"|"below"|None (object 0 relative to object 1)}


# --- scenes and pixels --------------------------------------------------------------------------------


def make_scene(rng: np.random.Generator) -> Scene:
    """A random scene; positions are shares of the image side, so any resolution renders it."""
    n = int(rng.integers(1, 3))
    objects = [
        {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "color": list(COLORS)[rng.integers(len(COLORS))],
            "size": size,
            "r": float(rng.uniform(*SIZES[size])),
        }
        for size in (("small", "large")[rng.integers(2)] for _ in range(n))
    ]
    relation = None
    if n == 1:
        objects[0]["x"], objects[0]["y"] = (float(v) for v in 0.5 + rng.uniform(-0.14, 0.14, 2))
    else:
        relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
        near, far = 0.25 + rng.uniform(-0.03, 0.03, 2), 0.75 + rng.uniform(-0.03, 0.03, 2)
        cross = 0.5 + rng.uniform(-0.07, 0.07, 2)  # the other axis varies less than the relation's axis
        first, second = (near, far) if relation in ("left_of", "above") else (far, near)
        for obj, main, other in zip(objects, (first[0], second[0]), cross):
            horizontal = relation in ("left_of", "right_of")
            obj["x"], obj["y"] = (float(main), float(other)) if horizontal else (float(other), float(main))
    background = {
        "color": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
    }
    return {"background": background, "objects": objects, "relation": relation}


def _background(scene: Scene, side: int, rng: np.random.Generator) -> Image.Image:
    base = np.array(BACKGROUNDS[scene["background"]["color"]], dtype=np.float32)
    texture = scene["background"]["texture"]
    if texture == "solid":
        return Image.new("RGB", (side, side), tuple(int(v) for v in base))
    if texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.arange(side, dtype=np.float32) / side - 0.5) * 0.35
        img = base * (1 + np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None])
    else:  # noise
        img = base + 14 * rng.standard_normal((side, side, 1), dtype=np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, obj: dict, side: int) -> None:
    cx, cy, r = obj["x"] * side, obj["y"] * side, obj["r"] * side
    fill = COLORS[obj["color"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = 0.32 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)


def render(scene: Scene, size: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    """JPEG bytes of the scene at size×size, drawn at 2× and box-filtered for clean edges."""
    side = 2 * size
    canvas = _background(scene, size, rng).resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        _draw(draw, obj, side)
    buf = io.BytesIO()
    canvas.resize((size, size), Image.Resampling.BOX).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --- captions and facts --------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _templates(scene: Scene) -> tuple[str, ...]:
    return ONE if len(scene["objects"]) == 1 else TWO


def describe(scene: Scene, template: int) -> str:
    """The caption template number ``template`` says of ``scene`` (true by construction)."""
    objs = scene["objects"]
    fields = {"bg": scene["background"]["color"]}
    for i, o in enumerate(objs):
        fields[f"o{i}"] = _a(f"{o['size']} {o['color']} {o['shape']}")
        fields[f"c{i}"] = _a(f"{o['color']} {o['shape']}")
    if scene["relation"]:
        fields["rel"], fields["inv"] = RELATIONS[scene["relation"]], RELATIONS[INVERSE[scene["relation"]]]
    templates = _templates(scene)
    return templates[template % len(templates)].format(**fields)


Descriptor = tuple  # (size | None, colour | None, shape | None)
_REL_PATTERN = re.compile(r"\b(to the left of|left of|to the right of|right of|above|below)\b")
_REL_WORDS = {
    "to the left of": "left_of",
    "left of": "left_of",
    "to the right of": "right_of",
    "right of": "right_of",
    "above": "above",
    "below": "below",
}


def _canonical(rel: str, a: Descriptor, b: Descriptor) -> tuple:
    """left_of/above are kept; right_of/below become their inverse with the objects swapped."""
    return (rel, a, b) if rel in ("left_of", "above") else (INVERSE[rel], b, a)


def parse_caption(text: str) -> set[tuple]:
    """The facts a caption states: ``("object", desc)``, ``(relation, desc, desc)``, ``("background", c)``.

    A descriptor is ``(size, colour, shape)`` with None for what the caption leaves out; an object
    phrase ends at its shape word. A relation phrase between two object phrases relates them.
    """
    text = re.sub(r"[^a-z ]+", " ", text.lower())
    facts: set[tuple] = set()
    for bg in re.findall(r"\bon an? (\w+) background\b", text):
        if bg in BACKGROUNDS:
            facts.add(("background", bg))
    text = re.sub(r"\bon an? \w+ background\b", " ", text)
    text = _REL_PATTERN.sub(lambda m: " REL_" + _REL_WORDS[m.group(1)] + " ", text)
    objects, relations, pending, size, color = [], [], None, None, None
    for word in text.split():
        if word.startswith("REL_"):
            pending = (word[4:], len(objects))
        elif word in SIZE_WORDS:
            size = SIZE_WORDS[word]
        elif word in COLORS:
            color = word
        elif word in SHAPES or (size or color) and word in ("shape", "object", "thing"):
            objects.append((size, color, word if word in SHAPES else None))
            size = color = None
            if pending and pending[1] == len(objects) - 1 and pending[1] > 0:
                relations.append(_canonical(pending[0], objects[-2], objects[-1]))
                pending = None
    if size or color:
        objects.append((size, color, None))
    facts.update(("object", d) for d in objects)
    facts.update(relations)
    return facts


def _masks(obj: dict) -> list[Descriptor]:
    full = (obj["size"], obj["color"], obj["shape"])
    return [
        tuple(v if keep else None for v, keep in zip(full, m)) for m in itertools.product((0, 1), repeat=3)
    ]


def scene_facts(scene: Scene) -> set[tuple]:
    """Every fact a caption could state truly of ``scene`` (all partial descriptors of each object)."""
    facts = {("background", scene["background"]["color"])}
    for obj in scene["objects"]:
        facts.update(("object", d) for d in _masks(obj))
    if scene["relation"]:
        a, b = scene["objects"]
        for da, db in itertools.product(_masks(a), _masks(b)):
            facts.add(_canonical(scene["relation"], da, db))
    return facts


def caption_accuracy(caption: str, scene: Scene) -> bool:
    """True when the caption names at least one object and every fact it states is true of the scene."""
    facts = parse_caption(caption)
    return any(f[0] == "object" for f in facts) and facts <= scene_facts(scene)


# --- noise ---------------------------------------------------------------------------------------------


def _junk(rng: np.random.Generator) -> str:
    pattern = JUNK[rng.integers(len(JUNK))]
    return pattern.format(n1=rng.integers(1, 12), n4=rng.integers(1000, 9999), n5=rng.integers(10000, 99999))


def _wrong_attribute(scene: Scene, template: int, rng: np.random.Generator) -> str | None:
    """The same template on a scene with one attribute changed, so the caption states one wrong fact."""
    for _ in range(50):
        mutated = json.loads(json.dumps(scene))
        obj = mutated["objects"][rng.integers(len(mutated["objects"]))]
        what = ("color", "shape", "size", "relation", "background")[rng.integers(5)]
        if what == "relation" and mutated["relation"]:
            mutated["relation"] = INVERSE[mutated["relation"]]
        elif what == "background":
            mutated["background"]["color"] = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        elif what in ("color", "shape", "size"):
            choices = {"color": list(COLORS), "shape": SHAPES, "size": list(SIZES)}[what]
            obj[what] = choices[rng.integers(len(choices))]
        caption = describe(mutated, template)
        if not caption_accuracy(caption, scene):
            return caption
    return None


# --- the world -----------------------------------------------------------------------------------------


@dataclass
class Item:
    """One generated sample with its truth, before it is split into shard members and truth rows."""

    key: str
    split: str
    scene: Scene
    image: bytes
    templates: list[int]  # distinct template numbers of the references
    references: list[str]  # clean captions
    caption: str = ""  # what the shard says (alt-text for web, the first reference otherwise)
    noise_type: str = "none"


def _make_split(split: str, n: int, cfg) -> list[Item]:
    items = []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
        scene = make_scene(rng)
        image = render(scene, cfg.image_size, rng)
        templates = [int(t) for t in rng.permutation(len(_templates(scene)))[: REFERENCES[split]]]
        refs = [describe(scene, t) for t in templates]
        items.append(Item(f"{split}-{i:08d}", split, scene, image, templates, refs, refs[0]))
    return items


def _add_noise(items: list[Item], noise: float, rng: np.random.Generator) -> None:
    """Make ``round(noise * n)`` captions noisy, each of a uniformly drawn kind."""
    noisy = rng.permutation(len(items))[: round(noise * len(items))]
    for i in sorted(noisy):
        item, kind = items[i], NOISE_TYPES[rng.integers(len(NOISE_TYPES))]
        caption = None
        if kind == "swap" and len(items) > 1:
            for j in rng.integers(len(items), size=50):
                if j != i and not caption_accuracy(items[j].references[0], item.scene):
                    caption = items[j].references[0]
                    break
        elif kind == "attribute":
            caption = _wrong_attribute(item.scene, item.templates[0], rng)
        if caption is None:  # junk, or a swap/attribute that found no false caption
            kind, caption = "junk", _junk(rng)
        item.caption, item.noise_type = caption, kind


def _shard_samples(items: list[Item]) -> list[Sample]:
    def meta(item: Item) -> dict:
        return {"caption": item.caption} | ({"captions": item.references} if item.split != "web" else {})

    return [Sample(it.key, "", it.image, "jpg", it.caption, meta(it)) for it in items]


def _write_truth(url: str, items: list[Item]) -> None:
    table = pa.table(
        {
            "key": [it.key for it in items],
            "split": [it.split for it in items],
            "noisy": [it.noise_type != "none" for it in items],
            "noise_type": [it.noise_type for it in items],
            "clean_caption": [it.references[0] for it in items],
            "scene": [json.dumps(it.scene, sort_keys=True) for it in items],
        }
    )
    with atomic_open(url) as f:
        pq.write_table(table, f)


def write_world(out: str, cfg) -> str:
    """Write ``OUT/{web,human,test}-NNNNNN.tar`` and ``OUT/truth.parquet`` from a ``SynthConfig``."""
    out = out.rstrip("/")
    check_bucket(out)
    everything, lines = [], []
    for split, n in zip(SPLITS, (cfg.n_web, cfg.n_human, cfg.n_test)):
        items = _make_split(split, n, cfg)
        if split == "web":
            _add_noise(items, cfg.noise, np.random.default_rng([cfg.seed, 1000]))
        for shard, start in enumerate(range(0, n, cfg.shard_size)):
            write_samples_shard(
                f"{out}/{split}-{shard:06d}.tar", _shard_samples(items[start : start + cfg.shard_size])
            )
        noisy = sum(it.noise_type != "none" for it in items)
        lines.append(f"{split}: {n} samples in {-(-n // cfg.shard_size)} shard(s), {noisy} noisy")
        everything += items
    _write_truth(f"{out}/truth.parquet", everything)
    return f"demo world in {out} ({cfg.image_size} px, seed {cfg.seed})\n" + "\n".join(lines)
