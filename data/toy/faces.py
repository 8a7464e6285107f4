"""Toy faces: a procedural, ground-truth world of small cartoon faces.

Every face is drawn from its own seed, so ``render(seed)`` is deterministic and the
same seed always yields the same image and factors. Faces are painted at
``SUPERSAMPLE x`` the output size with hard masks and box-downsampled, which is an
exact area-average antialias.

Factors (CelebA attribute names, so one pipeline config serves toy and real models):

======================  ==========================================================
``yaw``                 degrees, N(0, 15) clipped to [-35, 35]; features shift
                        sideways, the face narrows
``pitch``               degrees, N(0, 10) clipped to [-25, 25]; features shift up
                        or down
``roll``                degrees, N(0, 10) clipped to [-25, 25]; the whole head
                        rotates in the image plane
``Smiling``             binary, P = 0.5; ``smile`` is its intensity in [0, 1]
                        (open, upturned mouth above 0.5, flat closed mouth below)
``Male``                binary, P = 0.5; short hair, heavy brows, square jaw
``Young``               binary; P(Young | Male) = 0.6, P(Young | female) = 0.8;
                        old faces have grey hair and forehead lines
``Eyeglasses``          binary; P = 0.08 if Young else 0.60
``Wearing_Hat``         binary; P = 0.45 if Male else 0.08
nuisance                ``skin`` in [0, 1] (light to dark), ``hair_colour`` index
                        into ``HAIR_COLOURS``, ``background`` RGB in [0, 1]
======================  ==========================================================

Resulting joint frequencies (exact, from the conditionals above): P(Young) = 0.70,
P(Eyeglasses) = 0.236, P(Wearing_Hat) = 0.265, P(Eyeglasses | old) / P(Eyeglasses |
Young) = 7.5, P(Wearing_Hat | Male) / P(Wearing_Hat | female) = 5.6,
corr(Male, Young) = -0.22 (phi coefficient). ``tests/test_toyfaces.py`` checks these on
10k renders.

Render styles (``STYLES``; the factors and their joint distribution are the same in each):

- ``v1``: the renders the shipped v1 toy model and oracle were trained on.
- ``v2``: for the toy world v2. At 32x32 the v1 mouth spans 5-8 px and opens by
  at most 2 px, and the glasses' rims are under 1 px thick, so a small DDPM decides them
  late and locally (a linear probe cannot read Smiling or Eyeglasses from its h). v2 makes
  them larger and higher in contrast: the mouth 1.4x wider and 1.6x further open
  (``mouth_scale``), rims 1.6x thicker (``rim``), and tinted lenses that darken the eye
  area by half (``lens_tint``), so both are face-level features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINARY_ATTRIBUTES = ("Smiling", "Eyeglasses", "Wearing_Hat", "Male", "Young")
POSE_ATTRIBUTES = ("yaw", "pitch", "roll")
ATTRIBUTES = BINARY_ATTRIBUTES + POSE_ATTRIBUTES

P_MALE = 0.5
P_SMILING = 0.5
P_YOUNG = {True: 0.6, False: 0.8}  # keyed by Male
P_EYEGLASSES = {True: 0.08, False: 0.60}  # keyed by Young
P_HAT = {True: 0.45, False: 0.08}  # keyed by Male
POSE_STD = {"yaw": 15.0, "pitch": 10.0, "roll": 10.0}
POSE_LIMIT = {"yaw": 35.0, "pitch": 25.0, "roll": 25.0}

HAIR_COLOURS = np.array(
    [[0.10, 0.07, 0.05], [0.35, 0.20, 0.08], [0.85, 0.70, 0.30], [0.65, 0.22, 0.08]],
    dtype=np.float32,
)
SKIN_LIGHT = np.array([1.00, 0.86, 0.74], dtype=np.float32)
SKIN_DARK = np.array([0.45, 0.30, 0.20], dtype=np.float32)
GREY_HAIR = np.array([0.80, 0.80, 0.82], dtype=np.float32)
HAT_COLOURS = np.array(
    [[0.15, 0.25, 0.75], [0.75, 0.15, 0.15], [0.15, 0.55, 0.20], [0.55, 0.20, 0.60]],
    dtype=np.float32,
)

SUPERSAMPLE = 2
FACE_SCALE = 1.18  # face size relative to the canvas


@dataclass(frozen=True)
class Style:
    """How the binary features are drawn (see the module docstring)."""

    mouth_width: float = 1.0  # mouth width relative to v1
    mouth_open: float = 1.0  # opening of a smiling mouth relative to v1
    rim: tuple[float, float] = (0.115, 0.16)  # glasses: inner and outer rim radius
    lens_tint: float = 0.0  # 0 clear lenses; t blends the lens area towards dark by t


STYLES = {"v1": Style(), "v2": Style(mouth_width=1.4, mouth_open=1.6, rim=(0.105, 0.175), lens_tint=0.5)}


@dataclass(frozen=True)
class Factors:
    """The ground-truth factors of a batch of faces; every field has shape (N,)."""

    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    smile: np.ndarray
    Smiling: np.ndarray
    Eyeglasses: np.ndarray
    Wearing_Hat: np.ndarray
    Male: np.ndarray
    Young: np.ndarray
    skin: np.ndarray
    hair_colour: np.ndarray
    hat_colour: np.ndarray
    background: np.ndarray  # (N, 3)

    def __len__(self) -> int:
        return len(self.yaw)

    def labels(self) -> np.ndarray:
        """Attribute table (N, len(ATTRIBUTES)) float32 in the order of ``ATTRIBUTES``."""
        return np.stack([getattr(self, name).astype(np.float32) for name in ATTRIBUTES], 1)

    def row(self, i: int) -> dict:
        return {
            name: (value[i].tolist() if value.ndim > 1 else value[i].item()) for name, value in self.__dict__.items()
        }


def draw_factors(seeds: np.ndarray | list[int]) -> Factors:
    """Draw the factors of each face from its own seed (one numpy Generator per face)."""
    rows = []
    for seed in np.asarray(seeds, dtype=np.int64).ravel():
        rng = np.random.default_rng([int(seed), 0x70F])
        pose = [float(np.clip(rng.normal(0.0, POSE_STD[k]), -POSE_LIMIT[k], POSE_LIMIT[k])) for k in POSE_ATTRIBUTES]
        male = bool(rng.random() < P_MALE)
        young = bool(rng.random() < P_YOUNG[male])
        glasses = bool(rng.random() < P_EYEGLASSES[young])
        hat = bool(rng.random() < P_HAT[male])
        smiling = bool(rng.random() < P_SMILING)
        smile = rng.uniform(0.6, 1.0) if smiling else rng.uniform(0.0, 0.3)
        rows.append(
            (
                *pose,
                smile,
                smiling,
                glasses,
                hat,
                male,
                young,
                rng.random(),
                rng.integers(len(HAIR_COLOURS)),
                rng.integers(len(HAT_COLOURS)),
                *rng.uniform(0.05, 0.95, 3),
            )
        )
    cols = list(zip(*rows, strict=True)) if rows else [()] * 15
    f32 = lambda c: np.asarray(c, dtype=np.float32)  # noqa: E731
    return Factors(
        yaw=f32(cols[0]),
        pitch=f32(cols[1]),
        roll=f32(cols[2]),
        smile=f32(cols[3]),
        Smiling=np.asarray(cols[4], bool),
        Eyeglasses=np.asarray(cols[5], bool),
        Wearing_Hat=np.asarray(cols[6], bool),
        Male=np.asarray(cols[7], bool),
        Young=np.asarray(cols[8], bool),
        skin=f32(cols[9]),
        hair_colour=np.asarray(cols[10], np.int64),
        hat_colour=np.asarray(cols[11], np.int64),
        background=f32(np.stack(cols[12:15], 1) if rows else np.zeros((0, 3))),
    )


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """canvas (3, N, S, S) channel-first (contiguous planes are fast to mask); mask
    (N, S, S) or broadcastable; colour (N, 3) or (3,)."""
    colour = np.broadcast_to(np.asarray(colour, np.float32), (canvas.shape[1], 3))
    mask = np.broadcast_to(mask, canvas.shape[1:])
    for c in range(3):
        np.copyto(canvas[c], colour[:, c, None, None], where=mask)


def paint(factors: Factors, size: int = 32, style: str = "v1") -> np.ndarray:
    """Render faces for given factors in a style of ``STYLES``: uint8 images (N, size, size, 3)."""
    if style not in STYLES:
        raise ValueError(f"unknown toy render style {style!r}; use one of {', '.join(STYLES)}")
    st = STYLES[style]
    n = len(factors)
    s = size * SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    col = lambda a: np.asarray(a, np.float32)[:, None, None]  # noqa: E731

    roll = np.deg2rad(col(factors.roll))
    cx, cy = 0.0, 0.12
    # face-frame coordinates (u right, v down), rotated by roll about the face centre
    u = (np.cos(roll) * (x - cx) + np.sin(roll) * (y - cy)) / FACE_SCALE
    v = (-np.sin(roll) * (x - cx) + np.cos(roll) * (y - cy)) / FACE_SCALE
    yaw_shift = 0.30 * np.sin(np.deg2rad(col(factors.yaw)))
    pitch_shift = 0.30 * np.sin(np.deg2rad(col(factors.pitch)))
    male, young = col(factors.Male) > 0, col(factors.Young) > 0

    skin = SKIN_LIGHT + factors.skin[:, None] * (SKIN_DARK - SKIN_LIGHT)
    hair = HAIR_COLOURS[factors.hair_colour]
    hair = np.where(factors.Young[:, None], hair, 0.15 * hair + 0.85 * GREY_HAIR)
    canvas = np.empty((3, n, s, s), np.float32)
    canvas[:] = factors.background.T[:, :, None, None]

    # head: a superellipse, squarer for Male; narrower when turned
    half_w = 0.46 * (1.0 - 0.12 * np.abs(np.sin(np.deg2rad(col(factors.yaw)))))
    power = np.where(male, 3.2, 2.0)
    head = (np.abs(u / half_w) ** power + np.abs(v / 0.58) ** power) <= 1.0
    long_hair = ~male & (np.abs(u) < 0.60) & (v > -0.66) & (v < 0.45)
    _paint(canvas, long_hair, hair)
    _paint(canvas, head, skin)
    # hair cap over the forehead, hair line moves with pitch
    hairline = -0.28 + 0.5 * pitch_shift
    cap = ((u / (half_w + 0.04)) ** 2 + (v / 0.64) ** 2 <= 1.0) & (v < hairline - 0.04 * np.cos(3 * u))
    _paint(canvas, cap, hair)

    fu, fv = u - yaw_shift, v - pitch_shift  # feature frame
    # forehead lines for old faces
    for line_v in (-0.20, -0.15):
        wrinkle = ~young & (np.abs(fv - line_v) < 0.012) & (np.abs(fu) < 0.17)
        _paint(canvas, wrinkle & ~cap, 0.75 * skin)
    # eyes: white sclera + dark pupil; brows
    for side in (-1.0, 1.0):
        eu, ev = fu - side * 0.18, fv + 0.02
        _paint(canvas, (eu / 0.10) ** 2 + (ev / 0.065) ** 2 <= 1.0, np.array([1.0, 1.0, 1.0]))
        _paint(canvas, eu**2 + ev**2 <= 0.05**2, np.array([0.05, 0.05, 0.10]))
        brow_h = np.where(male, 0.035, 0.018)
        brow = (np.abs(ev + 0.13) < brow_h) & (np.abs(eu) < 0.11)
        _paint(canvas, brow, 0.6 * hair)
    # nose: shifts furthest with yaw
    nose = (np.abs(u - 1.35 * yaw_shift) < 0.035) & (fv > 0.04) & (fv < 0.17)
    _paint(canvas, nose, 0.8 * skin)
    # mouth: smile intensity bends and opens it
    smile = col(factors.smile)
    mu, mv = fu, fv - 0.30
    width = (0.14 + 0.08 * smile) * st.mouth_width
    curve = (0.45 * smile - 0.10) * (mu / (0.2 * st.mouth_width)) ** 2  # up-turned corners when smiling
    open_h = np.where(smile > 0.5, (0.02 + 0.10 * (smile - 0.5) / 0.5) * st.mouth_open, 0.022)
    lip = (np.abs(mu) < width) & (mv + curve > -0.025) & (mv + curve < -0.025 + open_h + 0.02 * (1 - (mu / width) ** 2))
    _paint(canvas, lip, np.array([0.55, 0.08, 0.10]))
    teeth = (smile > 0.5) & lip & (mv + curve < 0.005) & (np.abs(mu) < 0.8 * width)
    _paint(canvas, teeth, np.array([0.98, 0.98, 0.95]))
    # eyeglasses: two dark rims and a bridge
    glasses = col(factors.Eyeglasses) > 0
    inner, outer = st.rim
    for side in (-1.0, 1.0):
        r = np.sqrt((fu - side * 0.18) ** 2 + (fv + 0.02) ** 2)
        if st.lens_tint > 0:
            lens = np.broadcast_to(glasses & (r <= inner), canvas.shape[1:])
            canvas[:, lens] *= 1.0 - st.lens_tint
            canvas[:, lens] += st.lens_tint * 0.08
        _paint(canvas, glasses & (r > inner) & (r < outer), np.array([0.05, 0.05, 0.05]))
    bridge = glasses & (np.abs(fu) < 0.05) & (np.abs(fv + 0.04) < 0.02)
    _paint(canvas, bridge, np.array([0.05, 0.05, 0.05]))
    # hat: crown plus brim across the forehead
    hat = col(factors.Wearing_Hat) > 0
    hat_colour = HAT_COLOURS[factors.hat_colour]
    crown = hat & (np.abs(u) < 0.44) & (v < -0.30) & (v > -0.90)
    brim = hat & (np.abs(u) < 0.66) & (np.abs(v + 0.30) < 0.05)
    _paint(canvas, crown | brim, hat_colour)

    small = canvas.reshape(3, n, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(3, 5)).transpose(1, 2, 3, 0)
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def render_batch(seeds, size: int = 32, chunk: int = 512, style: str = "v1") -> tuple[np.ndarray, Factors]:
    """Render one face per seed in ``style``: uint8 images (N, size, size, 3) and their factors."""
    factors = draw_factors(seeds)
    images = np.empty((len(factors), size, size, 3), np.uint8)
    for start in range(0, len(factors), chunk):
        part = Factors(**{k: v[start : start + chunk] for k, v in factors.__dict__.items()})
        images[start : start + chunk] = paint(part, size, style)
    return images, factors


def render(seed: int, size: int = 32, style: str = "v1") -> tuple[np.ndarray, dict]:
    """Render the face of one seed: uint8 image (size, size, 3) and its factors as a dict."""
    images, factors = render_batch([seed], size, style=style)
    return images[0], factors.row(0)


def feature_box(feature: str, style: str = "v1", size: int = 32, share: float = 0.9, n: int = 1000):
    """The smallest pixel box ``(x0, y0, x1, y1)`` (end exclusive, as ``hspace jacobian --roi``
    takes it) that holds ``share`` of the pixel change made by toggling a feature on ``n`` faces
    drawn from the joint distribution: ``"mouth"`` (a smile of 0.8 against a flat 0.15) or
    ``"eyes"`` (eyeglasses on against off). The regions of interest of the toy world's ROI
    Jacobian (early version, sec. 4.2) follow from the renderer, per style."""
    import dataclasses

    f = draw_factors(np.arange(n) + (5 << 40))
    ones, zeros = np.ones(n, bool), np.zeros(n, bool)
    if feature == "mouth":
        on = dataclasses.replace(f, Smiling=ones, smile=np.full(n, 0.8, np.float32))
        off = dataclasses.replace(f, Smiling=zeros, smile=np.full(n, 0.15, np.float32))
    elif feature == "eyes":
        on, off = dataclasses.replace(f, Eyeglasses=ones), dataclasses.replace(f, Eyeglasses=zeros)
    else:
        raise ValueError(f"unknown feature {feature!r}; use mouth or eyes")
    diff = paint(on, size, style).astype(np.float64) - paint(off, size, style).astype(np.float64)
    energy = (diff**2).sum((0, 3))
    table = np.zeros((size + 1, size + 1))
    table[1:, 1:] = (energy / energy.sum()).cumsum(0).cumsum(1)
    e = np.arange(size + 1)
    # every box at once: sums[y0, y1, x0, x1] from the summed-area table
    sums = table[None, :, None, :] - table[:, None, None, :] - table[None, :, :, None] + table[:, None, :, None]
    extent = e[None, :] - e[:, None]  # [start, end] -> end - start
    area = extent[:, :, None, None] * extent[None, None]
    ok = (extent[:, :, None, None] > 0) & (extent[None, None] > 0) & (sums >= share - 1e-12)
    area = np.where(ok, area, np.iinfo(np.int64).max)
    y0, y1, x0, x1 = np.unravel_index(np.argmin(area), area.shape)
    return int(x0), int(y0), int(x1), int(y1)
