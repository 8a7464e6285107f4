"""SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic
differential equations", sec. 3; the reading note's sec. I): a source image noised to the
timestep t0 of the schedule, x(t0) = sqrt(alpha_t0) x_source + sqrt(1 - alpha_t0) z, then
denoised from there; z is the sample's own first draw (its x_T), so a replay is exact.

The strength t0 is the fraction of the schedule run again (k = steps - round(t0 * steps) is the
first step run): near 0 the source comes back almost untouched, at 1 it is pure noise. A
text-conditioned model denoises with its prompt, so a target prompt edits the source toward
it. Per-sample strengths share one batch: every sample steps from the earliest start and is
put back to its noised source at its own start step (the steps before it only cost time;
``hcore.sampler.sample`` skips the steps before the earliest start, a plain pipeline runs them)."""

from __future__ import annotations

import torch

from hspace.hcore.edits import Action, EditMethod, register


class Restart(Action):
    """Sample b restarts at step k_b from its source noised with its own x_T."""

    def __init__(self, source: torch.Tensor, scheduler, t0):
        self.source, self.scheduler, self.t0 = source, scheduler, t0
        self.starts: list[int] = []
        self.alphas: list[torch.Tensor] = []
        self.z: torch.Tensor | None = None

    def check(self, steps: int, guided: bool) -> None:
        from hspace.hcore.sampler import ddim_scheduler

        t0 = torch.as_tensor(self.t0, dtype=torch.float64).reshape(-1)
        if not bool(((t0 > 0) & (t0 <= 1)).all()):
            raise ValueError(f"sdedit's strength t0 must be in (0, 1] (the share of the steps run), got {t0.tolist()}")
        sched = ddim_scheduler(self.scheduler)
        sched.set_timesteps(steps)
        self.starts = [steps - round(float(t) * steps) for t in t0]
        if any(k >= steps for k in self.starts):
            raise ValueError(f"sdedit's strength t0 {t0.min().item():g} runs no step of {steps}: give t0 >= 1/{steps}")
        self.alphas = [sched.alphas_cumprod[int(sched.timesteps[k])] for k in self.starts]

    @property
    def first_step(self) -> int:
        return min(self.starts) if self.starts else 0

    def start(self, x: torch.Tensor) -> torch.Tensor:
        self.z = x.detach().clone()  # each sample's own first draw: the noise of its restart
        return self.x_t(0, x)

    def x_t(self, step: int, x: torch.Tensor) -> torch.Tensor:
        rows = [b for b in range(len(x)) if self._start(b) == step]
        if not rows:
            return x
        x = x.clone()
        for b in rows:
            alpha = self._alpha(b)
            source = self.source[b if len(self.source) > 1 else 0].to(x.device, torch.float32)
            x[b] = (alpha.sqrt() * source.cpu() + (1 - alpha).sqrt() * self.z[b].cpu().float()).to(x.device, x.dtype)
        return x

    def _start(self, b: int) -> int:
        return self.starts[b if len(self.starts) > 1 else 0]

    def _alpha(self, b: int) -> torch.Tensor:
        return self.alphas[b if len(self.alphas) > 1 else 0]


@register
class SDEdit(EditMethod):
    """source: (1 or B, C, R, R) in the sampler's space (a pixel model's image in [-1, 1], a
    latent model's VAE latent); scheduler: the model's (its alphas)."""

    name = "sdedit"
    needs = ("source",)
    strength = "t0"
    unit = "the share of the schedule run again from the noised source (0 < t0 <= 1)"
    acts_on = "x_t"
    strength_start, strength_max = 0.25, 1.0
    reference = "Meng et al. 2022 (SDEdit), sec. 3: x(t0) = sqrt(alpha_t0) x + sqrt(1 - alpha_t0) z, then denoise"

    @classmethod
    def strength_problem(cls, value: float) -> str | None:
        return (
            None
            if 0 < value <= 1
            else f"sdedit's strength t0 must be in (0, 1] (the share of the steps run), got {value:g}"
        )

    def __init__(self, source: torch.Tensor, scheduler):
        self.source, self.scheduler = source, scheduler

    def action(self, strength):
        return Restart(self.source, self.scheduler, strength)
