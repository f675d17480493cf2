"""A cohort trial's checkpoint (issue 27): the whole fused cohort in COHORT_FILE, its best member as an ordinary
checkpoint beside it.

COHORT_FILE holds what resuming the cohort needs: every member's config as it was built (the fused layout is
rebuilt from those, then cut to the members still training), the fused weights, buffers and per-member Adam
state, each member's generator state, history and stop reason. checkpoint.FILE, in the same folder, is the best
member at that epoch in the ordinary format, so everything that reads a trial's generator (the finalists, the
logged MLflow model, `sample`) reads a cohort's without knowing about cohorts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gan_tune.training import checkpoint
from gan_tune.training.cohort import Cohort, MemberAdam, make_cohort, member_models, remove_members
from gan_tune.training.config import from_dict
from gan_tune.training.data import DataError
from gan_tune.training.step import Gan, make_gan

COHORT_FILE = "cohort.pt"
ADAM_TENSORS = ("lr", "beta1", "beta2", "step")


def member_gan(cohort: Cohort, k: int) -> Gan:
    """Member k as an ordinary Gan of its own config (its weights, average and warm-up, augmentation p; fresh
    optimisers): what scores, samples and exports it through the same code as a trial."""
    gan = make_gan(cohort.cfgs[k], cohort.device)
    g, d, g_ema = member_models(cohort, k)
    gan.g.load_state_dict(g.state_dict())
    gan.d.load_state_dict(d.state_dict())
    if gan.g_ema is not None and g_ema is not None:
        gan.g_ema.load_state_dict(g_ema.state_dict())
        gan.g_ema_updates.fill_(float(cohort.g_ema_updates[k]))
    if gan.augment_p is not None and cohort.augment_p is not None:
        gan.augment_p.fill_(float(cohort.augment_p[k]))
    return gan


def adam_state(opt: MemberAdam) -> dict:
    return {**{name: getattr(opt, name) for name in ADAM_TENSORS}, "exp_avg": opt.exp_avg,
            "exp_avg_sq": opt.exp_avg_sq}


def load_adam(opt: MemberAdam, saved: dict) -> None:
    for name in ADAM_TENSORS:
        getattr(opt, name).copy_(saved[name])
    for mine, theirs in zip(opt.exp_avg + opt.exp_avg_sq, saved["exp_avg"] + saved["exp_avg_sq"]):
        mine.copy_(theirs)


def cohort_state(cohort: Cohort, built: list[dict], kept: list[int], epoch: int,
                 generators: list[torch.Generator], members: dict) -> dict:
    """Everything a resumed cohort needs. `built`: every member's config dict as make_cohort got it; `kept`:
    the indices into `built` of the members in `cohort` now; `members`: per-member bookkeeping (ids,
    histories, stop reasons; the trainable's own, saved as it is)."""
    optional = {name: getattr(cohort, name) for name in ("g_ema_updates", "augment_p", "r1_gamma")
                if getattr(cohort, name) is not None}
    return {
        "built": built, "kept": kept, "configs": [cfg.to_dict() for cfg in cohort.cfgs], "epoch": epoch,
        "g": cohort.g.state_dict(), "d": cohort.d.state_dict(),
        "g_ema": None if cohort.g_ema is None else cohort.g_ema.state_dict(),
        "opt_g": adam_state(cohort.opt_g), "opt_d": adam_state(cohort.opt_d), "alive": cohort.alive, **optional,
        "generator_states": [gen.get_state() for gen in generators], "torch_rng_state": torch.get_rng_state(),
        "members": members,
    }


def write(saved: dict, folder: str | Path) -> Path:
    return checkpoint.write(saved, folder, COHORT_FILE)  # atomic, as a trial's


def read(folder: str | Path, device: torch.device) -> dict:
    path = Path(folder) / COHORT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such cohort checkpoint file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or foreign bytes: torch.load and the unpickler raise many kinds
        raise DataError(f"{path}: unreadable cohort checkpoint ({type(err).__name__})") from None


def restore(saved: dict, device: torch.device) -> tuple[Cohort, list[torch.Generator]]:
    """The cohort as saved: rebuilt from the configs it was built with, cut to the kept members, state loaded;
    members keep their current configs (PBT's explore may have changed their rates)."""
    built = [from_dict(values, where="cohort checkpoint") for values in saved["built"]]
    cohort = make_cohort(built, device)
    remove_members(cohort, saved["kept"])
    cohort.cfgs = [from_dict(values, where="cohort checkpoint") for values in saved["configs"]]
    cohort.g.load_state_dict(saved["g"])
    cohort.d.load_state_dict(saved["d"])
    if cohort.g_ema is not None:
        cohort.g_ema.load_state_dict(saved["g_ema"])
    load_adam(cohort.opt_g, saved["opt_g"])
    load_adam(cohort.opt_d, saved["opt_d"])
    cohort.alive.copy_(saved["alive"])
    for name in ("g_ema_updates", "augment_p", "r1_gamma"):
        if getattr(cohort, name) is not None:
            getattr(cohort, name).copy_(saved[name])
    generators = []
    for cfg, state in zip(cohort.cfgs, saved["generator_states"]):
        generators.append(torch.Generator(device=device).manual_seed(cfg.seed))
        generators[-1].set_state(state)
    torch.set_rng_state(saved["torch_rng_state"])
    return cohort, generators


def write_best_member(gan: Gan, epoch: int, noise: torch.Tensor, generator: torch.Generator,
                      history: list[dict], member: str, folder: str | Path) -> None:
    """checkpoint.FILE of the best member, trial_id naming the member: what finalists and sample load."""
    checkpoint.write(checkpoint.state(gan, epoch, noise, generator, history, member), folder)
