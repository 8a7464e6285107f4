"""Access to h-space: the U-Net bottleneck activation h_t (paper sec. 3, after Kwon et al.).

``HSpaceHook`` puts one forward hook on ``unet.mid_block`` (its output by default, its input
as an option) and, while active, can

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

from collections.abc import Callable

import torch

H_POINTS = ("output", "input")
EDIT_BRANCHES = ("both", "cond", "uncond")


class NoMidBlockError(ValueError):
    pass


def mid_block(unet: torch.nn.Module) -> torch.nn.Module:
    block = getattr(unet, "mid_block", None)
    if block is None:
        raise NoMidBlockError(
            f"{type(unet).__name__} has no mid_block (config mid_block_type="
            f"{getattr(getattr(unet, 'config', None), 'mid_block_type', None)!r}): "
            "h-space is the bottleneck activation, so this model has none"
        )
    return block


def h_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of h for the model's native sample size, from its config."""
    cfg = unet.config
    mid_block(unet)
    size = cfg.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    n_down = len(cfg.block_out_channels) - 1  # the last down block does not downsample
    return (cfg.block_out_channels[-1], size[0] // 2**n_down, size[1] // 2**n_down)


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
        if point not in H_POINTS:
            raise ValueError(f"h point must be one of {H_POINTS}, got {point!r}")
        self.block = mid_block(unet)
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

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
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
        if isinstance(output, tuple):  # UNet2DConditionModel mid blocks may return tuples
            return (self._edit(output[0]), *output[1:])
        return self._edit(output)

    def _input_hook(self, module, args, kwargs):
        if args:
            return (self._edit(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._edit(kwargs["hidden_states"])
        return args, kwargs

    def __enter__(self) -> HSpaceHook:
        if self.point == "output":
            self._handle = self.block.register_forward_hook(self._output_hook)
        else:
            self._handle = self.block.register_forward_pre_hook(self._input_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.delta = self.replace = None
