"""Cohort trials (issue 27): K configurations that differ only in settings that fuse, trained as one fused
model on one device (training.fused), so a GPU that takes turns between processes trains K settings at once.

What fuses (FUSED_FIELDS) lives on the device as one value per member: the Adam rates and betas, the G weight
average's decay, R1's gamma, the label smoothing; the seed (each member starts from make_gan's weights for its
own config and draws its noise from its own generator) and latent_dim (noise zero-padded to the largest).
Everything else (model family, width, batch size, loss, d_norm, n_disc, precision, augment, the data and the
run's schedule) must be equal: `group` sorts configs into cohorts, `check_fusable` names what differs.

A member whose loss turns non-finite or explodes is stopped by its 0/1 entry in `Cohort.alive`, on the device;
`remove_members` slices the stopped ones out between epochs, `copy_member` copies one member over another
(weights, Adam moments, statistics) for PBT. The step itself is training.cohort_step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor, nn

from gan_tune.training import fused
from gan_tune.training.config import ConfigError, TrainConfig
from gan_tune.training.models import build_models
from gan_tune.training.step import initial_augment_p, make_gan

FUSED_FIELDS = ("lr_d", "lr_g", "beta1", "beta2", "g_ema", "r1_gamma", "label_smoothing", "seed", "latent_dim")
MEMBER_ONLY = ("name",)  # a member's label: never part of what must be equal
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which every ordinary trial uses
# A cohort trial's Tune config: the shared settings, plus MEMBERS_KEY: a list of each member's own values (the
# fused settings the searcher drew for it). Its files go to MEMBERS_KEY/<member id>/ in the trial folder, and
# its report carries MEMBERS_KEY: {member id: that member's report, with its stop_reason}.
MEMBERS_KEY = "members"


def is_cohort_config(config: dict) -> bool:
    return MEMBERS_KEY in config


def member_id(trial_id: str, k: int) -> str:
    """Member k of trial `trial_id`, as its MLflow run, files and the summary name it."""
    return f"{trial_id}-m{k}"


def member_configs(config: dict) -> list[dict]:
    """Each member's whole config: the trial's shared settings with the member's own values over them."""
    shared = {key: value for key, value in config.items() if key != MEMBERS_KEY}
    return [{**shared, **own} for own in config[MEMBERS_KEY]]


def config_of(config: dict, member: str | None) -> dict:
    """The config a report was trained with: a cohort trial's member's (named by member_id), else the trial's."""
    if not is_cohort_config(config) or not member:
        return config
    return member_configs(config)[int(member.rsplit("-m", 1)[1])]


def cohort_key(cfg: TrainConfig) -> tuple:
    """The settings every member of a cohort shares: all fields but FUSED_FIELDS and MEMBER_ONLY."""
    return tuple((f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in FUSED_FIELDS + MEMBER_ONLY)


def check_fusable(cfgs: list[TrainConfig]) -> None:
    """Raises ConfigError naming the first field the members differ in that does not fuse."""
    if not cfgs:
        raise ConfigError("cohort", "has no members")
    keys = [dict(cohort_key(cfg)) for cfg in cfgs]
    for name in keys[0]:
        values = sorted({repr(key[name]) for key in keys})
        if len(values) > 1:
            raise ConfigError(name, f"members differ ({', '.join(values)}); within a cohort only "
                                    f"{', '.join(FUSED_FIELDS)} may differ")


def group(cfgs: list[TrainConfig], max_members: int = 0) -> list[list[TrainConfig]]:
    """The configs sorted into cohorts by cohort_key, in first-seen order, each of at most max_members
    (0: no limit)."""
    by_key: dict[tuple, list[TrainConfig]] = {}
    for cfg in cfgs:
        by_key.setdefault(cohort_key(cfg), []).append(cfg)
    size = max_members or max(len(cfgs), 1)
    return [members[i:i + size] for members in by_key.values() for i in range(0, len(members), size)]


def member_tensor(values: list[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.get_default_dtype(), device=device)  # the weights' dtype


@dataclass
class MemberAdam:
    """Adam (Kingma & Ba 2015, torch.optim.Adam's arithmetic) for parameters whose first dimension is the member,
    with each member's lr and betas as (K,) device tensors; an update skips the members `alive` marks 0.
    Plain tensor ops over the stacked parameters: no host read, so a CUDA graph can capture it."""

    params: list[nn.Parameter]
    lr: Tensor  # (K,)
    beta1: Tensor
    beta2: Tensor
    step: Tensor  # (K,) updates done, as Adam's bias correction counts them
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]

    @classmethod
    def create(cls, params: list[nn.Parameter], lr: list[float], beta1: list[float], beta2: list[float]) -> MemberAdam:
        device = params[0].device
        return cls(params, member_tensor(lr, device), member_tensor(beta1, device), member_tensor(beta2, device),
                   torch.zeros(len(lr), device=device), [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params])

    def zero_grad(self, set_to_none: bool = True) -> None:  # torch.optim's signature: GraphStep calls it so
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def update(self, alive: Tensor) -> None:
        live = alive > 0
        self.step.copy_(torch.where(live, self.step + 1, self.step))
        step_size = self.lr / (1 - self.beta1 ** self.step)  # a stopped member's may be inf: never selected
        bias_correction2_sqrt = (1 - self.beta2 ** self.step).sqrt()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)  # one value per member, broadcast over its weights
            keep = live.view(shape)
            m_new = torch.lerp(m, p.grad, (1 - self.beta1).view(shape))
            v_new = v * self.beta2.view(shape) + (1 - self.beta2).view(shape) * p.grad * p.grad
            denom = v_new.sqrt() / bias_correction2_sqrt.view(shape) + ADAM_EPS
            # where, not a multiply by the mask: a stopped member's NaN gradient times 0 is still NaN
            p.copy_(torch.where(keep, p - step_size.view(shape) * m_new / denom, p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))


@dataclass
class Cohort:
    """K members trained as one fused G and D; every per-member tensor has the member on its first dimension."""

    cfgs: list[TrainConfig]
    g: nn.Sequential
    d: nn.Sequential
    opt_g: MemberAdam
    opt_d: MemberAdam
    device: torch.device
    alive: Tensor  # (K,) 1.0: training, 0.0: stopped (its loss turned non-finite or exploded)
    r1_gamma: Tensor | None  # (K,), None when no member has R1 on
    noise_dim: int  # the fused G's input size: the largest latent_dim when built (removing members keeps it)
    g_ema: nn.Sequential | None = None  # the averaged G when any member has g_ema > 0 (0: the average is G itself)
    g_ema_decay: Tensor | None = None  # (K,)
    g_ema_updates: Tensor | None = None  # (K,) updates each member's average has had (its warm-up)
    augment_p: Tensor | None = None  # (K,) each member's augmentation probability (None: always, or no augment)
    step: Callable[[Tensor], None] | None = None  # one iteration on (K, n_disc, B) indices; built by the first epoch
    sums: Tensor | None = None  # (N_STATS, K) the step's statistics, summed on the device over an epoch
    step_mode: str = "eager"
    iteration: int = 0  # the running iteration's index in its epoch (lazy R1 picks its iterations by it)
    step_inputs: tuple = ()  # the images and generators the step was built on: others build it again

    @property
    def cfg(self) -> TrainConfig:
        """The settings all members share (cohort_key); a member's own are in cfgs."""
        return self.cfgs[0]

    @property
    def members(self) -> int:
        return len(self.cfgs)


def make_cohort(cfgs: list[TrainConfig], device: torch.device) -> Cohort:
    """The fused cohort of `cfgs`: member k starts from exactly the weights make_gan(cfgs[k]) gives a trial."""
    check_fusable(cfgs)
    gans = [make_gan(cfg, device) for cfg in cfgs]
    g, d = fused.fuse([gan.g for gan in gans]), fused.fuse([gan.d for gan in gans])
    opt_g = MemberAdam.create(list(g.parameters()), [c.lr_g for c in cfgs], [c.beta1 for c in cfgs],
                              [c.beta2 for c in cfgs])
    opt_d = MemberAdam.create(list(d.parameters()), [c.lr_d for c in cfgs], [c.beta1 for c in cfgs],
                              [c.beta2 for c in cfgs])
    averaging = any(cfg.g_ema for cfg in cfgs)
    p = initial_augment_p(cfgs[0], device)
    return Cohort(
        list(cfgs), g, d, opt_g, opt_d, device, alive=torch.ones(len(cfgs), device=device),
        r1_gamma=member_tensor([c.r1_gamma for c in cfgs], device) if any(c.r1_gamma for c in cfgs) else None,
        noise_dim=max(c.latent_dim for c in cfgs),
        g_ema=copy.deepcopy(g).eval().requires_grad_(False) if averaging else None,
        g_ema_decay=member_tensor([c.g_ema for c in cfgs], device) if averaging else None,
        g_ema_updates=torch.zeros(len(cfgs), device=device) if averaging else None,
        augment_p=None if p is None else p.repeat(len(cfgs)))


def member_models(cohort: Cohort, k: int) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """Member k as ordinary (G, D, averaged G or None) modules of its own config, e.g. to score or export it."""
    cfg = cohort.cfgs[k]
    g, d = (m.to(cohort.device) for m in build_models(cfg))
    g.load_state_dict(fused.member_state(cohort.g, k, g))
    d.load_state_dict(fused.member_state(cohort.d, k, d))
    g_ema = None
    if cohort.g_ema is not None and cfg.g_ema:
        g_ema = copy.deepcopy(g).eval().requires_grad_(False)
        g_ema.load_state_dict(fused.member_state(cohort.g_ema, k, g_ema))
    return g.train(cohort.g.training), d.train(cohort.d.training), g_ema


def member_tensors(cohort: Cohort) -> list[Tensor]:
    """Every tensor of member state with one row per member: weights, buffers, Adam state, counters, alive (not
    the settings: lr, betas, decay, R1 gamma)."""
    modules = [m for m in (cohort.g, cohort.d, cohort.g_ema) if m is not None]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    for opt in (cohort.opt_g, cohort.opt_d):
        tensors += [opt.step, *opt.exp_avg, *opt.exp_avg_sq]
    optional = (cohort.g_ema_updates, cohort.augment_p)
    return tensors + [cohort.alive] + [t for t in optional if t is not None]


@torch.no_grad()
def copy_member(cohort: Cohort, src: int, dst: int) -> None:
    """Member `src`'s state over member `dst`'s, on the device (PBT's exploit): weights, BatchNorm and
    spectral-norm buffers, the average, Adam's moments and step count, alive. `dst` keeps its own settings
    (lr, betas, decay, R1 gamma, label smoothing, seed), which PBT's explore then changes."""
    sizes = {cohort.cfgs[k].latent_dim for k in (src, dst)}
    if len(sizes) > 1:  # the copy would train on noise of a size its weights were not made for
        raise ValueError(f"members {src} and {dst} differ in latent_dim ({', '.join(map(str, sorted(sizes)))})")
    for t in member_tensors(cohort):
        t[dst].copy_(t[src])


def remove_members(cohort: Cohort, keep: list[int]) -> None:
    """Only the members at `keep` stay, in place: every stacked tensor sliced to them (call between steps)."""
    index = torch.tensor(keep, dtype=torch.long, device=cohort.device)
    for module in (m for m in (cohort.g, cohort.d, cohort.g_ema) if m is not None):
        for layer in module:
            if hasattr(layer, "members"):
                layer.members = len(keep)
            for name, param in list(layer.named_parameters(recurse=False)):
                setattr(layer, name, nn.Parameter(param.detach()[index], requires_grad=param.requires_grad))
            for name, buffer in list(layer.named_buffers(recurse=False)):
                setattr(layer, name, buffer[index])
    for attr, module in (("opt_g", cohort.g), ("opt_d", cohort.d)):
        old = getattr(cohort, attr)
        setattr(cohort, attr, MemberAdam(list(module.parameters()), old.lr[index], old.beta1[index],
                                         old.beta2[index], old.step[index], [m[index] for m in old.exp_avg],
                                         [v[index] for v in old.exp_avg_sq]))
    cohort.cfgs = [cohort.cfgs[k] for k in keep]
    cohort.alive = cohort.alive[index]
    cohort.step = cohort.sums = None  # the step (a CUDA graph, too) was built for the old shapes
    for attr in ("r1_gamma", "g_ema_decay", "g_ema_updates", "augment_p"):
        if getattr(cohort, attr) is not None:
            setattr(cohort, attr, getattr(cohort, attr)[index])
