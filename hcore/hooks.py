"""Access to h-space: the U-Net bottleneck activation h_t (paper sec. 3, after Kwon et al.).

``HSpaceHook`` puts one forward hook on ``unet.mid_block`` (its output by default, its input
as an option; the paper's choice) or on any named module of the denoiser (``h_point``
"down_blocks.2", "up_blocks.1.resnets.0", with ":input" its input): where a module returns a
tuple (diffusers' down blocks: the hidden states and the skip connections), h is its first
element and only that is edited (the skips it handed to the up blocks stay as computed); of a
joint text-image transformer block's (text, image) pair (SD3, FLUX), h is the image tokens
(B, N, D), seen on their patch grid as (B, D, rows, cols) (hcore.transformer). While active the hook can

- capture: hand every h_t the network computes to a callback (and keep the last one),
- inject: add a delta, h_t + gamma v_t (paper sec. 3, h^edit = h + gamma v),
- replace: substitute h_t wholesale (the Jacobian of sec. 4.2 needs f(h) = eps(x_t, h)).

Classifier-free guidance runs one batch [uncond; cond] (2B rows) through the U-Net. With
``guided = True`` the hook knows that layout and adds the delta only to the halves
``edit_branch`` names: "both" (h^edit = h + gamma v in both passes), "cond" (the text-
conditioned pass only, so the guidance scale multiplies the edit's effect) or "uncond".

No forward is copied: the U-Net runs its own code and the hook edits the tensor that
flows through the bottleneck. Hooks are removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

H_POINTS = ("output", "input")
EDIT_BRANCHES = ("both", "cond", "uncond")


class NoMidBlockError(ValueError):
    pass


class HPointError(ValueError):
    """An h point that names no module of the denoiser, or whose output is no tensor."""


def split_point(point: str) -> tuple[str | None, str]:
    """(module name or None for the mid block, "output" or "input") of an h point: "output",
    "input", "NAME", "NAME:output", "NAME:input"."""
    if point in H_POINTS:
        return None, point
    name, _, side = str(point).partition(":")
    side = side or "output"
    if not name or side not in H_POINTS:
        raise HPointError(f"h point {point!r}: 'output', 'input', or a module name with ':output' or ':input'")
    return name, side


def point_module(unet: torch.nn.Module, point: str) -> tuple[torch.nn.Module, str]:
    """The module an h point hooks and the side ("output" or "input"); HPointError naming the
    nearest module names where the name is none of the denoiser's."""
    import difflib

    name, side = split_point(point)
    if name is None:
        return mid_block(unet), side
    modules = dict(denoiser_root(unet).named_modules())
    if name not in modules:
        blocks = [n for n in modules if n and n.count(".") <= 1]
        near = difflib.get_close_matches(name, list(modules), n=4, cutoff=0.5) or blocks[:6]
        raise HPointError(f"h point {name!r}: {type(unet).__name__} has no such module (nearest: {', '.join(near)})")
    return modules[name], side


def denoiser_root(unet: torch.nn.Module) -> torch.nn.Module:
    """The module whose names h points use: a transformer inside hcore.transformer's adapter
    (so "transformer_blocks.12" is named as in diffusers), else the denoiser itself."""
    inner = getattr(unet, "transformer", None)
    return inner if isinstance(inner, torch.nn.Module) else unet


def grid_view(unet: torch.nn.Module):
    """The token <-> (D, rows, cols) view of a transformer adapter (hcore.transformer), or None."""
    return unet if hasattr(unet, "to_chw") else None


# Transformer blocks whose output is (text stream, image stream): h is the image stream (diffusers'
# SD3 JointTransformerBlock, FLUX's double- and single-stream blocks, all of them return the pair)
IMAGE_SECOND = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def stream_index(module: torch.nn.Module) -> int:
    """Which element of a module's tuple output is h: the image stream (1) of a joint
    text-image transformer block, else the first (a U-Net down block's hidden states)."""
    return 1 if type(module).__name__ in IMAGE_SECOND else 0


def first_tensor(value, point: str, index: int = 0) -> torch.Tensor:
    """h out of what a module gave: the tensor, or a tuple's element ``index`` (a tensor)."""
    if isinstance(value, tuple) and len(value) > index:
        value = value[index]
    if not isinstance(value, torch.Tensor):
        raise HPointError(f"h point {point!r}: the module gives a {type(value).__name__}, not a tensor")
    return value


def mid_block(unet: torch.nn.Module) -> torch.nn.Module:
    block = getattr(unet, "mid_block", None)
    if block is None:
        raise NoMidBlockError(
            f"{type(unet).__name__} has no mid_block (config mid_block_type="
            f"{getattr(getattr(unet, 'config', None), 'mid_block_type', None)!r}): "
            "h-space is the bottleneck activation, so this model has none"
        )
    return block


def h_shape(unet: torch.nn.Module, point: str = "output") -> tuple[int, ...]:
    """The shape of one sample's h for the model's native sample size: (C, H, W) of the mid block
    from its config; at another point, what that module gives in one forward of a zero input
    (stopped there)."""
    cfg = unet.config
    if split_point(point)[0] is not None or grid_view(unet) is not None:
        return probe_shape(unet, point)
    mid_block(unet)
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    n_down = len(cfg.block_out_channels) - 1  # the last down block does not downsample
    return (cfg.block_out_channels[-1], size[0] // 2**n_down, size[1] // 2**n_down)


class _Reached(Exception):
    pass


def probe_shape(unet: torch.nn.Module, point: str) -> tuple[int, ...]:
    """One sample's h shape at ``point``: the denoiser run on a zero input of its sample size (with
    zero text and added conditioning where its config asks for them) until the point."""
    module, side = point_module(unet, point)
    seen = {}
    view = grid_view(unet)

    def grab(value):
        h = first_tensor(value, point, stream_index(module))
        seen["h"] = view.to_chw(h) if view is not None and h.dim() == 3 else h
        raise _Reached

    if side == "output":
        handle = module.register_forward_hook(lambda m, args, out: grab(out))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: grab(args[0] if args else kwargs.get("hidden_states")), with_kwargs=True
        )
    try:
        with torch.no_grad():
            args, kwargs = zero_inputs(unet)
            unet(*args, **kwargs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "h" not in seen:
        raise HPointError(f"h point {point!r}: the module is not run in the denoiser's forward")
    return tuple(seen["h"].shape[1:])


def zero_inputs(unet: torch.nn.Module) -> tuple[tuple, dict]:
    """The arguments of one zero sample: (sample, timestep) and, for a text-conditioned U-Net,
    its zero text (and SDXL's added conditioning); a transformer adapter gives its own."""
    if hasattr(unet, "zero_inputs"):
        return unet.zero_inputs()
    cfg = unet.config
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    param = next(unet.parameters())
    x = torch.zeros(1, cfg.in_channels, *size, dtype=param.dtype, device=param.device)
    t = torch.tensor([1], device=param.device)
    width = getattr(cfg, "cross_attention_dim", None)
    if width is None:
        return (x, t), {}
    text = torch.zeros(1, 1, width, dtype=param.dtype, device=param.device)
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, pooled, dtype=param.dtype, device=param.device),
                 "time_ids": torch.zeros(1, 6, dtype=param.dtype, device=param.device)}  # fmt: skip
        return (x, t), {"encoder_hidden_states": text, "added_cond_kwargs": added}
    return (x, t), {"encoder_hidden_states": text}


class HSpaceHook:
    """Context manager hooking the bottleneck of a diffusers U-Net.

    Usage::

        with HSpaceHook(unet, on_h=store.append) as hs:
            hs.delta = gamma * v_t          # (B, C, H, W) or (C, H, W), or h -> delta; None for no edit
            eps = unet(x_t, t).sample       # on_h receives h_t, edited if delta is set

    Under classifier-free guidance set ``guided = True``: the batch is then read as
    [uncond; cond] (2B rows), ``delta`` is per sample ((B, C, H, W), (1, C, H, W) or
    (C, H, W)) and goes to the halves ``edit_branch`` names. ``last_h`` and ``on_h`` always
    see the whole batch the block produced.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        point: str = "output",
        on_h: Callable[[torch.Tensor], None] | None = None,
        edit_branch: str = "both",
    ):
        self.block, self.side = point_module(unet, point)
        self.view = grid_view(unet)
        self.point = point
        self.on_h = on_h
        self.edit_branch = edit_branch
        self.guided = False
        self.delta: torch.Tensor | None = None
        self.replace: torch.Tensor | None = None
        self.last_h: torch.Tensor | None = None
        self._handle = None

    @property
    def edit_branch(self) -> str:
        return self._edit_branch

    @edit_branch.setter
    def edit_branch(self, branch: str) -> None:
        if branch not in EDIT_BRANCHES:
            raise ValueError(f"edit branch must be one of {EDIT_BRANCHES}, got {branch!r}")
        self._edit_branch = branch

    def _add_delta(self, h: torch.Tensor) -> torch.Tensor:
        """h + delta (paper sec. 3), on the halves ``edit_branch`` names when ``guided``."""
        if callable(self.delta):  # a delta that depends on h itself (trained Asyrp: f(h_t, t))
            shift = self.delta
        else:
            fixed = self.delta.to(device=h.device, dtype=h.dtype)
            shift = lambda part: fixed  # noqa: E731
        if not self.guided:
            return h + shift(h)
        if h.shape[0] % 2:
            raise ValueError(f"guided batch has {h.shape[0]} rows: expected [uncond; cond], an even number")
        uncond, cond = h.chunk(2)
        if self.edit_branch in ("both", "uncond"):
            uncond = uncond + shift(uncond)
        if self.edit_branch in ("both", "cond"):
            cond = cond + shift(cond)
        return torch.cat([uncond, cond])

    def captured(self, capture: str = "cond") -> torch.Tensor:
        """h of the latest call, as a sampler hands it on: under guidance the half ``capture``
        names ("cond" or "uncond" of [uncond; cond]; "both": all rows), unguided all of it."""
        h = self.last_h
        if not self.guided or capture == "both":
            return h
        uncond, cond = h.chunk(2)
        return cond if capture == "cond" else uncond

    def step_delta(self, action, step: int, device):
        """Set the delta of ``action`` (None: no edit) at sampling step ``step`` on ``device``, and
        return it (a tensor, an h -> delta callable, or None)."""
        delta = action.delta(step) if action is not None else None
        self.delta = delta.to(device) if isinstance(delta, torch.Tensor) else delta
        return delta

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        if self.view is not None and h.dim() == 3:  # a transformer's tokens: h seen as (B, D, rows, cols)
            return self.view.to_tokens(self._edit(self.view.to_chw(h)))
        if self.replace is not None:
            replace = self.replace.to(dtype=h.dtype)
            h = replace.expand_as(h) if replace.dim() == 3 else replace
        if self.delta is not None:
            h = self._add_delta(h)
        self.last_h = h
        if self.on_h is not None:
            self.on_h(h)
        return h

    def _output_hook(self, module, args, output):
        if isinstance(output, tuple):  # mid blocks may return tuples, down blocks (h, skips), joint blocks (text, h)
            i = stream_index(module)
            return (*output[:i], self._edit(first_tensor(output, self.point, i)), *output[i + 1 :])
        return self._edit(first_tensor(output, self.point))

    def _input_hook(self, module, args, kwargs):
        if args:
            return (self._edit(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._edit(kwargs["hidden_states"])
        return args, kwargs

    def __enter__(self) -> HSpaceHook:
        if self.side == "output":
            self._handle = self.block.register_forward_hook(self._output_hook)
        else:
            self._handle = self.block.register_forward_pre_hook(self._input_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.delta = self.replace = None


@contextlib.contextmanager
def capture_points(unet: torch.nn.Module, points, guided: bool = False):
    """h at each of ``points`` at every call of the denoiser while the block runs (one call per
    sampling step): {point: [h of each call as (B, *shape) float16 numpy]}, the conditional half of
    a guided [uncond; cond] batch. Hooks only read; with no points nothing is hooked."""
    got = {p: [] for p in points}

    def keep(point):
        def on_h(h):
            h = h.chunk(2)[1] if guided else h
            got[point].append(h.detach().to("cpu", torch.float16).numpy())

        return on_h

    with contextlib.ExitStack() as stack:
        for point in points:
            stack.enter_context(HSpaceHook(unet, point=point, on_h=keep(point)))
        yield got
