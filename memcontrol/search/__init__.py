"""The MemControl search: which UNet parameters a fine-tune may touch, found by a two-objective Optuna study.

Modules: ``settings`` (the config, checked), ``space`` (search spaces -> candidates), ``study`` (storages, samplers,
budget, recovery of interrupted trials), ``context`` and ``trial`` (one worker's shared state; one candidate
evaluated), ``objectives`` (the metrics of a trial), ``baselines`` (and the untuned base model), ``worker`` (the
trial loop), ``progress`` (progress lines, time left), ``results`` and ``selection`` (Pareto front, chosen
candidate), ``followups`` (the chosen candidate re-evaluated on fresh seeds; controls), ``report`` and
``report_html`` (CSV, plots, HTML), ``run`` (the ``memcontrol search`` command from start to end). Nothing heavy is
imported here.
"""

from ..api import callable_package, search

callable_package(__name__, search)  # memcontrol.search(config, out=...) runs the search (memcontrol.api)
