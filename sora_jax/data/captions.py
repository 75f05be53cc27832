"""Captions for the toy world, generated from its ground truth.

Two steps, so captions can be checked against the truth:

  caption_facts(gt)        -> a set of fact tuples read off the ground truth
                              (what is there, how it moves, which events happened)
  caption_from_facts(...)  -> English, with synonyms and sentence order drawn
                              from an rng seeded by (seed, index): deterministic
                              per example, varied across examples

`describe(gt)` is the descriptive (DALL-E 3 style) caption, `short_caption(gt)`
the few-word one. `fact_keywords(fact)` lists the words a caption must contain
for a fact, so a test can check each caption mentions every fact, and
`caption_vocabulary()` lists every word the grammar can produce (the hashing
tokenizer is checked for collisions over it; the synonyms were chosen so that
none collide at vocab 8192).

Events are decided from the per-frame numbers, never from what the generator
intended: an object is "occluded" iff at some frame at least half of it is
behind an occluder and at a later frame at least half of it is visible; it
"leaves the frame" iff at some frame none of it is inside, and "comes back"
iff at a later frame at least half of it is inside again.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np

DIRECTIONS = {  # sector of the velocity angle (counter-clockwise from +x, y up) -> words
    "right": "to the right", "up_right": "up and to the right", "up": "upward",
    "up_left": "up and to the left", "left": "to the left", "down_left": "down and to the left",
    "down": "downward", "down_right": "down and to the right",
}
_SECTORS = ["right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right"]
POSITIONS = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom", ("bottom", "right"): "in the bottom right",
}
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
OCCLUDER_WORDS = {"bar": "bar", "box": "block"}

# Sentence pieces. Placeholders in {braces}; every literal word here is in the vocabulary.
OPENINGS_VIDEO = ["{A_medium} of {count} {things} on {bg}.", "{Count} {things} on {bg} in this {medium}.",
                  "This {medium} shows {count} {things} on {bg}."]
OPENINGS_IMAGE = ["{A_still} of {count} {things} on {bg}.", "{Count} {things} on {bg} in this {still}.",
                  "This {still} shows {count} {things} on {bg}."]
MEDIA = ["video", "clip", "short video", "animation"]
STILLS = ["image", "picture", "still image"]
THINGS = {1: ["shape", "object"], 2: ["shapes", "objects"]}
BG = {
    "solid": ["a plain {c1} background", "a solid {c1} background"],
    "stripes": ["a background of {orient} {c1} and {c2} stripes", "a {c1} and {c2} striped background"],
    "checker": ["a {c1} and {c2} checkerboard background", "a checkered {c1} and {c2} background"],
    "gradient": ["a background with a {c1} to {c2} gradient", "a {c1} and {c2} gradient background"],
}
OBJECT_SENTENCES = ["{Art} {size} {color} {shape} {where} {clauses}.",
                    "{Where}, {art} {size} {color} {shape} {clauses}.",
                    "There is {art} {size} {color} {shape} {where}; it {clauses}."]
IMAGE_OBJECT_SENTENCES = ["{Art} {size} {color} {shape} is {where}.", "{Where} there is {art} {size} {color} {shape}.",
                          "There is {art} {size} {color} {shape} {where}."]
MOTION = {
    "static": ["stays still", "does not move", "rests in place", "remains motionless"],
    "linear": ["heads {dir}", "glides {dir}", "slides {dir}", "drifts {dir}", "travels {dir}"],
    "bouncing": ["bounces off the walls, first moving {dir}", "bounces around, heading {dir} at first",
                 "keeps bouncing off the edges, starting {dir}"],
    "falling": ["falls under gravity", "drops down", "falls"],
}
FLOOR_BOUNCE = ["and bounces on the floor", "and bounces off the ground", "then bounces on the floor"]
OCCLUDED = ["passes behind the {c} {occ} and reappears", "is hidden behind the {c} {occ} for a moment, then comes into view again",
            "goes behind a {c} {occ} and emerges on the other side"]
EXITS = ["leaves the frame on the {side}", "exits through the {side} edge", "goes out of view at the {side}"]
RETURNS = ["and comes back", "and then re-enters", "before returning"]
PAINTER = ["leaving a {c} trail", "painting a lasting {c} stroke", "drawing a {c} trail that stays"]
PAN = ["The camera pans {dir}.", "The camera slowly pans {dir} across the scene.", "The view pans {dir}, moving the whole scene."]
GERUNDS = {"static": ["resting", "standing still"], "linear": ["moving {short}", "sliding {short}"],
           "bouncing": ["bouncing"], "falling": ["falling"]}
SHORT_DIRS = {"right": "right", "up_right": "up right", "up": "up", "up_left": "up left", "left": "left",
              "down_left": "down left", "down": "down", "down_right": "down right"}
_PUNCTUATION = [".", ",", ";", "-"]


# ----------------------------------------------------------------------------- facts
def direction_of(vx: float, vy: float) -> str:
    """One of 8 compass-like sectors for a screen-space velocity (y points down)."""
    angle = math.atan2(-vy, vx)
    return _SECTORS[int(round(angle / (math.pi / 4))) % 8]


def _position(cx: float, cy: float, h: int, w: int) -> tuple[str, str]:
    row = ("top", "middle", "bottom")[min(2, max(0, int(3 * cy / h)))]
    col = ("left", "center", "right")[min(2, max(0, int(3 * cx / w)))]
    return row, col


def object_events(obj: dict, height: int, width: int) -> dict:
    """Occlusion and exit / re-entry read off the per-frame visibility numbers."""
    fr = obj["frames"]
    vis, behind, inside = fr["visible"], fr["behind_occluder"], fr["in_frame"]
    hidden = [t for t, b in enumerate(behind) if b >= 0.5]
    occluded = bool(hidden) and any(v >= 0.5 for v in vis[hidden[0] + 1:])
    out = [t for t, f in enumerate(inside) if f == 0.0]
    exits, returns = None, False
    if out and out[0] > 0:  # it was (partly) in view, then fully out
        t = out[0]
        x0, y0, x1, y1 = fr["box"][t]
        beyond = {"left": -x1, "right": x0 - width, "top": -y1, "bottom": y0 - height}
        exits = max(beyond, key=beyond.get)
        returns = any(f >= 0.5 for f in inside[t + 1:])
    return {"occluded": occluded, "exits": exits, "returns": returns}


def caption_facts(gt: dict) -> set[tuple]:
    T = gt["num_frames"]
    bg = gt["background"]
    objects = gt["objects"]
    facts = {("media", "image" if T == 1 else "video"), ("count", len(objects)),
             ("background", bg["kind"], bg["colors"][0], bg["colors"][-1] if bg["kind"] != "solid" else "",
              bg["orientation"] if bg["kind"] == "stripes" else "")}
    occ = gt["occluders"][0] if gt["occluders"] else None
    for o in objects:
        i = o["id"]
        facts.add(("object", i, o["size"], o["color"], o["shape"]))
        facts.add(("position", i) + _position(*o["frames"]["center"][0], gt["height"], gt["width"]))
        if T == 1:
            continue
        direction = direction_of(*o["velocity"]) if o["motion"] in ("linear", "bouncing") else ""
        facts.add(("motion", i, o["motion"], direction))
        if o["motion"] == "falling" and o["floor_bounces"]:
            facts.add(("floor_bounce", i))
        ev = object_events(o, gt["height"], gt["width"])
        if ev["occluded"] and occ is not None:
            facts.add(("occluded", i, occ["color"], occ["kind"]))
        if ev["exits"]:
            facts.add(("exits", i, ev["exits"]))
            if ev["returns"]:
                facts.add(("returns", i))
        if o.get("painter"):
            facts.add(("painter", i, o["color"]))
    pan = gt["camera"]["pan_velocity"]
    if T > 1 and (pan[0] or pan[1]):
        facts.add(("pan", direction_of(*pan)))
    return facts


def fact_keywords(fact: tuple) -> list[set[str]]:
    """Word groups a caption must contain for `fact`: each group needs one of its phrases."""
    kind = fact[0]
    if kind == "object":
        return [{fact[2]}, {fact[3]}, {fact[4]}]
    if kind == "background":
        words = [{fact[2]}] + ([{fact[3]}] if fact[3] else [])
        tex = {"solid": {"plain", "solid"}, "stripes": {"stripes", "striped"},
               "checker": {"checkerboard", "checkered"}, "gradient": {"gradient"}}[fact[1]]
        return words + [tex]
    if kind == "motion":
        verbs = {"static": {"still", "not move", "rests", "motionless"},
                 "linear": {"heads", "glides", "slides", "drifts", "travels"},
                 "bouncing": {"bounces", "bouncing"}, "falling": {"falls", "drops"}}[fact[2]]
        return [verbs] + (_direction_keywords(fact[3]) if fact[3] else [])
    if kind == "floor_bounce":
        return [{"floor", "ground"}]
    if kind == "occluded":
        return [{"behind"}, {fact[2]}, {OCCLUDER_WORDS[fact[3]]}]
    if kind == "exits":
        return [{"leaves the frame", "exits", "out of view"}, {fact[2]}]
    if kind == "returns":
        return [{"comes back", "re-enters", "returning"}]
    if kind == "painter":
        return [{"trail", "stroke"}, {fact[2]}]
    if kind == "pan":
        return [{"pans"}] + _direction_keywords(fact[1])
    if kind == "media":
        return [{"video", "clip", "animation"}] if fact[1] == "video" else [{"image", "picture"}]
    if kind == "count":
        return [{COUNTS.get(fact[1], str(fact[1]))}]
    if kind == "position":
        return [{POSITIONS[(fact[2], fact[3])]}]
    raise ValueError(f"unknown caption fact {fact!r}")


def _direction_keywords(direction: str) -> list[set[str]]:
    out = []
    if "up" in direction:
        out.append({"up", "upward"})
    if "down" in direction:
        out.append({"down", "downward"})
    for side in ("left", "right"):
        if side in direction:
            out.append({side})
    return out


def missing_facts(caption: str, facts: Iterable[tuple]) -> list[tuple]:
    """Facts whose keywords are not all in `caption` (empty when the caption agrees)."""
    text = " " + " ".join(re.findall(r"[a-z]+(?:-[a-z]+)?|[.,;]", caption.lower())) + " "
    has = lambda phrase: f" {phrase} " in text
    return [f for f in facts if not all(any(has(p) for p in group) for group in fact_keywords(f))]


# ----------------------------------------------------------------------------- rendering text
def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_from_facts(facts: Iterable[tuple], rng: np.random.Generator) -> str:
    facts = set(facts)
    get = lambda kind: sorted(f for f in facts if f[0] == kind)
    image = ("media", "image") in facts
    (_, n), = get("count") or [("count", len(get("object")))]
    (_, bg_kind, c1, c2, orient), = get("background")
    bg = _pick(rng, BG[bg_kind]).format(c1=c1, c2=c2, orient=orient or "vertical")
    count = COUNTS.get(n, str(n))
    medium, still = _pick(rng, MEDIA), _pick(rng, STILLS)
    opening = _pick(rng, OPENINGS_IMAGE if image else OPENINGS_VIDEO).format(
        medium=medium, still=still, A_medium=_cap(_article(medium)) + " " + medium,
        A_still=_cap(_article(still)) + " " + still, count=count, Count=_cap(count),
        things=_pick(rng, THINGS[min(n, 2)]), bg=bg)
    sentences = []
    for (_, i, size, color, shape) in get("object"):
        of = {f[0]: f for f in facts if len(f) > 1 and f[1] == i and f[0] != "count"}
        where = POSITIONS[of["position"][2:]] if "position" in of else ""
        art = _article(size)
        if image or "motion" not in of:
            sentences.append(_pick(rng, IMAGE_OBJECT_SENTENCES).format(
                Art=_cap(art), art=art, size=size, color=color, shape=shape, where=where, Where=_cap(where)).replace("  ", " "))
            continue
        _, _, motion, direction = of["motion"]
        clauses = [_pick(rng, MOTION[motion]).format(dir=DIRECTIONS.get(direction, ""))]
        if "floor_bounce" in of:
            clauses.append(_pick(rng, FLOOR_BOUNCE))
        events = []
        if "occluded" in of:
            events.append(_pick(rng, OCCLUDED).format(c=of["occluded"][2], occ=OCCLUDER_WORDS[of["occluded"][3]]))
        if "exits" in of:
            events.append(_pick(rng, EXITS).format(side=of["exits"][2]) + (" " + _pick(rng, RETURNS) if "returns" in of else ""))
        if "painter" in of:
            clauses[-1] += ", " + _pick(rng, PAINTER).format(c=of["painter"][2])
        text = " ".join(clauses) + "".join((", and " if k == 0 else ", then ") + e for k, e in enumerate(events))
        sentences.append(_pick(rng, OBJECT_SENTENCES).format(
            Art=_cap(art), art=art, size=size, color=color, shape=shape, where=where, Where=_cap(where), clauses=text))
    for (_, direction) in get("pan"):
        sentences.append(_pick(rng, PAN).format(dir=DIRECTIONS[direction]))
    order = list(rng.permutation(len(sentences)))
    body = [sentences[k] for k in order]
    # The scene sentence usually opens the caption, sometimes closes it.
    parts = [opening] + body if rng.random() < 0.75 else body + [opening]
    return " ".join(parts)


def describe(gt: dict) -> str:
    """The descriptive caption: a pure function of the ground truth (seeded by its seed and index)."""
    rng = np.random.default_rng(np.random.SeedSequence([gt.get("seed", 0), gt.get("index", 0), 7]))
    return caption_from_facts(caption_facts(gt), rng)


def short_caption(gt: dict) -> str:
    """A few words: the first object, its motion, and a second object if there is one."""
    rng = np.random.default_rng(np.random.SeedSequence([gt.get("seed", 0), gt.get("index", 0), 11]))
    objs = gt["objects"]
    first = objs[0]
    text = f"{_article(first['color'])} {first['color']} {first['shape']}"
    if gt["num_frames"] > 1:
        direction = direction_of(*first["velocity"]) if first["motion"] in ("linear", "bouncing") else "right"
        text += " " + _pick(rng, GERUNDS[first["motion"]]).format(short=SHORT_DIRS[direction])
    if len(objs) > 1:
        text += f" and {_article(objs[1]['color'])} {objs[1]['color']} {objs[1]['shape']}"
    return text


# ----------------------------------------------------------------------------- vocabulary
def caption_vocabulary() -> set[str]:
    """Every word (tokenizer piece) the caption grammar and the prompt expander can produce."""
    from sora_jax.data import toy_world  # late import: toy_world imports this module

    texts: list[str] = []
    for group in (OPENINGS_VIDEO, OPENINGS_IMAGE, MEDIA, STILLS, OBJECT_SENTENCES, IMAGE_OBJECT_SENTENCES,
                  FLOOR_BOUNCE, OCCLUDED, EXITS, RETURNS, PAINTER, PAN, _PUNCTUATION,
                  list(DIRECTIONS.values()), list(POSITIONS.values()), list(COUNTS.values()),
                  list(OCCLUDER_WORDS.values()), list(SHORT_DIRS.values()),
                  *THINGS.values(), *BG.values(), *MOTION.values(), *GERUNDS.values(),
                  list(toy_world.OBJECT_COLORS), list(toy_world.BACKGROUND_COLORS), list(toy_world.OCCLUDER_COLORS),
                  list(toy_world.SHAPES), list(toy_world.SIZES), ["a", "an", "and", "vertical", "horizontal",
                                                                  "left", "right", "top", "bottom"]):
        texts += [re.sub(r"\{[A-Za-z_0-9]+\}", " ", t) for t in group]
    words = set()
    for t in texts:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower()))
    return words
