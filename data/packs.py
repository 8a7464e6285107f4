"""Direction packs (`hspace export`): a folder others can use without the run it came from.

    PACK/NAME.safetensors   the direction files, byte for byte as the run wrote them
    PACK/directions.json    the index: model, schedule, and per direction how it was found,
                            its calibrated gamma and its Table-1 row
    PACK/README.md          a model card (Hugging Face front matter) with the same, and usage
    PACK/preview.png        each direction at -gamma, 0, +gamma on one sample

The layout is flat, so ``huggingface_hub.upload_folder(folder_path=PACK, ...)`` publishes it
as is; hspace itself never uses the network. ``hspace edit`` and ``hspace.load_direction``
take ``PACK/NAME`` (data.directions.resolve_path).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from hspace.data.catalog import RunError
from hspace.data.directions import PACK_INDEX

FORMAT = "hspace-direction-pack/1"


@dataclass(frozen=True)
class PackFolder:
    root: Path

    @property
    def index(self) -> Path:
        return Path(self.root) / PACK_INDEX

    @property
    def readme(self) -> Path:
        return Path(self.root) / "README.md"

    @property
    def preview(self) -> Path:
        return Path(self.root) / "preview.png"

    def direction(self, name: str) -> Path:
        return Path(self.root) / f"{name}.safetensors"

    def prepare(self) -> None:
        """Create the folder; refuse one holding other files than a previous pack's."""
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise RunError(f"--out {root} is a file; give a folder for the pack")
        if root.is_dir() and any(root.iterdir()) and not self.index.exists():
            raise RunError(f"--out {root} holds other files and no {PACK_INDEX}; give a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, source: Path) -> Path:
        target = self.direction(name)
        shutil.copyfile(source, target.with_name(target.name + ".partial"))
        target.with_name(target.name + ".partial").replace(target)
        return target

    def write_index(self, index: dict) -> Path:
        tmp = self.index.with_name(PACK_INDEX + ".partial")
        tmp.write_text(json.dumps({"format": FORMAT, **index}, indent=2) + "\n")
        tmp.replace(self.index)
        return self.index

    def read_index(self) -> dict:
        try:
            return json.loads(self.index.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{self.index} is not a readable pack index: {e}") from None

    def write_readme(self, text: str) -> Path:
        self.readme.write_text(text)
        return self.readme


def model_card(index: dict) -> str:
    """README.md of a pack: Hugging Face front matter, what the directions are, how they were
    found, how far to trust them (Table-1 rows), and how to use them."""
    model, schedule = index["model"], index["schedule"]
    hub_id = model["id"] if "/" in model["id"] and not model["id"].startswith("/") else None
    lines = ["---", "library_name: hspace", "tags:", "- diffusion", "- h-space", "- image-editing"]
    lines += [f"base_model: {hub_id}"] if hub_id else []
    lines += ["---", "", f"# h-space directions for `{model['id']}`", ""]
    lines += [
        "Editing directions in the h-space (U-Net bottleneck activations h_{T:1}) of the model, found by hspace "
        "(Haas et al., *Discovering Interpretable Directions in the Semantic Latent Space of Diffusion Models*).",
        "",
        f"- model fingerprint (sha256 of the U-Net's config and weights): `{model['fingerprint']}`",
        f"- schedule: DDIM, {schedule['steps']} steps, noise schedule `{schedule['scheduler']}`, "
        f"eta {schedule['eta']}, P_t clipping {schedule['clip_sample']}, h at the mid block's {schedule['h_point']}"
        + (f", edits on the `{schedule['edit_branch']}` guidance branch(es)" if schedule.get("edit_branch") else ""),
        f"- exported from run `{index['run']}` by hspace {index.get('hspace_version', '?')}",
        "",
        "| direction | found by | source | calibrated γ | own change at γ | mean leakage at γ |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in index["directions"].items():
        gamma = "-" if d.get("gamma") is None else f"{d['gamma']:.3g}"
        own = "-" if d.get("own_change") is None else f"{d['own_change']:+.3f}"
        leak = "-" if d.get("leakage") is None else f"{d['leakage']:.3f}"
        lines.append(f"| `{name}` | {d['method']} | {d['source']} | {gamma} | {own} | {leak} |")
    lines += ["", "Table-1 rows (change of every scored attribute at the calibrated γ, held-out samples):", ""]
    rows = {n: d["table1"] for n, d in index["directions"].items() if d.get("table1")}
    if rows:
        cols = list(next(iter(rows.values())))
        lines += ["| direction | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n, r in rows.items():
            lines.append(f"| `{n}` | " + " | ".join(f"{r.get(c, float('nan')):+.3f}" for c in cols) + " |")
    else:
        lines.append("(the run was not evaluated: no Table-1 rows)")
    name = next(iter(index["directions"]))
    lines += [
        "",
        "![each direction at -γ, 0, +γ on one sample](preview.png)",
        "",
        "## Use",
        "",
        "```",
        f"hspace edit --model MODEL --seed 0 --direction PACK/{name}:2 --out edit.png",
        f"hspace edit --image photo.png --model MODEL --direction PACK/{name} --scales 0,1,2 --out photo_edit.png",
        "```",
        "",
        "```python",
        "import hspace",
        f'direction = hspace.load_direction("PACK/{name}")',
        f"pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # {schedule['steps']} DDIM steps",
        "with hspace.apply(pipe, direction, gamma=2.0):",
        f"    images = pipe(num_inference_steps={schedule['steps']}, eta={schedule['eta']}).images",
        "```",
        "",
        "A direction is refused (one line) by a model with another fingerprint, another noise schedule or another "
        "step count.",
        "",
    ]
    return "\n".join(lines)
