"""Could another decision rule make the copy detector meet its targets? Five looks at finished studies' samples.

    python bench/detector_rules.py --study runs/ladder configs/ladder.yaml --study runs/ladder-seed1 ladder-seed1.yaml

Every figure is against the identity truth of ``bench/quickstart.py`` (nearest image in pixels among the private
patients and ``--others`` further patients of the private site, all through the model's VAE), pooled over every
evaluated run of each study and over the studies, with Wilson 95% intervals.

1. **tau's own noise.** The config's tau is the similarity that 1% of 1,000 held-out private-site patients exceed.
   The same calibration on ``--tau-sets`` disjoint sets of 1,000 (held-out patients from 0 on) shows how far it moves.
2. **Score normalization** (as SSCD's copy-detection descriptor does: a sample that resembles many people is not a
   copy of one): score = nearest private similarity - ``--beta`` x similarity to the ``--k``-th nearest image of a
   background set, its threshold calibrated like tau at 1% of ``--calibration`` patients. The sets follow the
   truth's others, as in ``bench/detector.py``: by default others 0 to 3,999, calibration 4,000 to 4,999, background
   6,000 to 6,999 (apart from every other set here and from that bench's planted patients). Settings fixed before
   the first run (beta 1, k 1, 1,000 background patients); beside the config's rule on the same samples.
3. **Every threshold** on the search-time similarities: the best precision any threshold reaches while recall stays
   >= 0.90, and the best recall while precision stays >= 0.95 (the issue's targets). A diagnostic: a threshold
   chosen after looking is no result; it says whether the detector's ranking of samples could meet both at all.
4. **Are the wrong detections partial copies?** For each detection the truth calls wrong, the detected patient's rank
   by pixel L2 among all the truth's patients (1: the truth would have agreed; a sample copying nobody ranks a given
   patient about uniformly, so within the nearest 40 of 4,008 by chance 1% of the time), against a control: the
   untuned base model's samples of the same study, the ranks of the same patients. Decision fixed before the run:
   partial copies if the wrong detections' median rank is <= 40 and the control's > 400; the detector's error if
   the wrong detections' median rank is > 400; otherwise not settled.
5. **A near-miss truth.** A sample copies every private patient among its ``--near`` (5) nearest patients in pixels;
   a detection is right when it names one of them. ``--near`` 5 comes from chance alone: for a sample that copies
   nobody the patients are exchangeable, so some of 8 private patients lands among the nearest 5 of 4,008 about
   8 x 5 / 4,008 = 1.0% of the time, the rate tau is calibrated to; checked on ``--chance`` (1,000) further real
   patients of the site (the set after the background), which it should call copies about that often. The
   configs' rule is scored against it beside the pixel truth, per study and pooled.
6. **Another copy detector** (``--candidate DIR``, repeatable: a metric-net folder, e.g. one that
   ``pipelines/train_metric_nets.py`` retrained; ``DIR,DIR,...`` an ensemble whose similarity is the mean of its
   members' cosine similarities). Each candidate and the configs' detector get their own tau at the
   same false-positive rate on the same ``--calibration`` patients, then detect on the same samples; scored against
   both truths with Wilson 95% intervals, and against the configs' detector by paired bootstrap over the pooled samples
   (the difference in precision and recall; Bonferroni over the candidates; runs are not resampled as clusters).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASE_ROW = "base model, not fine-tuned"  # the study row of the untuned model: the control of the pixel ranks
NEAR_RANK = 40  # "close in pixels": among the nearest 1% of the 4,008 patients a sample is compared with
PLANTED_GAP = 1000  # held-out patients left between calibration and background: bench/detector.py's planted set


class Ensemble:
    """Several embedders as one: each member's features L2-normalised, concatenated and scaled by 1/sqrt(members),
    so that the cosine similarity of two images is the mean of the members' cosine similarities."""

    def __init__(self, members: list):
        self.members = members

    def embed(self, images):
        import torch
        import torch.nn.functional as F

        parts = [F.normalize(m.embed(images).float(), dim=1) for m in self.members]
        return torch.cat(parts, 1) / len(parts) ** 0.5


def normalized_scores(sims_private, sims_background, beta: float, k: int) -> np.ndarray:
    """Nearest private similarity minus ``beta`` times the k-th largest background similarity, per row
    (``sims_background``: N x B similarities of each sample to the background set)."""
    kth = np.sort(np.asarray(sims_background, dtype=np.float64), axis=1)[:, -k]
    return np.asarray(sims_private, dtype=np.float64) - beta * kth


def patient_ranks(samples, private, keys: list[str], others) -> np.ndarray:
    """For each sample (row) and private patient (column, in sorted key order), that patient's rank by pixel L2
    among every patient: 1 + the number of patients strictly nearer, each private patient by its nearest record,
    each of ``others`` by its image. A sample copying nobody ranks a given patient about uniformly."""
    import torch

    flat = samples.flatten(1).double()
    to_private = torch.cdist(flat, private.flatten(1).double())
    to_others = torch.cdist(flat, others.flatten(1).double())
    patients = sorted(set(keys))
    by_patient = torch.stack([to_private[:, [i for i, k in enumerate(keys) if k == p]].min(1).values
                              for p in patients], 1)
    nearer_private = (by_patient[:, None, :] < by_patient[:, :, None]).sum(2)
    nearer_others = (to_others[:, None, :] < by_patient[:, :, None]).sum(2)
    return (1 + nearer_private + nearer_others).numpy()


def threshold_frontier(similarities, named, truth, precision_floor: float = 0.95, recall_floor: float = 0.90):
    """Over every threshold between observed similarities: (best precision with recall >= ``recall_floor``, its
    threshold), (best recall with precision >= ``precision_floor``, its threshold); (None, None) where none
    qualifies. A sample is detected above the threshold and right when ``named`` (its nearest private patient) is
    its true patient (``truth``, None for a non-copy)."""
    order = np.argsort(-np.asarray(similarities, dtype=np.float64), kind="stable")
    sims = np.asarray(similarities, dtype=np.float64)[order]
    right = np.array([named[i] is not None and named[i] == truth[i] for i in order], dtype=np.int64)
    n_true = sum(t is not None for t in truth)
    best_p, best_r = (None, None), (None, None)
    hits = np.cumsum(right)
    for i in range(len(sims)):
        if i + 1 < len(sims) and sims[i + 1] == sims[i]:
            continue  # a threshold cannot fall between equal similarities
        precision, recall = hits[i] / (i + 1), hits[i] / n_true if n_true else float("nan")
        threshold = float(sims[i + 1]) if i + 1 < len(sims) else float(sims[i]) - 1e-9
        if recall >= recall_floor and (best_p[0] is None or precision > best_p[0]):
            best_p = (float(precision), threshold)
        if precision >= precision_floor and (best_r[0] is None or recall > best_r[0]):
            best_r = (float(recall), threshold)
    return best_p, best_r


def near_sets(ranks, patients: list[str], k: int) -> list[set]:
    """Per sample, the private patients the near-miss truth says it copies: those among its ``k`` nearest in pixels
    (``ranks``: ``patient_ranks`` of the samples, columns in ``patients`` order)."""
    return [{p for p, rank in zip(patients, row) if rank <= k} for row in ranks]


def near_miss(detected: list, ranks, patients: list[str], k: int) -> dict:
    """Detections against the near-miss truth: a sample copies every private patient among its ``k`` nearest in
    pixels (``ranks``: ``patient_ranks`` of the samples, columns in ``patients`` order); a detection is right when
    the patient it names is one of them."""
    within = near_sets(ranks, patients, k)
    return {"true_positives": sum(d is not None and d in w for d, w in zip(detected, within)),
            "detected": sum(d is not None for d in detected), "true_copies": sum(bool(w) for w in within)}


def detector_comparison(copies, named, near_right, pixel_right, pixel_copies, resamples: int = 2000,
                        seed: int = 0) -> dict:
    """Per detector (row 0: the reference), precision and recall against the near-miss and the pixel truth, and each
    other row's paired differences from row 0 (precision, recall; near-miss truth) with a Bonferroni level over
    them. Arguments are per sample: ``copies``/``pixel_copies`` (n) whether the truth calls it a copy, ``named``,
    ``near_right``, ``pixel_right`` (detectors x n) whether the detector named a patient, and a right one."""
    from memcontrol.metrics.intervals import LEVEL, bootstrap_indices, paired, wilson

    named, near_right, pixel_right = (np.asarray(a, dtype=np.float64) for a in (named, near_right, pixel_right))
    copies, pixel_copies = np.asarray(copies, dtype=np.float64), np.asarray(pixel_copies, dtype=np.float64)
    level = 1 - (1 - LEVEL) / max(1, len(named) - 1)
    indices = bootstrap_indices(len(copies), resamples, seed)

    def precision(d):
        return lambda idx: near_right[d][idx].sum(1) / named[d][idx].sum(1)

    def recall(d):
        return lambda idx: near_right[d][idx].sum(1) / copies[idx].sum(1)

    rows = []
    for d in range(len(named)):
        hits, found = int(near_right[d].sum()), int(named[d].sum())
        pixel_hits = int(pixel_right[d].sum())
        row = {"detected": found, "near": {"precision": wilson(hits, found), "recall": wilson(hits, int(copies.sum()))},
               "pixel": {"precision": wilson(pixel_hits, found), "recall": wilson(pixel_hits, int(pixel_copies.sum()))}}
        if d:
            row["difference"] = {"precision": paired(precision(d), precision(0), indices, level=level),
                                 "recall": paired(recall(d), recall(0), indices, level=level), "level": level}
        rows.append(row)
    return {"samples": len(copies), "near_copies": int(copies.sum()), "pixel_copies": int(pixel_copies.sum()),
            "detectors": rows}


def near_summary(label: str, runs: list[dict], k: int) -> None:
    import quickstart as q

    hits, detected, copies = (sum(r[key] for r in runs) for key in ("true_positives", "detected", "true_copies"))
    print(f"{label}, config rule against the near-miss truth (k {k}): {detected} detected, {hits} right, {copies} "
          f"true copies; precision {q.rate(hits, detected)}, recall {q.rate(hits, copies)}")


def summary(label: str, results: dict) -> None:
    import quickstart as q
    from memcontrol.metrics.ground_truth import precision_recall

    for name, (found, truth) in results.items():
        pr = precision_recall(found, truth)
        print(f"{label}, {name} rule: {pr['detected']} detected, {pr['true_positives']} right, "
              f"{pr['true_copies']} true copies; precision {q.rate(pr['true_positives'], pr['detected'])}, "
              f"recall {q.rate(pr['true_positives'], pr['true_copies'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", nargs=2, action="append", metavar=("RUN", "CONFIG"), required=True,
                    help="a finished study and the config it ran (repeatable)")
    ap.add_argument("--others", type=int, default=4000, help="other patients of the private site for the truth")
    ap.add_argument("--calibration", type=int, default=1000, help="held-out patients calibrating the thresholds")
    ap.add_argument("--background", type=int, default=1000, help="background patients of score normalization")
    ap.add_argument("--near", type=int, default=5, help="rank within which the near-miss truth counts a copy")
    ap.add_argument("--chance", type=int, default=1000, help="further real patients checking its chance rate")
    ap.add_argument("--tau-sets", type=int, default=5, help="disjoint sets of 1,000 that show tau's noise (0: none)")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--candidate", action="append", default=[],
                    help="another copy detector to compare with the configs': a metric-net folder, or folders joined "
                         "by commas for an ensemble (repeatable)")
    args = ap.parse_args(argv)
    for candidate in args.candidate:
        for folder in candidate.split(","):
            if not (Path(folder) / "config.json").is_file():
                ap.error(f"--candidate {folder}: no config.json there (a metric-net folder holds config.json and "
                         "model.safetensors)")

    import torch

    import quickstart as q
    from memcontrol.config import load_config
    from memcontrol.data import load_source, run_salt
    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor
    from memcontrol.metrics import build_embedder
    from memcontrol.metrics.ground_truth import precision_recall, through_vae
    from memcontrol.metrics.memorization import calibrate_tau, tau_at_false_positive_rate
    from memcontrol.metrics.nn_search import nearest_neighbours
    from memcontrol.models import load_pipeline
    from memcontrol.search.objectives import dataset_pixels
    from memcontrol.search.settings import load_settings

    torch.manual_seed(0)
    pooled = {"config": ([], []), "normalized": ([], [])}
    sweep = ([], [], [])
    reported_spread, rendered = False, {}
    wrong_ranks, control = [], []  # pixel ranks: the wrong detections' patients; the same patients, base samples
    background_from = args.others + args.calibration + PLANTED_GAP
    chance_from = background_from + args.background
    needed = max(1000 * args.tau_sets, chance_from + args.chance)
    near_pooled, chance_checked = [], False
    candidates = {f"candidate {candidate}": Ensemble([build_embedder({"type": "metric_net", "path": folder})
                                                      for folder in candidate.split(",")])
                  for candidate in args.candidate}
    compared = {"copies": [], "pixel_copies": [], "named": [], "near_right": [], "pixel_right": []}
    for run, config in args.study:
        run = Path(run)
        settings = load_settings(load_config(config), run)
        mem, resolution = settings.objectives["memorization"], settings.data["resolution"]
        pipe = load_pipeline(settings.model["path"], option="model.path")
        embedder = build_embedder(mem["features"], pipe=pipe)
        dataset = load_source(settings.data["train"], resolution, salt=run_salt(run))
        private = torch.cat(list(dataset_pixels(dataset)))
        channels, private_feats = private.shape[1], embedder.embed(private).float()

        if resolution not in rendered:  # once: every set below is a slice of the same held-out patients
            rendered[resolution] = private_site_heldout(needed, resolution)[0]

        def patients(skip: int, count: int, by=embedder):
            images = rendered[resolution][skip:skip + count]
            return by.embed(torch.stack([to_model_tensor(im, resolution, channels) for im in images])).float()

        if not reported_spread and args.tau_sets:
            taus = [calibrate_tau(patients(skip, 1000), private_feats, args.fpr)[0]
                    for skip in range(0, 1000 * args.tau_sets, 1000)]
            print(f"tau at false-positive rate {args.fpr:g} on {args.tau_sets} disjoint sets of 1,000 held-out "
                  "patients: " + ", ".join(f"{t:.4f}" for t in taus) + f" (the config's: {float(mem['tau']):.4f})",
                  flush=True)
            reported_spread = True
        background = patients(background_from, args.background)
        calibration = patients(args.others, args.calibration)

        def scores(feats):
            sims, idx = nearest_neighbours(feats, private_feats, k=1)
            back = nearest_neighbours(feats, background, k=args.k)[0].double().numpy()
            return normalized_scores(sims[:, 0].double().numpy(), back, args.beta, args.k), idx[:, 0].numpy()

        tau_n = tau_at_false_positive_rate(scores(calibration)[0], args.fpr)
        tau = float(mem["tau"])
        print(f"\n{run}: config tau {tau:.4f}; normalized score's threshold {tau_n:.4f} (beta {args.beta:g}, "
              f"k {args.k}, {args.background} background patients)", flush=True)
        if candidates:  # each detector: (embedder, private features, its tau on the same calibration patients)
            detectors = {"configs' detector": (embedder, private_feats,
                                               calibrate_tau(calibration, private_feats, args.fpr)[0])}
            for name, e in candidates.items():
                feats = e.embed(private).float()
                detectors[name] = (e, feats, calibrate_tau(patients(args.others, args.calibration, e), feats,
                                                           args.fpr)[0])
            print("tau of each detector at the same false-positive rate: "
                  + ", ".join(f"{name} {d[2]:.4f}" for name, d in detectors.items()), flush=True)
        images = q.real_images(settings, args.others)
        scored = q.score_runs(run, None, settings, images)
        private_drawn, keys, others = images
        patient_keys = sorted(set(keys))
        if not chance_checked:  # real patients of the site, in no set above: how often the near-miss truth fires
            real = rendered[resolution][chance_from:chance_from + args.chance]
            strangers = through_vae(pipe.vae, torch.stack([to_model_tensor(im, resolution, channels) for im in real]))
            called = near_miss([None] * len(strangers), patient_ranks(strangers, private_drawn, keys, others),
                               patient_keys, args.near)["true_copies"]
            print(f"near-miss truth (a private patient within the nearest {args.near} in pixels): {args.chance} "
                  f"further real patients of the site called copies: {q.rate(called, args.chance)} ({called}; "
                  f"expected by chance {len(patient_keys) * args.near / (len(patient_keys) + args.others):.1%})")
            chance_checked = True
        study = {"config": ([], []), "normalized": ([], [])}
        near_study = []
        study_wrong, base_ranks = [], []
        print("| run | true copies | detected: config rule / normalized | right: config rule / normalized | "
              f"near-miss truth (k {args.near}): true copies | config rule right |")
        print("|---|---|---|---|---|---|")
        for r, folder in q.evaluated_runs(run):
            truth, detected, _ = scored[r["folder"]]
            samples = q.run_samples(folder)
            sample_feats = embedder.embed(samples).float()
            normalized, idx = scores(sample_feats)
            pixels = samples[:, :channels]
            ranks = patient_ranks(pixels, private_drawn, keys, others)
            if r["label"] == BASE_ROW:
                base_ranks += [dict(zip(patient_keys, row)) for row in ranks]
            wrong = [d if d is not None and d != t else None for d, t in zip(detected, truth)]
            study_wrong += [w for w in wrong if w is not None]
            wrong_ranks += [rank[patient_keys.index(w)] for rank, w in zip(ranks, wrong) if w is not None]
            near = near_miss(detected, ranks, patient_keys, args.near)
            if candidates:
                within = near_sets(ranks, patient_keys, args.near)
                named = []
                for e, feats, tau_d in detectors.values():
                    # not idx/sims: the normalized rule below still reads the configs' detector's nearest patients
                    nearest_sims, nearest = nearest_neighbours(
                        sample_feats if e is embedder else e.embed(samples).float(), feats, k=1)
                    named.append([dataset.keys[i] if sim > tau_d else None
                                  for sim, i in zip(nearest_sims[:, 0].tolist(), nearest[:, 0].tolist())])
                compared["copies"] += [bool(w) for w in within]
                compared["pixel_copies"] += [t is not None for t in truth]
                compared["named"].append([[n is not None for n in d] for d in named])
                compared["near_right"].append([[n is not None and n in w for n, w in zip(d, within)] for d in named])
                compared["pixel_right"].append([[n is not None and n == t for n, t in zip(d, truth)] for d in named])
            near_study.append(near)
            renamed = [dataset.keys[i] if s > tau_n else None for s, i in zip(normalized, idx)]
            for name, found in (("config", detected), ("normalized", renamed)):
                for into in (study, pooled):
                    into[name][0].extend(found)
                    into[name][1].extend(truth)
            a, b = precision_recall(detected, truth), precision_recall(renamed, truth)
            print(f"| {r['label']} | {a['true_copies']}/{len(truth)} | {a['detected']} / {b['detected']} | "
                  f"{a['true_positives']} / {b['true_positives']} | {near['true_copies']} | "
                  f"{near['true_positives']} |")
            neighbours = json.loads((folder / "neighbours.json").read_text())
            sweep[0].extend(n["similarity"] for n in neighbours)
            sweep[1].extend(n["key"] for n in neighbours)
            sweep[2].extend(truth)
        summary(str(run), study)
        near_summary(str(run), near_study, args.near)
        near_pooled += near_study
        control += [ranks[w] for w in study_wrong for ranks in base_ranks]
    if len(args.study) > 1:
        summary("pooled over the studies", pooled)
        near_summary("pooled over the studies", near_pooled, args.near)

    if candidates:
        stacked = {key: np.concatenate(compared[key], axis=1) for key in ("named", "near_right", "pixel_right")}
        result = detector_comparison(compared["copies"], stacked["named"], stacked["near_right"],
                                     stacked["pixel_right"], compared["pixel_copies"])
        print(f"\nthe detectors on the same {result['samples']} samples ({result['near_copies']} near-miss copies, "
              f"k {args.near}; {result['pixel_copies']} pixel-truth copies), each at its own tau:")
        for name, row in zip(["configs' detector", *candidates], result["detectors"]):
            print(f"{name}: {row['detected']} detected; near-miss truth precision {row['near']['precision']}, "
                  f"recall {row['near']['recall']}; pixel truth precision {row['pixel']['precision']}, "
                  f"recall {row['pixel']['recall']}")
            if "difference" in row:
                diff = row["difference"]
                print(f"  minus the configs' detector, paired ({diff['level']:.2%}): precision {diff['precision']}, "
                      f"recall {diff['recall']}")

    n_patients = len(set(keys)) + args.others
    for label, ranks in (("the config rule's wrong detections, the detected patient", wrong_ranks),
                         ("the base model's samples, the same patients (control)", control)):
        near = sum(r <= NEAR_RANK for r in ranks)
        print(f"\npixel rank among {n_patients} patients of {label}: "
              + (f"median {np.median(ranks):g}, within the nearest {NEAR_RANK}: {q.rate(near, len(ranks))} "
                 f"({near} of {len(ranks)}; chance {NEAR_RANK / n_patients:.1%})" if ranks else "none"))
    (best_p, at_p), (best_r, at_r) = threshold_frontier(*sweep)
    print(f"\nevery threshold on the search-time similarities ({len(sweep[0])} samples; a diagnostic, not a result): "
          + (f"best precision with recall >= 0.90: {best_p:.1%} (threshold {at_p:.3f}); " if best_p is not None
             else "no threshold keeps recall >= 0.90; ")
          + (f"best recall with precision >= 0.95: {best_r:.1%} (threshold {at_r:.3f})" if best_r is not None
             else "no threshold reaches precision >= 0.95"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
