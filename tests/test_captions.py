"""Toy-world captions (data/toy/captions.py): every stated attribute is true of the render, each
is stated at its rate, unstated ones stay open, the world's correlations survive in what is
said, and a caption is a function of the face's seed."""

from __future__ import annotations

import numpy as np
import pytest

from hspace.data.toy.captions import BINARY, YAW_SAID, caption, captions_for, parse_caption
from hspace.data.toy.faces import draw_factors

SEEDS = list(range(5_000_000, 5_003_000))


@pytest.fixture(scope="module")
def drawn():
    factors = draw_factors(SEEDS)
    return factors, [caption(factors, i, s) for i, s in enumerate(SEEDS)]


def test_every_stated_attribute_is_true_and_parses_back(drawn):
    factors, caps = drawn
    for i, (text, stated) in enumerate(caps):
        assert parse_caption(text) == stated, text
        for a, value in stated.items():
            if a == "yaw":
                yaw = float(factors.yaw[i])
                assert abs(yaw) >= YAW_SAID and value == ("left" if yaw < 0 else "right"), (text, yaw)
            else:
                assert value == bool(getattr(factors, a)[i]), (text, a)


def test_each_attribute_is_stated_at_its_rate_and_the_joint_distribution_survives(drawn):
    factors, caps = drawn
    for a in BINARY:
        rate = np.mean([a in stated for _, stated in caps])
        assert abs(rate - 0.7) < 0.03, (a, rate)
    clear = np.abs(factors.yaw) >= YAW_SAID
    said = np.array(["yaw" in stated for _, stated in caps])
    assert not said[~clear].any() and abs(said[clear].mean() - 0.7) < 0.05
    # glasses go with age in what captions state, as in the world (P_EYEGLASSES 0.60 old, 0.08 young)
    both = [(s["Young"], s["Eyeglasses"]) for _, s in caps if "Young" in s and "Eyeglasses" in s]
    old = np.mean([g for y, g in both if not y])
    young = np.mean([g for y, g in both if y])
    assert old > 0.5 > 0.15 > young, (old, young)
    texts = [t for t, _ in caps]
    assert len(set(texts)) > 50 and any(t.startswith("a person") for t in texts)


def test_captions_are_a_function_of_the_seed():
    assert captions_for([7, 8, 7]) == [captions_for([7])[0], captions_for([8])[0], captions_for([7])[0]]
    assert captions_for(SEEDS[:50]) != captions_for(SEEDS[50:100])
    with pytest.raises(ValueError, match="not a toy-world caption"):
        parse_caption("a smiling dog")
