"""Captions of the toy world (the text side of a ground truth for text-conditioned models).

Each render gets a caption composed from its factors in plain words, with some attributes
left unsaid at random, so that a model trained on them also learns what a prompt leaves open:

    caption    := "a" [expression] [age] noun [accessories] ["," pose]
    expression := "smiling" | "serious"                          (Smiling)
    age        := "young" | "old"                                (Young)
    noun       := "man" | "woman"   (Male stated)  |  "person"   (Male unsaid)
    accessories:= "wearing glasses" | "wearing a hat" | "wearing glasses and a hat"
                | "without glasses" | "without a hat" | ...       (Eyeglasses, Wearing_Hat)
    pose       := "head turned left" | "head turned right"        (|yaw| >= 15 degrees)

e.g. "a smiling young woman wearing glasses and a hat, head turned left". Each of the five
binary attributes is stated with probability ``p_state`` (default 0.7), independently, and
truthfully when stated: the joint distribution of the stated values is the world's (glasses
with age, hats with men; data/toy/faces.py). Yaw is said only where the turn is clear (|yaw|
>= 15 degrees, about a third of the faces) and then with probability ``p_state``; pitch and
roll are never said. Which attributes are stated comes from the caption's own generator,
seeded from (seed, CAPTION_VERSION), so a caption is a function of the face's seed.
``parse_caption`` reads the stated values back (tests check it against the factors).
"""

from __future__ import annotations

import re

import numpy as np

from hspace.data.toy.faces import Factors, draw_factors

CAPTION_VERSION = 1
BINARY = ("Smiling", "Young", "Male", "Eyeglasses", "Wearing_Hat")
YAW_SAID = 15.0  # degrees: a turn this clear is worth saying


def caption(factors: Factors, i: int, seed: int, p_state: float = 0.7) -> tuple[str, dict]:
    """The caption of face ``i`` of ``factors`` (drawn from ``seed``) and what it states:
    {attribute: True/False, "yaw": "left"/"right"}; unsaid attributes are absent."""
    rng = np.random.default_rng([int(seed), CAPTION_VERSION, 0xCA9])
    say = {a: bool(rng.random() < p_state) for a in BINARY}
    say_yaw = bool(rng.random() < p_state)
    truth = {a: bool(getattr(factors, a)[i]) for a in BINARY}
    stated = {a: truth[a] for a in BINARY if say[a]}
    words = ["a"]
    if say["Smiling"]:
        words.append("smiling" if truth["Smiling"] else "serious")
    if say["Young"]:
        words.append("young" if truth["Young"] else "old")
    words.append(("man" if truth["Male"] else "woman") if say["Male"] else "person")
    wearing = [w for a, w in (("Eyeglasses", "glasses"), ("Wearing_Hat", "a hat")) if say[a] and truth[a]]
    without = [w for a, w in (("Eyeglasses", "glasses"), ("Wearing_Hat", "a hat")) if say[a] and not truth[a]]
    if wearing:
        words.append("wearing " + " and ".join(wearing))
    if without:
        words.append(("and " if wearing else "") + "without " + " or ".join(without))
    text = " ".join(words)
    yaw = float(factors.yaw[i])
    if say_yaw and abs(yaw) >= YAW_SAID:
        side = "left" if yaw < 0 else "right"
        stated["yaw"] = side
        text += f", head turned {side}"
    return text, stated


def captions_for(seeds, p_state: float = 0.7) -> list[str]:
    """The caption of the face of each seed."""
    seeds = [int(s) for s in np.asarray(seeds).ravel()]
    factors = draw_factors(seeds)
    return [caption(factors, i, s, p_state)[0] for i, s in enumerate(seeds)]


_PATTERN = re.compile(
    r"^a(?: (?P<expr>smiling|serious))?(?: (?P<age>young|old))? (?P<noun>man|woman|person)"
    r"(?: wearing (?P<wear>glasses and a hat|glasses|a hat))?"
    r"(?: (?:and )?without (?P<without>glasses or a hat|glasses|a hat))?"
    r"(?:, head turned (?P<yaw>left|right))?$"
)


def parse_caption(text: str) -> dict:
    """What a caption of this grammar states (the inverse of ``caption``); ValueError for a
    text outside the grammar."""
    m = _PATTERN.match(text)
    if m is None:
        raise ValueError(f"not a toy-world caption: {text!r}")
    out: dict = {}
    if m["expr"]:
        out["Smiling"] = m["expr"] == "smiling"
    if m["age"]:
        out["Young"] = m["age"] == "young"
    if m["noun"] != "person":
        out["Male"] = m["noun"] == "man"
    for part, value in ((m["wear"], True), (m["without"], False)):
        if part:
            if "glasses" in part:
                out["Eyeglasses"] = value
            if "hat" in part:
                out["Wearing_Hat"] = value
    if m["yaw"]:
        out["yaw"] = m["yaw"]
    return out
