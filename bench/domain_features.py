"""Does a feature space see how far the base model is from the private site? FD against its own noise floor.

    python bench/domain_features.py                          # 256 base-model samples, 512 reference patients
    python bench/domain_features.py --samples 96 --reference 384   # the README's figure

The base model (pretrained on the public cohort only) draws one sample for each of ``--samples`` reports of
held-out private-site patients (rendered in memory, with the quickstart's sampler settings). Each feature space
(``--features``, embedder specs) then gives two Fréchet distances to ``--reference`` further held-out patients of
the private site: the base model's samples, and as many *real* held-out patients (other ones): the floor that
finite samples leave. A feature space that sees the site's protocol puts the first far above the second. Each FD
has a bootstrap 95% interval over the samples (the reference Gaussian kept fixed); the gap has a paired one
(the same resampled positions for both sets, which are the same size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FEATURES = ['{"type": "metric_net", "path": "data/metric_nets/domain"}']


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quickstart.yaml")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--reference", type=int, default=512)
    ap.add_argument("--features", nargs="+", default=FEATURES, help="embedder specs (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from memcontrol.config import feature_spec, load_config
    from memcontrol.data.cohorts import private_site_heldout
    from memcontrol.data.transforms import to_model_tensor
    from memcontrol.metrics import build_embedder
    from memcontrol.metrics.intervals import bootstrap_indices, interval, paired, resampled_frechet
    from memcontrol.metrics.quality import gaussian_stats
    from memcontrol.models import load_pipeline
    from memcontrol.sampling import generate_samples
    from memcontrol.search.settings import load_settings

    settings = load_settings(load_config(args.config), Path("/tmp"))
    resolution = settings.data["resolution"]
    images, reports = private_site_heldout(args.reference + 2 * args.samples, resolution)
    real = torch.stack([to_model_tensor(im, resolution) for im in images])
    reference, real_others = real[:args.reference], real[args.reference:args.reference + args.samples]
    prompts = reports[args.reference + args.samples:]  # reports of patients in neither image set
    pipe = load_pipeline(settings.model["path"], device="cpu", option="model.path")
    s = settings.sampling
    t0 = time.perf_counter()
    generated = generate_samples(pipe, prompts, steps=s["steps"], seed=args.seed,
                                 guidance_scale=s["guidance_scale"], sampler=s["sampler"])
    print(f"{len(generated)} base-model samples from held-out private-site reports in "
          f"{time.perf_counter() - t0:.0f} s; reference: {len(reference)} held-out patients of the private site; "
          f"floor: {len(real_others)} other held-out patients", flush=True)
    idx = bootstrap_indices(args.samples, seed=args.seed)
    out = {}
    for text in args.features:
        embedder = build_embedder(feature_spec(json.loads(text), REPO), pipe=pipe)
        t0 = time.perf_counter()
        ref = gaussian_stats(embedder.embed(reference).double().numpy())
        fd_base = resampled_frechet(embedder.embed(generated).double().numpy(), ref)
        fd_real = resampled_frechet(embedder.embed(real_others).double().numpy(), ref)
        base, floor, gap = interval(fd_base, idx), interval(fd_real, idx), paired(fd_base, fd_real, idx)
        dims = ref[0].shape[0]
        print(f"FD[{embedder.name}] ({dims} dims): base model {base}; real held-out patients {floor}; "
              f"gap {gap}; ratio {base.value / floor.value:.1f}x ({time.perf_counter() - t0:.1f} s)")
        out[embedder.name] = {"base": str(base), "floor": str(floor), "gap": str(gap)}
    return 0


if __name__ == "__main__":
    sys.exit(main())
