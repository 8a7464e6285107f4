"""Access to h-space: the U-Net bottleneck activation h_t (paper sec. 3, after Kwon et al.).

``HSpaceHook`` puts one forward hook on ``unet.mid_block`` (its output by default, its input
as an option) and, while active, can

- capture: hand every h_t the network computes to a callback (and keep the last one),
- inject: add a delta, h_t + gamma v_t (paper sec. 3, h^edit = h + gamma v),
- replace: substitute h_t wholesale (the Jacobian of sec. 4.2 needs f(h) = eps(x_t, h)).

No forward is copied: the U-Net runs its own code and the hook edits the tensor that
flows through the bottleneck. Hooks are removed on exit, also after an exception.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

H_POINTS = ("output", "input")


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
            hs.delta = gamma * v_t          # (B, C, H, W) or (C, H, W); None for no edit
            eps = unet(x_t, t).sample       # on_h receives h_t, edited if delta is set
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        point: str = "output",
        on_h: Callable[[torch.Tensor], None] | None = None,
    ):
        if point not in H_POINTS:
            raise ValueError(f"h point must be one of {H_POINTS}, got {point!r}")
        self.block = mid_block(unet)
        self.point = point
        self.on_h = on_h
        self.delta: torch.Tensor | None = None
        self.replace: torch.Tensor | None = None
        self.last_h: torch.Tensor | None = None
        self._handle = None

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        if self.replace is not None:
            replace = self.replace.to(dtype=h.dtype)
            h = replace.expand_as(h) if replace.dim() == 3 else replace
        if self.delta is not None:
            h = h + self.delta.to(device=h.device, dtype=h.dtype)
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
