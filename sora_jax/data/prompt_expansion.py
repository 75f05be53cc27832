"""Prompt expansion: short user prompts -> long captions in the training-caption style.

The Sora report turns short prompts into detailed captions with a large language
model at sampling time, so that prompts look like the (descriptive) training
captions. Two backends:

  "toy"     offline and deterministic: parses the colour, shape, size, motion,
            direction, background and phenomenon words it knows, fills in the
            rest from the seed, and renders the result with the same grammar
            as the toy world's captions (sora_jax/data/captions.py). It reports
            what it filled (`expand_prompt_with_info`).
  "openai"  any OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM,
            llama.cpp server, ...), through urllib: no extra dependency. The API
            key is read from an environment variable at call time; it is never
            stored on the object, logged, or shown in reprs or errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request

import numpy as np

from sora_jax.data import captions, toy_world

SHAPE_WORDS = {"circle": "circle", "circles": "circle", "ball": "circle", "disc": "circle", "dot": "circle",
               "square": "square", "squares": "square", "box": "square", "triangle": "triangle",
               "triangles": "triangle", "diamond": "diamond", "diamonds": "diamond", "rhombus": "diamond"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "medium": "medium",
              "large": "large", "big": "large", "huge": "large"}
MOTION_WORDS = {
    "bouncing": "bouncing", "bounces": "bouncing", "bounce": "bouncing", "bouncy": "bouncing",
    "falling": "falling", "falls": "falling", "fall": "falling", "dropping": "falling", "drops": "falling",
    "moving": "linear", "moves": "linear", "sliding": "linear", "slides": "linear", "gliding": "linear",
    "drifting": "linear", "travelling": "linear", "traveling": "linear", "flying": "linear", "rolling": "linear",
    "static": "static", "still": "static", "resting": "static", "stationary": "static", "sitting": "static",
}
DIRECTION_WORDS = {"left": "left", "leftward": "left", "right": "right", "rightward": "right",
                   "up": "up", "upward": "up", "upwards": "up", "down": "down", "downward": "down", "downwards": "down"}
TEXTURE_WORDS = {"striped": "stripes", "stripes": "stripes", "checkered": "checker", "checkerboard": "checker",
                 "gradient": "gradient", "plain": "solid", "solid": "solid"}
IMAGE_WORDS = {"image", "picture", "photo"}


def _direction(words: list[str]) -> str | None:
    found = [DIRECTION_WORDS[w] for w in words if w in DIRECTION_WORDS]
    vert = next((d for d in found if d in ("up", "down")), None)
    horiz = next((d for d in found if d in ("left", "right")), None)
    return "_".join(d for d in (vert, horiz) if d) or None


def expand_prompt_with_info(short: str, seed: int = 0) -> tuple[str, dict]:
    """(long caption, {"parsed": ..., "filled": [...]}) for a short prompt."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1234]))
    text = short.lower()
    words = re.findall(r"[a-z]+", text)
    image = bool(IMAGE_WORDS & set(words)) and not any(MOTION_WORDS.get(w, "static") != "static" for w in words)
    filled, parsed = [], {"objects": [], "scene": {}}

    # Scene-level words first, so the rest of each segment describes objects.
    bg_colors = [w for w in words if w in toy_world.BACKGROUND_COLORS]
    texture = next((TEXTURE_WORDS[w] for w in words if w in TEXTURE_WORDS), None)
    pan = "pan" in text or "panning" in words
    occlude = bool({"behind", "occluded", "hidden", "occluder"} & set(words))
    exits = bool({"leaves", "exits", "offscreen"} & set(words)) or "off screen" in text
    painter = bool({"trail", "painting", "paints", "draws", "drawing", "stroke"} & set(words))
    pan_dir = None
    if pan:
        m = re.search(r"pan\w*\s+(?:to\s+the\s+)?(\w+)", text)
        pan_dir = DIRECTION_WORDS.get(m.group(1)) if m else None

    objects = []
    for segment in re.split(r"\band\b|,|\bwith\b|;", text):
        seg = re.findall(r"[a-z]+", segment)
        color = next((w for w in seg if w in toy_world.OBJECT_COLORS), None)
        shape = next((SHAPE_WORDS[w] for w in seg if w in SHAPE_WORDS), None)
        if not (color or shape) or len(objects) == 3:
            continue
        motion = next((MOTION_WORDS[w] for w in seg if w in MOTION_WORDS), None)
        seg_wo_pan = re.sub(r"pan\w*\s+(?:to\s+the\s+)?\w+", " ", segment).split()
        objects.append(dict(color=color, shape=shape, size=next((SIZE_WORDS[w] for w in seg if w in SIZE_WORDS), None),
                            motion=motion, direction=_direction(seg_wo_pan)))
    parsed["objects"] = [{k: v for k, v in o.items() if v} for o in objects]
    if not objects:
        objects.append(dict(color=None, shape=None, size=None, motion=None, direction=None))

    # Fill what the prompt left open, and say so.
    if texture is None:
        texture = "solid" if len(bg_colors) < 2 else "stripes"
        filled.append(f"background texture={texture}")
    while len(bg_colors) < (1 if texture == "solid" else 2):
        options = [c for c in toy_world.BACKGROUND_COLORS if c not in bg_colors and all(
            toy_world._dist(toy_world.BACKGROUND_COLORS[c], toy_world.OBJECT_COLORS[o["color"]]) >= toy_world._MIN_CONTRAST
            for o in objects if o["color"])] or [c for c in toy_world.BACKGROUND_COLORS if c not in bg_colors]
        bg_colors.append(options[rng.integers(len(options))])
        filled.append(f"background colour={bg_colors[-1]}")
    orient = ["vertical", "horizontal"][rng.integers(2)] if texture == "stripes" else ""
    taken = {o["color"] for o in objects if o["color"]}
    facts = {("media", "image" if image else "video"), ("count", len(objects)),
             ("background", texture, bg_colors[0], bg_colors[1] if texture != "solid" else "", orient)}
    for i, o in enumerate(objects):
        for key, options in (("color", [c for c in toy_world.OBJECT_COLORS if c not in taken]),
                             ("shape", list(toy_world.SHAPES)), ("size", list(toy_world.SIZES))):
            if o[key] is None:
                o[key] = options[rng.integers(len(options))]
                taken.add(o[key])
                filled.append(f"object {i} {key}={o[key]}")
        facts.add(("object", i, o["size"], o["color"], o["shape"]))
        where = list(captions.POSITIONS)[rng.integers(len(captions.POSITIONS))]
        facts.add(("position", i) + where)
        filled.append(f"object {i} position={captions.POSITIONS[where]}")
        if image:
            continue
        if o["motion"] is None:
            o["motion"] = "linear" if o["direction"] else toy_world.MOTIONS[rng.integers(len(toy_world.MOTIONS))]
            filled.append(f"object {i} motion={o['motion']}")
        direction = ""
        if o["motion"] in ("linear", "bouncing"):
            direction = o["direction"] or list(captions.DIRECTIONS)[rng.integers(len(captions.DIRECTIONS))]
            if not o["direction"]:
                filled.append(f"object {i} direction={direction}")
        o["dir_used"] = direction
        facts.add(("motion", i, o["motion"], direction))
        if o["motion"] == "falling":
            facts.add(("floor_bounce", i))
    if not image:
        if occlude:
            facts.add(("occluded", 0, "gray", "bar"))
        if exits:
            last = objects[-1]
            side = (last.get("dir_used") or ["left", "right"][rng.integers(2)]).split("_")[-1]
            side = {"up": "top", "down": "bottom"}.get(side, side)
            facts |= {("exits", len(objects) - 1, side), ("returns", len(objects) - 1)}
        if painter:
            facts.add(("painter", 0, objects[0]["color"]))
        if pan:
            if pan_dir is None:
                pan_dir = ["left", "right"][rng.integers(2)]
                filled.append(f"camera pan direction={pan_dir}")
            facts.add(("pan", pan_dir))
    parsed["scene"] = {k: v for k, v in dict(image=image, background=bg_colors if texture else None, pan=pan,
                                             occlusion=occlude, exit=exits, painter=painter).items() if v}
    caption = captions.caption_from_facts(facts, rng)
    logging.debug("expand_prompt(%r): filled %s", short, filled)
    return caption, {"parsed": parsed, "filled": filled, "facts": sorted(facts, key=str)}


def expand_prompt(short: str, seed: int = 0) -> str:
    """A long caption in the toy world's caption grammar for a short prompt (offline)."""
    return expand_prompt_with_info(short, seed)[0]


class ToyExpander:
    """The offline backend as an object with the same interface as ChatCompletionsExpander."""

    def expand(self, short: str, seed: int = 0) -> str:
        return expand_prompt(short, seed)

    __call__ = expand

    def __repr__(self):
        return "ToyExpander()"


SYSTEM_PROMPT = (
    "You rewrite short video prompts into long, literal captions in the style of the training captions of a "
    "procedural world of simple shapes. Use only these words for things: shapes circle, square, triangle, diamond; "
    "object colours " + ", ".join(toy_world.OBJECT_COLORS) + "; background colours "
    + ", ".join(toy_world.BACKGROUND_COLORS) + "; sizes small, medium, large. Backgrounds are plain, striped, "
    "checkered or a gradient. Objects stay still, move in a straight line, bounce off the walls, or fall and bounce "
    "on the floor; they may pass behind a gray bar and reappear, leave the frame and come back, or leave a trail. "
    "The camera may pan. Keep every detail of the user's prompt, fill in the rest plausibly, write 2 to 5 plain "
    "sentences, no lists, no quotes, and answer with the caption only. Example: \""
    + expand_prompt("a small red circle bouncing and a blue square", seed=0) + "\""
)


class ChatCompletionsExpander:
    """Prompt expansion with an OpenAI-compatible chat completions endpoint.

    base_url: the API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
    (a full ".../chat/completions" URL also works). The key comes from the
    environment variable `api_key_env` at each call; without it no Authorization
    header is sent (fine for local servers).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", *, timeout: float = 60.0,
                 temperature: float = 0.7, max_tokens: int = 300, system_prompt: str = SYSTEM_PROMPT):
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.temperature, self.max_tokens = timeout, temperature, max_tokens
        self.system_prompt = system_prompt

    def __repr__(self):
        return f"ChatCompletionsExpander(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def expand(self, short: str, seed: int = 0) -> str:
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": int(seed),
                "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": short}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = "Bearer " + key
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise RuntimeError(f"prompt expansion: {self.url} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise RuntimeError(f"prompt expansion: request to {self.url} failed: {e}") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"prompt expansion: unexpected response from {self.url}: {str(payload)[:300]}") from None
        return " ".join(str(content).split()).strip().strip('"')

    __call__ = expand


def get_expander(name: str, **kwargs):
    """"toy" -> the offline expander; "openai" -> ChatCompletionsExpander(**kwargs)."""
    if name == "toy":
        if kwargs:
            raise ValueError(f"the toy expander takes no options, got {sorted(kwargs)}")
        return ToyExpander()
    if name == "openai":
        return ChatCompletionsExpander(**kwargs)
    raise ValueError(f"unknown prompt expander {name!r}; use 'toy' or 'openai'")
