"""toy-clip (data/toy/train_clip.py): training resumes to the weights of an unbroken run; the
shipped model loads through the `clip:PATH` evaluator's own code path and reads the toy world's
attributes zero-shot with the paper's prompts; bad input refused with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hspace.data.annotators import TOY_CLIP_DIR, is_toy_clip, load_annotator
from hspace.data.catalog import RunError
from hspace.data.toy.train_clip import ClipRecipe, train_clip

TINY = {"vision_hidden": 16, "vision_layers": 1, "text_hidden": 16, "text_layers": 1, "projection": 8,
        "batch_size": 8, "warmup": 2, "checkpoint_every": 2}  # fmt: skip


def test_training_resumes_to_the_weights_of_an_unbroken_run(tmp_path):
    train_clip(tmp_path / "a", tmp_path / "out_a", ClipRecipe(**TINY, steps=4), report=lambda line: None)
    train_clip(tmp_path / "b", tmp_path / "out_b", ClipRecipe(**TINY, steps=2), report=lambda line: None)
    state = train_clip(tmp_path / "b", tmp_path / "out_b", ClipRecipe(**TINY, steps=4), report=lambda line: None)
    assert state["step"] == 4
    from transformers import CLIPModel

    a, b = (CLIPModel.from_pretrained(tmp_path / f"out_{x}").state_dict() for x in "ab")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(RunError, match="holds a toy-clip run of another recipe"):
        train_clip(tmp_path / "b", tmp_path / "out_c", ClipRecipe(**{**TINY, "text_layers": 2}, steps=6))
    loaded = load_annotator(f"clip:{tmp_path / 'out_a'}")  # the output is a folder the evaluator loads
    assert loaded.names == ("Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young")
    beard = {"Beard": ("A photo of a bearded person", "A person")}
    with pytest.raises(RunError, match="is toy-clip"):
        load_annotator(f"clip:{tmp_path / 'out_a'}", prompts=beard)
    (tmp_path / "out_a" / "recipe.json").write_text(json.dumps({"note": "some other model's recipe"}))
    assert is_toy_clip(tmp_path / "out_b") and not is_toy_clip(tmp_path / "out_a")
    assert load_annotator(f"clip:{tmp_path / 'out_a'}", prompts=beard).names == ("Beard",)  # not toy-clip: no refusal


@pytest.mark.slow
def test_the_shipped_toy_clip_reads_the_attributes_zero_shot():
    """With the paper's prompt pairs, on 512 held-out renders against their true factors: each
    attribute read right in at least MIN of them (the shipped quality.json has the full figures)."""
    from hspace.data.toy.clip_quality import zero_shot_on_renders

    quality = json.loads((TOY_CLIP_DIR / "quality.json").read_text())
    accuracy = zero_shot_on_renders(TOY_CLIP_DIR, n=512)
    for attribute, value in accuracy.items():
        assert value >= MIN[attribute], (attribute, value)
        assert abs(value - quality["zero_shot_renders"][attribute]) < 0.06  # as measured on 1024
    assert load_annotator("clip:toy-clip").names == tuple(accuracy)


MIN = dict.fromkeys(("Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young"), 0.95)  # measured: 0.988-1.0


@pytest.mark.slow
def test_bad_clip_input_is_one_line(tmp_path):
    no_processor = tmp_path / "bare"
    shutil.copytree(TOY_CLIP_DIR, no_processor)
    for f in ("tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json"):
        (no_processor / f).unlink(missing_ok=True)
    with pytest.raises(RunError, match="cannot load the CLIP model in"):
        load_annotator(f"clip:{no_processor}")
    with pytest.raises(RunError, match="unknown in the prompts: bearded, of, photo"):
        load_annotator("clip:toy-clip", prompts={"Beard": ("A photo of a bearded person", "A person")})
    assert np.isfinite(load_annotator("clip:toy-clip").score(torch.zeros(1, 3, 32, 32)).numpy()).all()


@pytest.mark.slow
def test_train_toy_recipe_clip_through_the_cli(prefect_server, tmp_path):
    """`hspace train-toy --recipe clip` runs the Prefect flow; a rerun with more steps resumes."""
    from typer.testing import CliRunner

    from hspace.flows.cli import app

    args = ["train-toy", "--recipe", "clip", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "model")]
    r = CliRunner().invoke(app, [*args, "--steps", "1", "--checkpoint-every", "1"])
    assert r.exit_code == 0, r.output
    assert "toy-clip at step 1" in r.output
    r = CliRunner().invoke(app, [*args, "--steps", "2"])
    assert r.exit_code == 0 and "toy-clip at step 2" in r.output, r.output
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 2
    assert load_annotator(f"clip:{tmp_path / 'model'}").names[0] == "Smiling"
