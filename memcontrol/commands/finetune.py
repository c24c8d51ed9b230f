"""`memcontrol finetune`: fine-tune a model with a given mask and export the adapter (the transfer job).

The output folder receives the adapter, ``mask.json``, ``metrics.json``, ``README.md`` and (unless ``data.cache_dir``
says otherwise) the training cache in ``cache/``. A folder that already holds a finished export is refused, so a
re-run never overwrites finished work; an interrupted run is simply run again: the cached latents are reused and
training starts over. The work is ``memcontrol.api.finetune``; this module prints what it returns.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="YAML config with model, data, train and (unless --mask is given) mask sections")
    parser.add_argument("--mask", type=Path, default=None, help="mask.json to train with (overrides the config's)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="apply a mask whose layout or sites do not all match this model; unmatched sites are "
                             "listed and skipped")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the adapter and its card")


def run(args) -> int:
    from ..api import finetune

    result = finetune(args.config, args.out, mask=args.mask, allow_partial=args.allow_partial)
    if result.skipped_sites:
        print(f"finetune: skipped {len(result.skipped_sites)} site(s) that match nothing: "
              f"{', '.join(result.skipped_sites)}")
    print(f"finetune: {result.training_items} training items; {result.summary}; {result.steps} steps in "
          f"{result.seconds:.1f} s, final loss {result.final_loss:.4f}; adapter written to {result.adapter}")
    return 0
