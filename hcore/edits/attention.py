"""What Prompt-to-Prompt and Plug-and-Play share: a source generation carried in the same batch
as the edited one, and attention processors that hand the edited rows what the source rows
computed.

The batch. A paired action (``Action.paired``) makes ``hcore.generator.generate`` render
[sources; edits]: n source rows with the samples' own prompts, then n edited rows with the
target prompts, from the same generators (the same x_T and z_t), and return the edited rows.
Under classifier-free guidance the U-Net sees [uncond(sources; edits); cond(sources; edits)];
a plain diffusers pipeline called with ``prompt=[source, target]`` (and one x_T for both)
has the same layout.

The processors. ``Paired.session`` swaps every attention processor of the U-Net for a
``Controlled`` one and counts the U-Net's calls (one per step, as the sampler and diffusers'
pipelines call it). Where the action injects nothing at a call, the processor is the original
one (so an action at strength 0 is the plain target generation, bit for bit in the processor);
where it does, it computes the attention as diffusers' ``AttnProcessor`` (through the
``Attention`` module's own helpers) and lets the action rewrite the edited rows' attention
probabilities from the source rows' (``Paired.probs``). Features of other layers are copied
by forward hooks (``Paired.features``).
"""

from __future__ import annotations

import contextlib
import difflib

import torch

from hspace.hcore.edits import Action, EditMethod


@contextlib.contextmanager
def swapped_processors(unet, make, on_call):
    """While the block runs, every attention processor of ``unet`` is ``make(name, original)``
    and ``on_call()`` runs before each U-Net call (one per sampling step); the original
    processors are put back after, also after an exception."""
    if not hasattr(unet, "attn_processors"):
        raise ValueError(
            f"attention processors need a text-conditioned U-Net (UNet2DConditionModel), got {type(unet).__name__}"
        )
    originals = dict(unet.attn_processors)
    hook = unet.register_forward_pre_hook(lambda module, args: on_call())
    unet.set_attn_processor({k: make(k, p) for k, p in originals.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(originals)
        hook.remove()


class InjectionMethod(EditMethod):
    """What Prompt-to-Prompt and Plug-and-Play declare alike: a prompt pair, attention
    processors, and a strength tau that is a share of the steps (a higher tau injects more of the
    source and edits less: the comparison searches it from 1 down)."""

    needs = ("prompt_pair",)
    strength = "tau"
    acts_on = "attention"
    strength_start, strength_max, weakens = 0.25, 1.0, True

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        return (
            None if 0 <= value <= 1 else f"{cls.name}'s strength tau is a share of the steps, in [0, 1]; got {value:g}"
        )


class Paired(Action):
    """A source generation beside the edited one. ``taus``: the share of the steps (per edited
    row, or one for all) during which the edited rows receive the source's attention; steps
    ``s < int(tau * steps)`` inject, as the P2P and PnP codes count them."""

    cond_only = False  # inject into the conditional half of a guided batch only (Prompt-to-Prompt)

    def __init__(self, taus):
        self.taus = torch.as_tensor(taus, dtype=torch.float64).reshape(-1)
        if not bool(((self.taus >= 0) & (self.taus <= 1)).all()):
            got = self.taus.tolist()
            raise ValueError(f"{type(self).__name__}: tau must be in [0, 1] (a share of the steps), got {got}")
        self.steps: int | None = None
        self.guided = False
        self.step = -1

    def check(self, steps: int, guided: bool) -> None:
        self.steps, self.guided = steps, guided

    def until(self, share: torch.Tensor) -> torch.Tensor:
        """The first step that does not inject, per row: int(share * steps)."""
        if self.steps is None:
            raise ValueError(f"{type(self).__name__} ran before its number of steps was known (Action.check)")
        return torch.floor(share * self.steps + 1e-9).long()

    def rows_at(self, share: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the edited rows that inject at the current step."""
        return self.step < self.until(share)

    # what a subclass says ----------------------------------------------------------------
    def window(self, name: str, cross: bool) -> torch.Tensor | None:
        """The share of the steps (per edited row) during which attention layer ``name``
        injects; None: it never does."""
        return None

    def probs(self, name: str, cross: bool, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        """The edited rows' attention probabilities (n, heads, q, k) from the source rows'
        ``src`` and their own ``edit``: by default the source's."""
        return src

    def feature_layers(self) -> list[str]:
        """Modules of the U-Net whose outputs the edited rows take from the source rows."""
        return []

    def feature_window(self) -> torch.Tensor:
        """The share of the steps (per edited row) during which the features are injected."""
        return torch.zeros(1)

    def active(self, name: str, cross: bool) -> bool:
        """Whether the attention layer ``name`` injects anything at the current step."""
        share = self.window(name, cross)
        return share is not None and bool(self.rows_at(share).any())

    # the machinery ---------------------------------------------------------------------
    def halves(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (G, 2, n, ...): G = 2 halves under guidance ([uncond; cond]), each
        [sources; edits]."""
        groups = 2 if self.guided else 1
        if x.shape[0] % (2 * groups):
            raise ValueError(
                f"{type(self).__name__} needs a batch of [sources; edits]{' per half' if self.guided else ''}: "
                f"got {x.shape[0]} rows (a plain pipeline: prompt=[source, target] and the same x_T for both)"
            )
        return x.reshape(groups, 2, x.shape[0] // (2 * groups), *x.shape[1:])

    def inject(self, x: torch.Tensor, rows: torch.Tensor, fill) -> torch.Tensor:
        """x (rows, ...) with the edited rows of ``rows`` (n,) replaced by ``fill(src, edit)``
        (in the conditional half only where ``cond_only``)."""
        parts = self.halves(x).clone()
        mask = rows.to(x.device).reshape(-1, *(1,) * (x.dim() - 1))
        for g in range(parts.shape[0]):
            if self.cond_only and self.guided and g == 0:
                continue
            new = fill(parts[g, 0], parts[g, 1])
            parts[g, 1] = torch.where(mask, new.to(x.dtype), parts[g, 1])
        return parts.reshape(x.shape)

    @contextlib.contextmanager
    def session(self, unet):
        unknown = [m for m in self.feature_layers() if m not in dict(unet.named_modules())]
        if unknown:
            raise ValueError(f"{type(self).__name__}: the U-Net has no layer {unknown[0]!r} (its feature layers)")
        self.step = -1

        def count():  # one U-Net call per step; a second generation in the session starts over
            self.step = self.step + 1 if not self.steps else (self.step + 1) % self.steps

        def copy_features(module, args, output):
            rows = self.rows_at(self.feature_window())
            if not bool(rows.any()):
                return None
            return self.inject(output, rows, lambda src, edit: src)

        handles = [unet.get_submodule(m).register_forward_hook(copy_features) for m in self.feature_layers()]
        try:
            with swapped_processors(unet, lambda k, p: Controlled(self, k, p), count):
                yield
        finally:
            for h in handles:
                h.remove()


class Controlled:
    """An attention processor that injects the source rows' attention probabilities into the
    edited rows where its action says, and is the original processor elsewhere."""

    def __init__(self, action: Paired, name: str, original):
        self.action, self.name, self.original = action, name, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cross = encoder_hidden_states is not None
        if not self.action.active(self.name, cross):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
        rows, length, _ = hidden_states.shape if not cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, rows)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if not cross else encoder_hidden_states
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (rows * heads, q, k)
        probs = probs.reshape(rows, attn.heads, *probs.shape[1:])
        rows_now = self.action.rows_at(self.action.window(self.name, cross))
        probs = self.action.inject(probs, rows_now, lambda s, e: self.action.probs(self.name, cross, s, e))
        out = torch.bmm(probs.reshape(-1, *probs.shape[2:]), value)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def token_map(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-to-Prompt's alignment of the target's tokens to the source's (its Refine
    mapper): for each of the tokenizer's ``model_max_length`` target positions, the source
    position it takes its attention map from and whether it has one (1: a token both prompts
    share, matched in order by difflib; 0: a word only the target has, which keeps its own
    map). Padding after the prompts maps position to position."""
    length = tokenizer.model_max_length
    src = tokenizer(source).input_ids
    tgt = tokenizer(target).input_ids
    if len(src) > length or len(tgt) > length:
        raise ValueError(f"prompts longer than the tokenizer's {length} tokens cannot be aligned")
    index = torch.arange(length)
    alpha = torch.ones(length)
    matcher = difflib.SequenceMatcher(a=src, b=tgt, autojunk=False)
    owned = torch.zeros(length, dtype=torch.bool)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            index[block.b + k] = block.a + k
            owned[block.b + k] = True
    for j in range(len(tgt)):
        if not owned[j]:
            index[j], alpha[j] = j, 0.0
    tail = torch.arange(len(tgt), length)  # padding: position to position, after the longer prompt
    index[tail] = torch.clamp(tail - len(tgt) + len(src), max=length - 1)
    return index, alpha


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """The token positions of ``word`` in ``prompt`` (with the start token at 0)."""
    ids = tokenizer(prompt).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    found = [i for i in range(len(ids) - len(piece) + 1) if ids[i : i + len(piece)] == piece]
    if not piece or not found:
        raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}")
    return [i + k for i in found for k in range(len(piece))]
