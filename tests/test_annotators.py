"""Real annotators' loaders: the same architectures with random weights, saved the way users
hand them over, loaded through the real path; decoding against hand computations."""

from __future__ import annotations

import pytest
import torch

from hspace.data.annotators import load_annotator
from hspace.data.catalog import RunError
from hspace.hcore.annotators import CELEBA_ATTRIBUTES, CelebA40, Hopenet


def test_celeba40_checkpoint_with_state_dict_and_module_prefix(tmp_path):
    torch.manual_seed(0)
    net = CelebA40().eval()
    state = {"module." + k: v for k, v in net.net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "attribute_predictor.pt")
    loaded = load_annotator(f"celeba40:{tmp_path / 'attribute_predictor.pt'}")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    scores = loaded.score(x)
    assert scores.shape == (2, 40) and len(CELEBA_ATTRIBUTES) == 40 and loaded.names[31] == "Smiling"
    up = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = net.net(up).view(2, 40, 2)
    ref = torch.exp(logits[..., 1]) / torch.exp(logits).sum(-1)  # softmax by hand, index 1
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-4)


def test_hopenet_bare_legacy_state_dict(tmp_path):
    torch.manual_seed(1)
    net = Hopenet().eval()
    state = {k.removeprefix("backbone."): v for k, v in net.state_dict().items()}  # original key names
    torch.save(state, tmp_path / "hopenet.pkl", _use_new_zipfile_serialization=False)
    loaded = load_annotator(f"hopenet:{tmp_path / 'hopenet.pkl'}")
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    angles = loaded.score(x)
    with torch.no_grad():
        norm = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        heads = net(norm)
    for i, head in enumerate(heads):
        p = head.softmax(-1)[0]
        expected = float(sum(p[j] * j for j in range(66)) * 3 - 99)
        assert abs(float(angles[0, i]) - expected) < 1e-3
    legacy = load_annotator(f"hopenet-legacy:{tmp_path / 'hopenet.pkl'}")
    assert not torch.allclose(legacy.score(x), angles)


def test_wrong_or_broken_checkpoints(tmp_path):
    torch.manual_seed(0)
    torch.save({"state_dict": CelebA40().net.state_dict()}, tmp_path / "celeba.pt")
    with pytest.raises(RunError, match="is not a Hopenet .* checkpoint .missing e.g. .'fc_yaw.weight"):
        load_annotator(f"hopenet:{tmp_path / 'celeba.pt'}")
    raw = (tmp_path / "celeba.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(RunError, match="cannot read checkpoint"):
        load_annotator(f"celeba40:{tmp_path / 'cut.pt'}")
    with pytest.raises(RunError, match="does not exist"):
        load_annotator(f"celeba40:{tmp_path / 'missing.pt'}")
    with pytest.raises(RunError, match="needs a weight file"):
        load_annotator("hopenet")
