"""`memcontrol audit`: measure how much of its training data a checkpoint reproduces, and write a report.

    memcontrol audit --model DIR|FILE [--model-config DIR] [--adapter PATH] [--manifest TRAIN]
                     [--heldout MANIFEST] [--prompts FILE] [--config audit.yaml] --out DIR

--adapter takes what the ecosystem writes (see ``memcontrol.audit.loading.ADAPTER_KINDS``). Without --manifest
only the checks that need no training data run (the noise norm); the others are listed as skipped, with the
reason, in metrics.json and in the report. The work is ``memcontrol.api.audit``; this module prints what it
returns.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="local diffusers pipeline folder (a base or a fully fine-tuned model), or a single-file "
                             "checkpoint (.safetensors/.ckpt) with --model-config")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="for a single-file --model: a local diffusers pipeline folder of the same architecture "
                             "(its configs and tokenizer are read; nothing is downloaded)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="adapter to apply to the model: a LoRA folder or file (diffusers, kohya or peft key "
                             "names), a peft adapter folder (UNet or text encoder), an export folder of memcontrol, "
                             "or a .safetensors of UNet parameters (a partial fine-tune)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="training manifest (CSV/TSV/JSONL or image folder): enables copy detection, distance "
                             "ratio, tiled L2 and extraction; its captions are the prompts unless --prompts is given")
    parser.add_argument("--heldout", type=Path, default=None,
                        help="manifest of real images the model never saw: baseline for the thresholds and "
                             "reference for FD/KID")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompts to audit: .txt (one per line) or CSV/TSV/JSONL with a prompt/text/caption column")
    parser.add_argument("--config", type=Path, default=None, help="YAML config with an 'audit' section")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: the config's, else auto)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the generated samples (default: config's)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args) -> int:
    from ..api import audit

    overrides = {k: v for k, v in (("device", args.device), ("seed", args.seed)) if v is not None}
    metrics = audit(args.model, out=args.out, manifest=args.manifest, heldout=args.heldout, prompts=args.prompts,
                    adapter=args.adapter, model_config=args.model_config, config=args.config, **overrides).metrics
    print(f"audit: {metrics['counts']['prompts']} prompts, {metrics['counts']['samples']} samples")
    for name, value in metrics["summary"].items():
        shown = "n/a" if value is None else f"{value:.4g}"
        print(f"  {name}: {shown}")
    for item in metrics["skipped"]:
        print(f"  skipped {item['check']}: {item['reason']}")
    for warning in metrics["warnings"]:
        print(f"  warning: {warning}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
