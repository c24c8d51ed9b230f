"""memcontrol: audit and control training-data memorization in diffusion image generators.

The jobs from Python (the same code as the ``memcontrol`` command; see ``memcontrol.api``)::

    import memcontrol
    run = memcontrol.search("configs/quickstart.yaml", out="runs/quick")     # -> SearchResult
    audit = memcontrol.audit("data/base_model", out="runs/audit", prompts="prompts.txt", adapter=run.best)
    tuned = memcontrol.finetune("finetune.yaml", out="runs/tuned")           # -> FinetuneResult

They are imported on first use, so ``import memcontrol`` loads no heavy library.
"""

__version__ = "0.1.0"

__all__ = ["audit", "finetune", "search"]


def __getattr__(name):
    # memcontrol.search and memcontrol.audit are the subpackages of the same names, made callable (see
    # memcontrol.api.callable_package); finetune is the function.
    import importlib

    if name in ("search", "audit"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "finetune":
        from .api import finetune

        return finetune
    raise AttributeError(f"module 'memcontrol' has no attribute '{name}'")
