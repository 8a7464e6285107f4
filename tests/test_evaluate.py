"""Evaluation pieces against independent references: gamma calibration (bisection) on
known monotone functions, CLIP zero-shot probabilities against a hand computation from
CLIP's own embeddings, and the Table-1 matrix on a case whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hspace.data.annotators import annotator_id, load_annotator
from hspace.data.catalog import RunError
from hspace.data.eval_folder import EvalFolder
from hspace.hcore import metrics
from hspace.hcore.annotators import CLIP_PROMPTS
from hspace.hcore.calibrate import CalibrationError, calibrate_gamma


@pytest.mark.parametrize("target", [0.1, 0.5, 0.85])
def test_calibration_converges_on_a_monotone_function(target):
    effect = lambda g: 0.9 * math.tanh(g / 3)  # noqa: E731
    c = calibrate_gamma(effect, target, rtol=1e-3, max_evaluations=40)
    assert c.converged and abs(c.effect - target) <= 1e-3 * target
    assert c.gamma == pytest.approx(3 * math.atanh(target / 0.9), rel=5e-3)
    assert c.evaluations < 25


def test_calibration_on_a_step_like_function_and_its_errors():
    c = calibrate_gamma(lambda g: min(g / 40, 1.0), 0.5, rtol=0.01)  # needs brackets 1, 2, ... 32
    assert c.gamma == pytest.approx(20, rel=0.02)
    # a flat, slightly negative start (noise at small gamma) is doubled through
    c = calibrate_gamma(lambda g: -0.01 if g < 3 else 0.1 * g - 0.2, 0.5, rtol=0.01)
    assert c.gamma == pytest.approx(7, rel=0.02)
    with pytest.raises(CalibrationError, match="does not raise it"):
        calibrate_gamma(lambda g: -0.1 * g, 0.5)
    with pytest.raises(CalibrationError, match="out of reach"):
        calibrate_gamma(lambda g: 0.01 * g, 0.5, gamma_max=8)
    # rises, then breaks down at large gamma (the image falls apart): the peak is reported
    with pytest.raises(CalibrationError, match=r"at most 0\.2 \(at gamma 4") as info:
        calibrate_gamma(lambda g: 0.05 * g if g <= 4 else 0.2 - 0.1 * (g - 4), 0.5)
    assert info.value.gamma == 4  # where evaluate scores a direction whose target is out of reach
    with pytest.raises(CalibrationError, match="must be positive"):
        calibrate_gamma(lambda g: g, 0.0)


def test_clip_probability_equals_hand_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    net = load_annotator(f"clip:{clip_dir}")
    assert net.names == tuple(CLIP_PROMPTS)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probs = net.score(images)
    # reference: CLIP's own forward (logits_per_image), softmax over each prompt pair
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir)
    texts = [p for pair in CLIP_PROMPTS.values() for p in pair]
    inputs = proc(text=texts, images=list((images + 1) / 2), do_rescale=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        logits = out.logits_per_image.view(3, len(CLIP_PROMPTS), 2)
        # and by hand from the embeddings: exp(scale) * cos(image, text)
        img = F.normalize(out.image_embeds, dim=-1)
        txt = F.normalize(out.text_embeds, dim=-1)
        by_hand = (model.logit_scale.exp() * img @ txt.T).view(3, len(CLIP_PROMPTS), 2)
    e = by_hand.exp()
    np.testing.assert_allclose(probs.numpy(), (e[..., 0] / e.sum(-1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(probs.numpy(), logits.softmax(-1)[..., 0].numpy(), atol=1e-5)
    # custom prompts give their own columns
    custom = load_annotator(f"clip:{clip_dir}", prompts={"Bald": ("A bald person", "A person")})
    assert custom.names == ("Bald",) and custom.score(images).shape == (3, 1)
    assert annotator_id(f"clip:{clip_dir}").startswith("clip-")


def test_clip_path_that_is_not_clip(tmp_path, model_dir):
    with pytest.raises(RunError, match="is not a CLIP model"):
        load_annotator(f"clip:{model_dir}")
    with pytest.raises(RunError, match="not in the local Hugging Face cache"):
        load_annotator("clip:someone/no-such-clip")
    with pytest.raises(RunError, match="needs a model"):
        load_annotator("clip")


def test_leakage_matrix_of_directions_that_move_one_attribute_each(monkeypatch, tmp_path):
    """Scores are known exactly: direction a raises column 0 by 0.3 per unit gamma, b lowers
    column 2 by 5 degrees; nothing else moves. The matrix and summary must say exactly that."""
    a, b = torch.zeros(2), torch.ones(2)
    base = np.array([[0.2, 0.5, 10.0], [0.4, 0.1, -4.0]])

    def fake_scores(unet, scheduler, annotator, replay, indices, v, gamma, batch_size=64):
        out = base[: len(indices)].copy()
        if v is a:
            out[:, 0] += 0.3 * gamma
        elif v is b:
            out[:, 2] -= 5.0 * gamma
        return out

    monkeypatch.setattr(metrics, "edit_scores", fake_scores)
    m = metrics.leakage_matrix(None, None, None, None, [0, 1], [a, b], [2.0, 1.0])
    np.testing.assert_allclose(m, [[0.6, 0, 0], [0, 0, -5.0]], atol=1e-12)
    columns = ["Smiling", "Male", "yaw"]
    EvalFolder(tmp_path).write_leakage("original", m, ["Smiling", "yaw"], columns, degrees=("yaw",))
    s = metrics.leakage_means(m, ["Smiling", "yaw"], columns, {"Smiling", "Male"})
    assert s["mean_diagonal"] == pytest.approx(0.6) and s["mean_offdiagonal"] == 0.0
    assert metrics.leakage_means(m, ["Smiling", "yaw"], columns, {"yaw"}) == {
        "mean_diagonal": pytest.approx(5.0),
        "mean_offdiagonal": 0.0,
    }
    back = np.loadtxt(tmp_path / "leakage_original.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_allclose(back, m, atol=1e-6)
    c = metrics.calibrate_edit(None, None, None, None, [0, 1], a, 0, 0.45)
    assert c.converged and c.gamma == pytest.approx(1.5, rel=0.05)


def test_evaluation_tables_edit_along_the_hand_projections(monkeypatch, tmp_path):
    """`hspace evaluate --disentangled` with the norm kept makes three tables: the directions,
    eq. (11) rescaled to each direction's norm, and eq. (11) as written. With a linear fake
    annotator (score change = gamma * W v) each row must equal W applied to the projection
    computed here by hand with numpy. With --no-keep-norm there is no third table."""
    from hspace.data import annotators, models
    from hspace.data import directions as dirfile
    from hspace.data.catalog import RunFolder
    from hspace.data.eval_folder import leakage_change
    from hspace.hcore import hooks as hs
    from hspace.tasks.evaluate import leakage_line as leakage
    from hspace.tasks.evaluate import run_evaluation

    rng = np.random.default_rng(0)
    names, d = ["Smiling", "Male", "Young"], 12
    w = rng.standard_normal((3, d))
    vs = [torch.from_numpy(rng.standard_normal(d).astype(np.float32)) for _ in names]

    def fake_scores(unet, scheduler, annotator, replay, indices, v, gamma, batch_size=64):
        change = np.zeros(3) if v is None else gamma * (w @ v.numpy().astype(np.float64).ravel())
        return np.tile(0.5 + change, (len(indices), 1))

    net = type("Net", (), {"names": tuple(names)})()
    monkeypatch.setattr(metrics, "edit_scores", fake_scores)
    monkeypatch.setattr(models, "load_for_run", lambda meta, device: (None, None))
    monkeypatch.setattr(models, "replay_for_run", lambda meta, text=None, device=None: None)
    monkeypatch.setattr(annotators, "load_annotator", lambda *a, **k: net)
    monkeypatch.setattr(hs, "h_shape", lambda unet, point="output": (d,))
    run = RunFolder(tmp_path / "run")
    run.init({"n": 8}, {"id": "m", "fingerprint": "f"}, {})
    # the directions on disk, projected by the disentangle stage itself (eq. (11) is computed
    # there once; evaluate only loads the files it wrote)
    from hspace.data.directions import REQUIRED_META
    from hspace.tasks.config import DirectionsSection, DisentangleSection
    from hspace.tasks.disentangle import disentangle_stage
    from hspace.tasks.stages import Context

    for v, name in zip(vs, names, strict=True):
        dirfile.save(run.direction(name), v.reshape(1, d, 1, 1), {k: "x" for k in REQUIRED_META} | {"attribute": name})
    ctx = Context(show_progress=False)
    written = disentangle_stage(run, DisentangleSection(), DirectionsSection(attributes=names), ctx)["outputs"]
    assert len(written) == 6  # NAME_disentangled and NAME_disentangled_as_written for each
    read = lambda run, meta, ns, *a: [(v.reshape(d), md) for v, md in (dirfile.load(run.direction(n)) for n in ns)]  # noqa: E731
    monkeypatch.setattr(dirfile, "load_run_directions", read)
    summary = run_evaluation(str(run.root), names, disentangled=True, n=4, gamma=2.0, log=lambda *a: None)

    def by_hand(i: int, keep_norm: bool) -> np.ndarray:
        v0 = vs[i].numpy().astype(np.float64)
        others = np.stack([vs[j].numpy().astype(np.float64) for j in range(3) if j != i], 1)  # (d, 2)
        coef = np.linalg.solve(others.T @ others, others.T @ v0)  # normal equations, not lstsq
        v = v0 - others @ coef
        return v * np.linalg.norm(v0) / np.linalg.norm(v) if keep_norm else v

    expected = {
        "original": np.stack([2.0 * w @ v.numpy() for v in vs]),
        "disentangled": np.stack([2.0 * w @ by_hand(i, True) for i in range(3)]),
        "as_written": np.stack([2.0 * w @ by_hand(i, False) for i in range(3)]),
    }
    for label, matrix in expected.items():
        table = np.loadtxt(run.eval / f"leakage_{label}.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
        np.testing.assert_allclose(table, matrix, rtol=1e-4, atol=1e-5, err_msg=label)
        diag = np.abs(np.diag(matrix)).mean()
        assert summary[label]["mean_diagonal"] == pytest.approx(diag, rel=1e-4)
    off = {k: np.abs(m[~np.eye(3, dtype=bool)]).mean() for k, m in expected.items()}
    change = leakage_change(summary, "as_written")
    assert change["change"] == pytest.approx(off["as_written"] / off["original"] - 1, rel=1e-4)
    line = leakage({"summary": summary})
    assert line.startswith(f"leakage off-diagonal {off['original']:.3g} -> {off['disentangled']:.3g} (")
    assert f"; as written {off['as_written']:.3g} (" in line
    assert not np.allclose(expected["as_written"], expected["disentangled"])  # the two projections differ
    # each direction's own leakage, and the ones a projection made worse named in the stage line
    from hspace.data.eval_folder import leaked_more

    for label, matrix in expected.items():
        for i, name in enumerate(names):
            own = np.abs(np.delete(matrix[i], i)).mean()
            assert summary[label]["per_direction"][name] == pytest.approx(own, rel=1e-4)
    worse = {
        (label, name)
        for label in ("disentangled", "as_written")
        for i, name in enumerate(names)
        if np.abs(np.delete(expected[label][i], i)).mean() > np.abs(np.delete(expected["original"][i], i)).mean()
    }
    assert {(w["table"], w["direction"]) for w in leaked_more(summary)} == worse
    assert worse, "the random directions of this test were chosen so that a projection makes one leak more"
    assert ("leaks MORE after the projection" in line) == bool(worse)
    for _, name in worse:
        assert f"{name} " in line.split("leaks MORE")[1]

    disentangle_stage(run, DisentangleSection(keep_norm=False), DirectionsSection(attributes=names), ctx)
    for name in names:  # what an earlier keep-norm run left beside them is not this run's
        run.direction(f"{name}_disentangled_as_written").unlink()
    again = run_evaluation(str(run.root), names, disentangled=True, n=4, gamma=2.0, log=print)
    assert "as_written" not in again  # without the rescaling the second table already is eq. (11) as written
    from hspace.data.eval_folder import table_title

    assert table_title("disentangled", again) == "eq. (11) as written"
    assert table_title("disentangled", summary) == "eq. (11), norm kept"


def test_gamma_auto_out_of_reach_scores_the_direction_and_flags_it(monkeypatch, tmp_path):
    """A night of sampling must not end in an error because one direction cannot reach the
    calibration target: it is scored at gamma 1 (no positive effect seen) and flagged in the
    summary and the stage line; the others are calibrated as usual."""
    from hspace.data import annotators, models
    from hspace.data import directions as dirfile
    from hspace.data.catalog import RunFolder
    from hspace.hcore import hooks as hs
    from hspace.tasks.evaluate import leakage_line as leakage
    from hspace.tasks.evaluate import run_evaluation

    names = ["Smiling", "Male", "Young"]
    vs = [torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, -1.0])]  # Young lowers Young

    def fake_scores(unet, scheduler, annotator, replay, indices, v, gamma, batch_size=64):
        change = np.zeros(3) if v is None else 0.25 * gamma * v.numpy().astype(np.float64)
        return np.tile(0.5 + change, (len(indices), 1))

    monkeypatch.setattr(metrics, "edit_scores", fake_scores)
    monkeypatch.setattr(models, "load_for_run", lambda meta, device: (None, None))
    monkeypatch.setattr(models, "replay_for_run", lambda meta, text=None, device=None: None)
    monkeypatch.setattr(annotators, "load_annotator", lambda *a, **k: type("N", (), {"names": tuple(names)})())
    monkeypatch.setattr(hs, "h_shape", lambda unet, point="output": (3,))
    monkeypatch.setattr(
        dirfile, "load_run_directions", lambda *a: [(v, {"attribute": n}) for v, n in zip(vs, names, strict=True)]
    )
    run = RunFolder(tmp_path / "run")
    run.init({"n": 8}, {"id": "m", "fingerprint": "f"}, {})
    lines = []
    summary = run_evaluation(str(run.root), names, n=4, gamma=None, calibration_n=2, log=lines.append)
    cal = summary["calibration"]["original"]
    assert cal["Smiling"]["gamma"] == pytest.approx(2.0, rel=0.05) and cal["Smiling"]["converged"]
    assert (
        cal["Young"]["gamma"] == 1.0 and not cal["Young"]["converged"] and "does not raise it" in cal["Young"]["failed"]
    )
    assert summary["original"]["gamma"]["Young"] == 1.0
    assert any(x.startswith("warning: original Young: --gamma auto failed") for x in lines)
    assert "gamma auto missed its target for Young" in leakage({"summary": summary})


def test_leakage_change_compares_the_same_directions_before_and_after():
    """A run whose original table holds directions without an eq. (11) file (prompt pairs)
    compares the projected table with the original rows it shares, not with all of them."""
    from hspace.data.eval_folder import leakage_change

    summary = {
        "original": {
            "mean_offdiagonal": 0.2,
            "mean_diagonal": 0.3,
            "per_direction": {"Smiling": 0.10, "Male": 0.30, "Smiling_prompt": 0.20},
            "per_direction_own": {"Smiling": 0.4, "Male": 0.2, "Smiling_prompt": 0.3},
        },
        "disentangled": {
            "mean_offdiagonal": 0.1,
            "mean_diagonal": 0.27,
            "per_direction": {"Smiling": 0.05, "Male": 0.15},
            "per_direction_own": {"Smiling": 0.3, "Male": 0.24},
        },
    }
    change = leakage_change(summary)
    assert change["before"] == pytest.approx(0.2) and change["after"] == pytest.approx(0.1)
    assert change["kept"] == pytest.approx(0.27 / 0.3)
    summary["original"]["per_direction"]["Male"] = 0.50  # now the common rows' mean is 0.3, not 0.2
    assert leakage_change(summary)["before"] == pytest.approx(0.3)
