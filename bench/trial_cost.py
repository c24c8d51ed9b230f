"""Wall time per search trial: memcontrol's loop against a reference-style loop, same trials, one run.

    python bench/trial_cost.py                  # bundled tiny base model and synthetic hospital; a few minutes
    python bench/trial_cost.py --trials 8 --steps 100

Both loops evaluate the same candidates of the reference space (the same masks, learning rates and seeds):

- ours: the model loaded once and kept in memory (each trial trains a copy of the UNet with its adapter), latents and
  text embeddings cached once, few-step sampling (``--sample-steps``, DDIM), and early stopping on the
  text-conditional noise norm (a stopped trial costs no sampling or metrics);
- reference style (as the published code works): the pipeline reloaded from disk for every trial, every batch
  encoded by the VAE and the text encoder at every step, 50-step sampling, no early stopping.

It prints the time of each loop (ours includes its one-off set-up), the ratio, and both loops' metrics per trial,
with the rank agreement of the completed trials (Spearman) and which candidate each would choose. Results also go to
``--out``/trial_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memcontrol.models import load_pipeline  # noqa: E402
from memcontrol.data import load_source  # noqa: E402
from memcontrol.search.context import build_context  # noqa: E402
from memcontrol.search.objectives import measure, sample  # noqa: E402
from memcontrol.search.selection import Point, select  # noqa: E402
from memcontrol.search.settings import load_settings  # noqa: E402
from memcontrol.search.space import Candidate  # noqa: E402
from memcontrol.search.trial import evaluate_candidate, to_mask  # noqa: E402
from memcontrol.training import TrainConfig, finetune, pipeline_with_unet  # noqa: E402
from train_step import EncodeEveryStep  # noqa: E402

BASE_MODEL = ROOT / "data" / "base_model"
HOSPITAL = ROOT / "data" / "hospital"


def candidates(unet, n: int) -> list[Candidate]:
    """Fixed candidates of the reference space, cycling through four kinds: LoRA on a random half of the attention
    blocks at two learning rates, full fine-tuning at a rate that memorizes fast (the one early stopping should
    catch), and LoRA on every attention block."""
    from memcontrol.masks import enumerate_sites

    sites = enumerate_sites(unet, "block")
    attention = [s.name for s in sites if s.kind == "attention"]
    lora = {"rank": 4, "alpha": 4}
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        half = [s for s, keep in zip(attention, torch.rand(len(attention), generator=gen) < 0.5) if keep]
        half = half or attention[:1]
        out.append([Candidate(half, "block", "lora", lora, {"lr": 1e-4}),
                    Candidate(half, "block", "lora", lora, {"lr": 3e-4}),
                    Candidate([s.name for s in sites], "block", "unfreeze", {}, {"lr": 1e-3}),
                    Candidate(attention, "block", "lora", lora, {"lr": 1e-3})][i % 4])
    return out


def config(args, sample_steps: int) -> dict:
    return {
        "model": {"path": str(BASE_MODEL), "device": args.device},
        "data": {"train": {"source": str(HOSPITAL / "private" / "manifest.csv")},
                 "heldout": {"source": str(HOSPITAL / "heldout" / "manifest.csv")}, "resolution": 64},
        "train": {"steps": args.steps, "batch_size": 8, "lr": 1e-4, "caption_dropout": 0.1, "seed": 0},
        "objectives": {"memorization": {"metric": "mean_similarity", "features": {"type": "pixels", "size": 32}},
                       "quality": {"metric": "fd", "features": {"type": "vae"}}},
        "sampling": {"prompts": args.prompts, "quality_prompts": args.prompts, "per_prompt": 1, "steps": sample_steps,
                     "sampler": "dpm", "guidance_scale": 3.0},
        "early_stop": {"enabled": True, "every": max(1, args.steps // 6), "probe_prompts": 4,
                       "max_ratio": args.max_ratio},
        "search": {"n_trials": args.trials},
        "baselines": {"enabled": False},
    }


def ours(settings, cands, work: Path) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    ctx = build_context(settings, settings.model["device"], progress=False)
    rows = []
    for i, cand in enumerate(cands):
        outcome = evaluate_candidate(ctx, cand, work / "ours" / str(i), early_stop=True, keep_adapter=False)
        rows.append({"status": outcome.status, "steps": outcome.compute.get("steps"),
                     "memorization": outcome.metrics.get("memorization"), "quality": outcome.metrics.get("quality"),
                     "seconds": outcome.compute["total_seconds"]})
    return time.perf_counter() - start, rows


def reference_style(settings, cands, refs, quality_prompts) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = []
    for cand in cands:
        t0 = time.perf_counter()
        pipe = load_pipeline(settings.model["path"], device=settings.model["device"])
        train = load_source(settings.data["train"], settings.data["resolution"])
        cfg = TrainConfig.from_dict({**settings.train, **cand.train})
        result = finetune(pipe, to_mask(cand), EncodeEveryStep(pipe, train), cfg, progress=False)
        row = {"status": result.status, "steps": result.steps}
        if result.status == "ok":
            tuned = pipeline_with_unet(pipe, result.applied.unet)
            samples = sample(settings, tuned, _prompts(train, settings))
            metrics, _, _ = measure(settings, refs, samples, sample(settings, tuned, quality_prompts))
            row.update(memorization=metrics["memorization"], quality=metrics["quality"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return time.perf_counter() - start, rows


def _prompts(train, settings) -> list[str]:
    from memcontrol.search.context import spread

    return spread(list(dict.fromkeys(train.captions)), settings.sampling["prompts"])


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def chosen(rows: list[dict]) -> int | None:
    points = [Point(i, r["memorization"], r["quality"])
              for i, r in enumerate(rows) if r.get("memorization") is not None]
    sel = select(points, "margin", margin=0.1)
    return None if sel is None else sel.chosen.key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial")
    parser.add_argument("--prompts", type=int, default=16,
                        help="memorization and quality samples per trial (one per training, one per held-out caption)")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampling steps of our loop")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="early stop: probe noise norm / base model's")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_trial_cost"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (BASE_MODEL / "model_index.json").is_file():
        sys.exit(f"the bundled base model is missing: {BASE_MODEL / 'model_index.json'}")
    with tempfile.TemporaryDirectory(prefix="memcontrol-bench-") as tmp:
        tmp = Path(tmp)
        settings = load_settings(config(args, args.sample_steps), tmp / "ours")
        cands = candidates(load_pipeline(BASE_MODEL).unet, args.trials)
        ours_s, ours_rows = ours(settings, cands, tmp)
        ref_settings = load_settings(config(args, 50), tmp / "ref")
        # The metrics' reference features are the same for both loops; computing them is not timed.
        ref_ctx = build_context(ref_settings, args.device, progress=False)
        ref_s, ref_rows = reference_style(ref_settings, cands, ref_ctx.references, ref_ctx.quality_prompts)

    both = [i for i, (a, b) in enumerate(zip(ours_rows, ref_rows)) if a["status"] == b["status"] == "ok"]
    report = {
        "device": args.device, "trials": args.trials, "steps": args.steps, "samples": args.prompts,
        "ours": {"seconds": ours_s, "per_trial": ours_s / args.trials, "sample_steps": args.sample_steps,
                 "rows": ours_rows},
        "reference_style": {"seconds": ref_s, "per_trial": ref_s / args.trials, "sample_steps": 50, "rows": ref_rows},
        "speedup": ref_s / ours_s,
        "rank_agreement_memorization": spearman([ours_rows[i]["memorization"] for i in both],
                                                [ref_rows[i]["memorization"] for i in both]),
        "rank_agreement_quality": spearman([ours_rows[i]["quality"] for i in both],
                                           [ref_rows[i]["quality"] for i in both]),
        "chosen": {"ours": chosen(ours_rows), "reference_style": chosen(ref_rows)},
    }
    (out / "trial_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'trial':>5} | {'ours: status steps mem quality s':<44} | reference style: status steps mem quality s")
    for i, (a, b) in enumerate(zip(ours_rows, ref_rows)):
        def cell(r):
            mem = f"{r['memorization']:.4f}" if r.get("memorization") is not None else "-"
            qual = f"{r['quality']:.4f}" if r.get("quality") is not None else "-"
            return f"{r['status']:<7} {r['steps']:>4} {mem:>7} {qual:>9} {r['seconds']:6.1f}"
        print(f"{i:>5} | {cell(a):<44} | {cell(b)}")
    print(f"ours: {ours_s:.1f} s for {args.trials} trials ({ours_s / args.trials:.1f} s/trial, set-up included); "
          f"reference style: {ref_s:.1f} s ({ref_s / args.trials:.1f} s/trial); speed-up x{report['speedup']:.1f}")
    print(f"rank agreement over trials both completed (Spearman): memorization "
          f"{report['rank_agreement_memorization']}, quality {report['rank_agreement_quality']}; chosen: "
          f"ours {report['chosen']['ours']}, reference style {report['chosen']['reference_style']}")
    print(f"written: {out / 'trial_cost.json'}")


if __name__ == "__main__":
    main()
