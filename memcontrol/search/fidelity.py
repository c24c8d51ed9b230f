"""Multi-fidelity search: many candidates screened at a short budget, the promising ones evaluated in full.

A full trial trains a candidate ``train.steps`` steps, then samples and measures it; sampling and the metrics
cost as much as the training or more. With ``search.fidelity.enabled`` every candidate the sampler proposes is
first *screened*: trained ``min_steps`` steps and scored by two proxies that need no sampling at all:

- memorization (``memorization_proxy``): by default the denoising loss on the training images at fixed draws,
  negated (``train_fit``: a candidate that already fits its own training images closely is the one that goes on to
  copy them); or the text-conditional noise norm of the probe prompts (``noise_norm``: training captions, the signal
  early stopping watches). On two studies of the headline preset, 15 candidates each, screened at 100 of 500
  steps, the training fit ranked the full evaluation's memorization at Spearman 0.69 and 0.87, the noise norm at
  0.27 and 0.45 (README: multi-fidelity). Both are recorded on every screen.
- quality: the denoising loss on held-out images (``quality_items`` images at ``quality_draws`` fixed timestep and
  noise draws each, the same draws for every candidate): a model that drifts from the image domain or copies its
  training set predicts the noise of unseen images of that domain worse. It is paired across candidates and
  deterministic. It cannot see what only samples show (README: multi-fidelity: along a ladder of learning rates the
  held-out loss after the warm-up keeps falling where FD after the full run turns worse), so ``quality_proxy:
  sample_fd`` instead samples ``quality_samples`` images of the held-out reports with ``sample_steps`` sampler steps
  and takes their Fréchet distance to the held-out images in the quality objective's features: the full
  evaluation's measure at a fraction of its sampling. Both are recorded when the sampled one is the proxy
  (``screen_heldout_loss``, ``screen_sample_fd``). On a fresh wide ladder it ranked no better than the held-out loss
  after 100 or 200 steps: candidates at high learning rates sample best early and collapse late (README).

Successive halving then promotes, from each bracket of ``bracket`` screened candidates (default ``eta**2``), the best
``ceil(bracket / eta)``: by Pareto rank on the two proxies, then by crowding distance (which keeps the ends of the
front, unlike a scalarisation that favours one region), then by trial number. A promotion is a new trial of the same
study with the same parameters and the user attribute ``promoted_from``; it trains from scratch with the same seed
(the first ``min_steps`` steps repeat the screen's exactly with a constant schedule; keeping the screen's optimizer
state on disk for every candidate would save ``min_steps / steps`` of a promoted run only), and is evaluated in full:
its values are the study's objectives. Screened trials end PRUNED with ``fidelity: screen`` and their proxies as
user attributes, so the Pareto front, which reads COMPLETE trials, holds full-fidelity results only.

The study stays the record: which brackets are complete, which candidates they promote and which promotions exist
are read back from it, so a rerun or a second worker recomputes nothing finished. Two workers may queue one
promotion at the same moment; the later copy is discarded as surplus when it is asked.

TPE learns from this (its model splits COMPLETE and PRUNED trials: screened-out candidates fall in its "worse"
group, promoted ones are ranked by their full values); NSGA-II reads COMPLETE trials only and is refused here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from . import study as st
from .trial import FAILED, SCREENED, Outcome

log = logging.getLogger(__name__)

ATTR_FIDELITY = "fidelity"   # "screen" (short budget, proxies) | "full" (a promotion, evaluated in full)
SCREEN, FULL = "screen", "full"
PROXIES = ("screen_memorization", "screen_quality")


# --- the promotion rule (plain numbers: checked by hand in the tests) ------------------------------------------------

def pareto_ranks(points: dict) -> dict:
    """Non-domination rank of each ``key -> (a, b)`` (both minimised): 0 for the front, 1 for the front of the rest,
    and so on. Equal points share a rank."""
    from .selection import Point, dominates

    ranks, left, rank = {}, {k: Point(k, *p) for k, p in points.items()}, 0
    while left:
        front = [k for k, p in left.items() if not any(dominates(q, p) for q in left.values())]
        for k in front:
            ranks[k] = rank
            del left[k]
        rank += 1
    return ranks


def crowding(points: dict) -> dict:
    """NSGA-II crowding distance of each point within ``points`` (one front): the ends of each objective get
    infinity, the others the sum over objectives of the normalised gap between their neighbours."""
    out = {k: 0.0 for k in points}
    if len(points) <= 2:
        return {k: math.inf for k in points}
    for i in range(2):
        order = sorted(points, key=lambda k: (points[k][i], repr(k)))
        lo, hi = points[order[0]][i], points[order[-1]][i]
        out[order[0]] = out[order[-1]] = math.inf
        if hi == lo:
            continue
        for prev, key, nxt in zip(order, order[1:], order[2:]):
            out[key] += (points[nxt][i] - points[prev][i]) / (hi - lo)
    return out


def promotion_order(points: dict) -> list:
    """Keys best first: Pareto rank, then crowding distance (larger first), then the key (the trial number)."""
    usable = {k: p for k, p in points.items() if all(math.isfinite(v) for v in p)}
    ranks = pareto_ranks(usable)
    dist = {}
    for r in set(ranks.values()):
        dist.update(crowding({k: usable[k] for k in usable if ranks[k] == r}))
    return sorted(usable, key=lambda k: (ranks[k], -dist[k], k))


def promoted(points: dict, eta: int, size: int | None = None) -> list:
    """The keys a bracket promotes: the best ``ceil(size / eta)`` (``size`` defaults to the bracket's members;
    candidates that failed their screen count in it but are never promoted)."""
    n = math.ceil((len(points) if size is None else size) / eta)
    return promotion_order(points)[:n]


# --- the screen: a short training and its cheap scores -------------------------------------------------------------

def screen_train_config(cfg, fidelity: dict):
    """The training settings of a screen: ``min_steps`` steps of the full run's schedule (``truncated``: its first
    steps, so a warm-up longer than the screen is all a screen sees), or the whole schedule shrunk to ``min_steps``
    (``compressed``: warm-up scaled alike, so a cosine schedule has decayed by the screen's last step and the screen
    scores a settled model)."""
    steps = min(cfg.steps, int(fidelity["min_steps"]))
    warmup = round(cfg.warmup * steps / cfg.steps) if fidelity["schedule"] == "compressed" else cfg.warmup
    return cfg.model_copy(update={"steps": steps, "warmup": warmup})


@dataclass
class ScreenData:
    """Held-out latents already noised at fixed draws, their text embeddings and denoising targets."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    target: torch.Tensor
    batch_size: int = 16


def build_screen_data(ctx, dataset) -> ScreenData:
    """``quality_items`` images spread over ``dataset``, each noised at ``quality_draws`` fixed draws."""
    from ..training import cache_training_data
    from ..training.loop import _noise_scheduler, _target
    from .context import spread

    fid = ctx.settings.search["fidelity"]
    items = spread(list(range(len(dataset))), fid["quality_items"])
    cached = cache_training_data(ctx.pipe, _Subset(dataset, items), ctx.settings.data["cache_dir"], progress=False)
    scheduler = _noise_scheduler(ctx.pipe)
    draws = int(fid["quality_draws"])
    latents = cached.latents.float().repeat(draws, 1, 1, 1)
    embeds = cached.text_embeds.repeat(draws, 1, 1)
    # The same draws for every candidate (and every worker): the proxy compares candidates on equal terms.
    gen = torch.Generator().manual_seed(int(ctx.settings.sampling["seed"]))
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    return ScreenData(scheduler.add_noise(latents, noise, timesteps), timesteps, embeds,
                      _target(scheduler, latents, noise, timesteps).float())


class _Subset:
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


@torch.no_grad()
def denoising_loss(unet, data: ScreenData) -> float:
    """Mean squared error of the UNet's prediction on the screen's fixed draws."""
    ref = next(unet.parameters())
    total = 0.0
    for start in range(0, len(data.noisy), data.batch_size):
        sl = slice(start, start + data.batch_size)
        pred = unet(data.noisy[sl].to(ref.device, ref.dtype), data.timesteps[sl].to(ref.device),
                    data.embeds[sl].to(ref.device, ref.dtype)).sample
        total += float(((pred.float().cpu() - data.target[sl]) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / len(data.noisy)


def screen_prompts(prompts: list[str], count: int) -> tuple[list[str], int]:
    """Prompts and samples per prompt for ``count`` screen samples of ``prompts``: spread over them when there are
    enough, every prompt several times otherwise (the surplus of the last round is dropped by the caller)."""
    from .context import spread

    if count <= len(prompts):
        return spread(prompts, count), 1
    return list(prompts), math.ceil(count / len(prompts))


def sample_fd(ctx, unet) -> float:
    """FD between ``quality_samples`` samples of the held-out reports (``sample_steps`` steps, the study's sampler,
    guidance and seed) and the held-out images, in the quality objective's features."""
    from ..metrics.quality import frechet_from_stats, gaussian_stats
    from ..sampling import generate_samples
    from ..training import pipeline_with_unet

    fid, s = ctx.settings.search["fidelity"], ctx.settings.sampling
    count = int(fid["quality_samples"])
    prompts, per_prompt = screen_prompts(ctx.quality_prompts, count)
    images = generate_samples(pipeline_with_unet(ctx.pipe, unet), prompts, n_per_prompt=per_prompt,
                              steps=int(fid["sample_steps"]), seed=int(s["seed"]),
                              guidance_scale=s["guidance_scale"], sampler=s["sampler"])[:count]
    refs = ctx.references
    features = refs.quality_embedder.embed(images).float().cpu()
    mu, sigma = refs.heldout_stats or gaussian_stats(refs.heldout_features)
    return frechet_from_stats(*gaussian_stats(features), mu, sigma)


def screen_scores(ctx, unet, out: Outcome) -> Outcome:
    """The screen's proxies for a UNet trained at the short budget, into ``out`` (status ``screened``)."""
    from .objectives import probe_signal

    t0 = time.perf_counter()
    if ctx.screen_data is None:
        ctx.screen_data = {"heldout": build_screen_data(ctx, ctx.heldout_set),
                           "train": build_screen_data(ctx, ctx.train_set)}
    unet.eval()
    fid = ctx.settings.search["fidelity"]
    noise_norm = probe_signal(ctx.settings, unet, ctx.pipe.scheduler, ctx.probe)
    heldout_loss = denoising_loss(unet, ctx.screen_data["heldout"])
    train_loss = denoising_loss(unet, ctx.screen_data["train"])
    # Every measure is kept; the configured ones are the proxies the promotion rule reads.
    by_proxy = {"train_fit": (-train_loss, "training-image fit"), "noise_norm": (noise_norm, "probe noise norm")}
    memorization, name = by_proxy[fid["memorization_proxy"]]
    out.metrics.update(screen_train_loss=train_loss, screen_noise_norm=noise_norm, screen_heldout_loss=heldout_loss)
    quality, quality_name = heldout_loss, "held-out denoising loss"
    if fid["quality_proxy"] == "sample_fd":
        quality, quality_name = sample_fd(ctx, unet), f"FD of {fid['quality_samples']} samples"
        out.metrics["screen_sample_fd"] = quality
    out.compute["screen_seconds"] = round(time.perf_counter() - t0, 3)
    out.metrics.update(screen_memorization=memorization, screen_quality=quality)
    if not (math.isfinite(memorization) and math.isfinite(quality)):
        out.status, out.reason = FAILED, f"screen proxies are not finite ({memorization}, {quality})"
        return out
    out.status = SCREENED
    out.reason = f"screened at {out.compute['steps']} steps: {name} {memorization:.4g}, {quality_name} {quality:.4g}"
    return out


# --- brackets and promotions, read from the study --------------------------------------------------------------------

def bracket_size(settings) -> int:
    fid = settings.search["fidelity"]
    return int(fid["bracket"] or fid["eta"] ** 2)


def _counts(trial: FrozenTrial) -> bool:
    """A candidate trial that holds a place in a bracket: evaluated, running or queued (an interrupted one gave its
    place to its retry, a surplus one never had one)."""
    if st.is_promotion(trial) or trial.user_attrs.get(st.ATTR_SURPLUS):
        return False
    return st.is_evaluated(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def due_promotions(study: optuna.Study, settings) -> list[FrozenTrial]:
    """The screened trials that decided brackets promote. A bracket is the next ``bracket`` candidate trials in
    number order; it is decided when all its members are evaluated, and the last, smaller one when the budget is
    used and no candidate is left running or queued."""
    # Candidates past the budget (queued by hand, say) will be discarded as surplus when asked.
    trials = [t for t in study.get_trials(deepcopy=False) if _counts(t)][:settings.n_trials]
    size, eta = bracket_size(settings), int(settings.search["fidelity"]["eta"])
    out = []
    for start in range(0, len(trials), size):
        members = trials[start:start + size]
        if not all(st.is_evaluated(t) for t in members):
            break
        if len(members) < size and len(trials) < settings.n_trials:
            break
        scores = {t.number: tuple(float(t.user_attrs[k]) for k in PROXIES) for t in members
                  if t.user_attrs.get(ATTR_FIDELITY) == SCREEN and t.state == TrialState.PRUNED
                  and all(k in t.user_attrs for k in PROXIES)}
        keep = set(promoted(scores, eta, len(members)))
        out += [t for t in members if t.number in keep]
    return out


def _promotions(study: optuna.Study) -> dict[int, list[FrozenTrial]]:
    """Promotion trials that hold (or held) a candidate's place, by the screened trial they re-evaluate."""
    out: dict[int, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if st.is_promotion(t) and not t.user_attrs.get(st.ATTR_SURPLUS) and not st.is_interrupted(t):
            out.setdefault(int(t.user_attrs[st.ATTR_PROMOTED_FROM]), []).append(t)
    return out


def missing_promotions(study: optuna.Study, settings) -> list[FrozenTrial]:
    have = _promotions(study)
    return [t for t in due_promotions(study, settings) if t.number not in have]


def queue_promotions(study: optuna.Study, settings) -> int:
    """Queue the decided promotions that have no trial yet; returns how many."""
    missing = missing_promotions(study, settings)
    for t in missing:
        study.enqueue_trial(dict(t.params), user_attrs={st.ATTR_PROMOTED_FROM: t.number, ATTR_FIDELITY: FULL})
        log.info("trial %d promoted to the full budget", t.number)
    return len(missing)


def work_left(study: optuna.Study, settings) -> bool:
    """Candidates to screen, promotions to queue, or queued ones to run."""
    return (st.budget_used(study) < settings.n_trials or bool(missing_promotions(study, settings))
            or bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))


def duplicate_promotion(study: optuna.Study, trial_number: int, source: int) -> bool:
    """Another trial with a lower number already re-evaluates ``source`` (two workers queued it at once)."""
    return any(t.number < trial_number for t in _promotions(study).get(source, []))


# --- the worker loop ------------------------------------------------------------------------------------------------

def run_fidelity_trials(study: optuna.Study, ctx, space, deadline: float | None) -> int:
    """``worker.run_search_trials`` with screening and promotion: queued promotions are asked first (Optuna hands
    out waiting trials before sampling), so the sampler sees full results as soon as a bracket is decided."""
    from .worker import run_trial, trial_dir

    settings = ctx.settings
    recovery = st.Recovery.from_search(settings.search)
    done = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            log.info("time limit reached; no new trials")
            break
        st.reclaim_stale_trials(study, recovery)
        queue_promotions(study, settings)
        if (st.budget_used(study) >= settings.n_trials
                and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
            # Other workers' trials are still running: wait, to take over any whose worker dies and to promote.
            time.sleep(settings.search["heartbeat_s"])
            continue
        trial = study.ask()
        source = study.get_trials(deepcopy=False)[trial.number].user_attrs.get(st.ATTR_PROMOTED_FROM)
        if source is None and st.claimed_before(study, trial.number) >= settings.n_trials:
            st.discard_surplus(study, trial, "the budget was used by other workers")
            continue
        if source is not None and duplicate_promotion(study, trial.number, int(source)):
            st.discard_surplus(study, trial, f"trial {source} was promoted by another worker as well")
            continue
        st.reseed_for_trial(study.sampler, settings.search["seed"], trial.number)
        candidate = space.sample(trial)
        if source is None:
            trial.set_user_attr(ATTR_FIDELITY, SCREEN)
        run_trial(study, trial, ctx, candidate, trial_dir(settings.out_dir, trial.number), early_stop=True,
                  keep_adapter=source is not None, screen=source is None)
        done += 1
    return done
