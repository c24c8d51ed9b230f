"""Every section a memcontrol config file may hold, typed: one model per section, field names = YAML keys, defaults
in one place. ``search``, ``finetune`` and ``audit`` (and the Python API) all read their files through
``JobConfig``: an unknown key at any depth, a value of the wrong type or out of range is refused before any work
starts. ``memcontrol config show CFG`` prints the result, defaults included.

Each job uses the sections it needs and checks that what it cannot do without is there (``model.path``,
``data.train``); the others may sit in the same file (one file can drive a search and the audit of its result).
"""

from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from ..data.dataset import ON_ERROR
from ..data.duplicates import ON_DUPLICATES
from ..data.transforms import CROPS
from ..errors import MemcontrolError
from ..metrics.memorization import DEFAULT_DELTA, DEFAULT_TAU, RATIO_THRESHOLD
from ..mitigations.captions import CaptionStrength
from ..mitigations.wen import WenConfig
from ..sampling import SAMPLERS
from ..search.selection import DEFAULT_COPY_BOUND, DEFAULT_RULE, RULES
from ..training import TrainConfig
from .base import ConfigPath, Section, Spec, as_number, relative_to_config
from .devices import Device, DtypeName

MEMORIZATION_METRICS = ("mean_similarity", "p95_similarity", "copy_fraction", "distance_ratio_fraction")
QUALITY_METRICS = ("fd", "kid")
# The last four are published mitigations applied to full fine-tuning (``memcontrol.mitigations``): not run unless
# asked for, since each costs a baseline's training or sampling again.
BASELINES = ("full_ft", "lora_attention", "bitfit_norm", "full_ft_random_replace", "full_ft_random_insert",
             "full_ft_embedding_noise", "full_ft_wen", "full_ft_dedup")
DEFAULT_BASELINES = BASELINES[:3]
SEARCH_SAMPLERS = ("nsga2", "tpe", "random")
SPACE_PRESETS = ("reference", "extended")

Positive = Annotated[int, Field(ge=1)]
Sampler = Literal[SAMPLERS] | None  # None: the model's own scheduler


# --- feature spaces (memcontrol.metrics.build_embedder) ------------------------------------------------------------

class _Features(Spec):
    batch_size: Positive | None = None


class PixelFeatures(_Features):
    type: Literal["pixels"]
    size: Positive | None = None


class VaeFeatures(_Features):
    type: Literal["vae"]


class OpenClipFeatures(_Features):
    type: Literal["open_clip"]
    model: str | None = None
    checkpoint: ConfigPath | None = None
    config: ConfigPath | None = None


class TransformersFeatures(_Features):
    type: Literal["transformers"]
    path: ConfigPath | None = None
    size: Positive | None = None
    pool: Literal["auto", "cls", "mean", "pooler"] | None = None


class TorchscriptFeatures(_Features):
    type: Literal["torchscript"]
    path: ConfigPath | None = None
    size: Positive | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class InceptionFeatures(_Features):
    type: Literal["inception"]
    weights: ConfigPath | None = None
    layout: Literal["auto", "pytorch-fid", "torchvision"] | None = None


class MetricNetFeatures(_Features):
    type: Literal["metric_net"]
    path: ConfigPath | None = None  # a shipped metric network's folder (data/metric_nets/domain, .../copy_detector)


FEATURE_KINDS = (PixelFeatures, VaeFeatures, OpenClipFeatures, TransformersFeatures, TorchscriptFeatures,
                 InceptionFeatures, MetricNetFeatures)
Features = Annotated[Union[FEATURE_KINDS], Field(discriminator="type")]
class FeatureOption(Section):
    """One feature space on its own (``memcontrol.config.feature_spec``)."""

    features: Features


# The audit gives each feature space its own copy threshold: a similarity, or "heldout" (calibrated on held-out
# real images). The search's objective needs a fixed number.
Tau = Union[Annotated[float, Field(ge=-1, le=1)], Literal["heldout"]]
AuditFeatures = Annotated[Union[tuple(create_model(f"Audit{k.__name__}", __base__=k, tau=(Tau, DEFAULT_TAU))
                                      for k in FEATURE_KINDS)], Field(discriminator="type")]


def vae() -> VaeFeatures:
    return VaeFeatures(type="vae")


# --- sections ------------------------------------------------------------------------------------------------------

class ModelSection(Section):
    path: ConfigPath | None = None      # a local diffusers folder (never downloaded)
    device: Device = "auto"
    dtype: DtypeName = "float32"


class DataSource(Spec):
    """Images with captions: a manifest (CSV/TSV/JSONL) or a folder, and how to read it. A bare string is the
    source."""

    source: ConfigPath
    image_column: str | None = None
    text_column: str | None = None
    key_column: str | None = None
    channels: Literal[1, 3] | None = None
    crop: Literal[CROPS] | None = None
    on_error: Literal[ON_ERROR] | None = None
    frame: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_source(cls, value):
        return {"source": value} if isinstance(value, str) else value


class DataSection(Section):
    train: DataSource | None = None      # the private set
    heldout: DataSource | None = None    # unseen images of the same domain: the quality reference
    resolution: int = Field(512, ge=8)
    max_train: Positive | None = None
    cache_dir: ConfigPath | None = None  # latents, text embeddings, features; default OUT/cache


class DataAuditSection(Section):
    """What ``search`` and ``finetune`` do about near-duplicate and same-patient training records and about training
    images in the held-out set (``memcontrol.data.duplicates``; ``memcontrol audit-data`` lists them)."""

    on_duplicates: Literal[ON_DUPLICATES] = "warn"   # warn: print the count; error: stop before training
    deduplicate: bool = False                        # train on one record per duplicate group (leaks dropped)
    features: Features = Field(default_factory=lambda: PixelFeatures(type="pixels"))
    threshold: float | None = Field(None, ge=-1, le=1)  # None: the calibrated pixel threshold (pixels only)
    shared_patients: bool = False  # train and held-out name patients with one pseudonym mapping: compare them

    @model_validator(mode="after")
    def _threshold(self):
        if self.threshold is None and self.features.type != "pixels":
            raise ValueError(f"threshold is needed for {self.features.type} features (only the pixel-space one "
                             "is calibrated by memcontrol)")
        return self


class SpaceSection(Section):
    """The mask search space (``memcontrol.search.space``); distributions are checked when it is parsed."""

    granularity: Literal["block", "role"] = "block"
    kinds: list[str] = Field(default_factory=list)
    sites: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    group_by: Literal["site", "block"] = "site"
    family: Any = "lora"
    family_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train")
    @classmethod
    def _train_keys(cls, value: dict) -> dict:
        import difflib

        for key in value:
            if key not in TrainConfig.model_fields:
                close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise ValueError(f"`{key}` is not a train setting{hint}")
        return value


class MemorizationObjective(Section):
    metric: Literal[MEMORIZATION_METRICS] = "mean_similarity"
    features: Features = Field(default_factory=vae)
    tau: float = Field(DEFAULT_TAU, ge=-1, le=1)  # copy threshold on the cosine similarity


class QualityObjective(Section):
    metric: Literal[QUALITY_METRICS] = "fd"
    features: Features = Field(default_factory=vae)
    kid_subsets: Positive = 10                                  # KID: mean over this many random subsets ...
    kid_subset_size: Annotated[int, Field(ge=2)] = 1000         # ... of this many samples a side (capped)


class ObjectivesSection(Section):
    memorization: MemorizationObjective = Field(default_factory=MemorizationObjective)
    quality: QualityObjective = Field(default_factory=QualityObjective)
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 1000  # every figure's 95% interval


class SamplingSection(Section):
    prompts: Positive = 16            # memorization samples: training captions
    quality_prompts: Positive = 64    # quality samples: held-out captions
    per_prompt: Positive = 1
    steps: Positive = 20
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = Field(0, ge=0)
    sampler: Sampler = "dpm"

    @model_validator(mode="after")
    def _two_samples(self):
        if self.quality_prompts * self.per_prompt < 2:
            raise ValueError("at least two quality samples per trial (quality_prompts x per_prompt) are needed to "
                             "measure quality")
        return self


class EarlyStopSection(Section):
    enabled: bool = True
    every: Positive = 50
    probe_prompts: Positive = 8
    noise_steps: Positive = 1
    max_ratio: float | None = Field(3.0, gt=0)
    max_value: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _a_limit(self):
        if self.enabled and self.max_ratio is None and self.max_value is None:
            raise ValueError("set max_ratio or max_value (or enabled: false)")
        return self


class Constraint(Spec):
    metric: str
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self):
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max and min")
        return self


class FidelitySection(Section):
    """Multi-fidelity search (``memcontrol.search.fidelity``): every candidate is first trained ``min_steps`` steps
    and scored by cheap proxies; the best ``1/eta`` of each bracket of ``bracket`` candidates (default ``eta**2``)
    is trained again at its full steps and evaluated in full. ``quality_items`` held-out images, each at
    ``quality_draws`` fixed (timestep, noise) draws, give the quality proxy (held-out denoising loss). ``schedule``:
    a screen is the full run's first ``min_steps`` steps (``truncated``), or the full run's schedule shrunk to
    ``min_steps`` (``compressed``: warm-up scaled by ``min_steps / steps``; a cosine schedule ends its decay).
    ``memorization_proxy``: how a screen scores memorization: ``train_fit``, the denoising loss on the training
    images at fixed draws, negated (a candidate that fits its own training images more copies them more), or
    ``noise_norm``, the probe prompts' text-conditional noise norm (what screens used before the option existed).
    ``quality_proxy``: how a screen scores quality: ``heldout_loss`` (above), or ``sample_fd``, the Fréchet distance
    of ``quality_samples`` samples of the held-out reports, drawn with ``sample_steps`` sampler steps, to the held-out
    images in the quality objective's features (what the full evaluation measures, with fewer samples and steps)."""

    enabled: bool = False
    schedule: Literal["truncated", "compressed"] = "truncated"
    memorization_proxy: Literal["train_fit", "noise_norm"] = "train_fit"
    min_steps: Positive = 50
    eta: Annotated[int, Field(ge=2)] = 3
    bracket: Annotated[int, Field(ge=2)] | None = None
    quality_items: Positive = 16
    quality_draws: Positive = 4
    quality_proxy: Literal["heldout_loss", "sample_fd"] = "heldout_loss"
    quality_samples: Annotated[int, Field(ge=2)] = 64
    sample_steps: Positive = 10


class SearchSection(Section):
    n_trials: Positive = 40
    timeout: float | None = Field(None, gt=0)   # seconds per worker
    sampler: Literal[SEARCH_SAMPLERS] = "nsga2"
    population_size: Annotated[int, Field(ge=2)] | None = None
    seed: int = Field(0, ge=0)
    study_name: str = Field("memcontrol", min_length=1)
    storage: str | None = None
    constraints: list[Constraint] = Field(default_factory=list)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    heartbeat_s: float = Field(30, gt=0)
    grace_s: float = Field(300, gt=0)
    max_attempts: Positive = 2
    workers: Positive = 1
    progress_every_s: float = Field(10, ge=0)   # a worker's progress line (run, phase, step, time left); 0: every step
    fidelity: FidelitySection = Field(default_factory=FidelitySection)

    @field_validator("enqueue")
    @classmethod
    def _numbers(cls, value: list) -> list:
        return [{k: as_number(v) for k, v in params.items()} for params in value]

    @model_validator(mode="after")
    def _grace(self):
        if self.grace_s <= 2 * self.heartbeat_s:
            raise ValueError("grace_s must be more than twice heartbeat_s, or live trials would be taken for "
                             "interrupted ones")
        if self.fidelity.enabled and self.sampler == "nsga2":
            # NSGA-II builds its generations from completed trials only: the screened-out candidates (most of them)
            # would never inform it, and its first generation would take a population of promotions to fill.
            raise ValueError("fidelity.enabled needs sampler: tpe (or random); NSGA-II learns nothing from the "
                             "candidates that were screened out")
        return self


class BaselineRates(Section):
    full_ft: float = Field(1e-5, gt=0)
    lora_attention: float = Field(1e-4, gt=0)
    bitfit_norm: float = Field(1e-4, gt=0)


class BaselinesSection(Section):
    enabled: bool = True
    methods: list[Literal[BASELINES]] = Field(default_factory=lambda: list(DEFAULT_BASELINES))
    lora_rank: Positive = 4
    lr: BaselineRates = Field(default_factory=BaselineRates)  # full_ft's rate also trains the mitigation rows
    captions: CaptionStrength = Field(default_factory=CaptionStrength)  # the full_ft_random_*/embedding_noise rows
    wen: WenConfig = Field(default_factory=WenConfig)                   # the full_ft_wen row


class SelectionSection(Section):
    rule: Literal[RULES] = DEFAULT_RULE
    copy_bound: float = Field(DEFAULT_COPY_BOUND, ge=0, le=1)  # rule copy_bound: the largest copy rate allowed
    reevaluate: bool = True   # sample the chosen candidate again on fresh seeds and report both figures
    margin: float = Field(0.1, ge=0)
    relative: bool = True
    weights: list[float] = Field(default_factory=lambda: [0.5, 0.5], min_length=2, max_length=2)


class ControlsSection(Section):
    """Runs that separate which sites the chosen candidate trains from how much it trains: random masks with its
    family, learning rate and trainable share, and LoRA on all attention at its learning rate."""

    enabled: bool = True
    random_masks: Annotated[int, Field(ge=0)] = 3
    share_tolerance: float = Field(0.25, gt=0, lt=1)  # a random mask's trainable share within +-25% of the chosen's
    lora_attention: bool = True


class ExportSection(Section):
    keep_adapters: Literal["pareto", "all"] = "pareto"


# --- the audit -----------------------------------------------------------------------------------------------------

class Generation(Section):
    n_per_prompt: Positive = 1
    steps: Positive = 25
    guidance_scale: float = Field(7.5, ge=0)
    sampler: Sampler = "dpm"
    batch_size: Positive = 8


class DistanceRatioCheck(Section):
    enabled: bool = True
    threshold: float = Field(RATIO_THRESHOLD, gt=0, le=1)
    distinct_by: Literal["pixels", "key"] = "pixels"
    size: Positive | None = 64


class TiledL2Check(Section):
    enabled: bool = True
    delta: float = Field(DEFAULT_DELTA, gt=0)
    grid: Positive = 4
    size: Positive | None = 64


class ExtractionCheck(Section):
    enabled: bool = False
    n_per_prompt: Annotated[int, Field(ge=2)] = 16
    max_prompts: Positive = 10
    delta: float = Field(DEFAULT_DELTA, gt=0)
    min_clique: Annotated[int, Field(ge=2)] = 5
    grid: Positive = 4
    size: Positive | None = 64


class NoiseNormCheck(Section):
    enabled: bool = True
    steps: Positive = 1
    num_inference_steps: Positive = 50
    samples_per_prompt: Positive = 1
    guidance_scale: float = Field(7.5, ge=0)


class QualityCheck(Section):
    enabled: bool = True
    features: str | Features | None = None  # the name of a copy-detection feature space (vae, pixels64...) or a spec
    kid_subsets: Positive = 50
    kid_subset_size: Annotated[int, Field(ge=2)] = 100


class ReportSection(Section):
    pairs: Annotated[int, Field(ge=0)] = 16


class AuditSection(Section):
    seed: int = Field(0, ge=0)
    device: Device = "auto"
    dtype: DtypeName = "float32"
    analysis_resolution: Positive | None = 256
    max_prompts: Positive | None = 200
    on_error: Literal[ON_ERROR] = "fail"
    cache_dir: ConfigPath | None = None
    generation: Generation = Field(default_factory=Generation)
    features: list[AuditFeatures] = Field(default_factory=lambda: [{"type": "vae", "tau": "heldout"}], min_length=1,
                                          validate_default=True)
    # tau: heldout: 0 gives the largest held-out similarity; 0.01 the threshold 1% of held-out images exceed
    heldout_false_positive_rate: float = Field(0.0, ge=0, lt=1)
    distance_ratio: DistanceRatioCheck = Field(default_factory=DistanceRatioCheck)
    tiled_l2: TiledL2Check = Field(default_factory=TiledL2Check)
    extraction: ExtractionCheck = Field(default_factory=ExtractionCheck)
    noise_norm: NoiseNormCheck = Field(default_factory=NoiseNormCheck)
    quality: QualityCheck = Field(default_factory=QualityCheck)
    report: ReportSection = Field(default_factory=ReportSection)


# --- a whole file --------------------------------------------------------------------------------------------------

class JobConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    data_audit: DataAuditSection = Field(default_factory=DataAuditSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mask: ConfigPath | dict[str, Any] | None = None     # inline, or a mask.json path; --mask overrides it
    space: str | SpaceSection = "reference"  # a preset name, a YAML file with a space section, or the section
    objectives: ObjectivesSection = Field(default_factory=ObjectivesSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    early_stop: EarlyStopSection = Field(default_factory=EarlyStopSection)
    search: SearchSection = Field(default_factory=SearchSection)
    baselines: BaselinesSection = Field(default_factory=BaselinesSection)
    selection: SelectionSection = Field(default_factory=SelectionSection)
    controls: ControlsSection = Field(default_factory=ControlsSection)
    export: ExportSection = Field(default_factory=ExportSection)
    audit: AuditSection = Field(default_factory=AuditSection)

    @field_validator("space", mode="before")  # before: a preset's marked string still knows its folder
    @classmethod
    def _space_file(cls, value, info: ValidationInfo):
        return relative_to_config(value, info) if isinstance(value, str) and value not in SPACE_PRESETS else value

    @field_validator("mask")
    @classmethod
    def _mask(cls, value):
        if isinstance(value, dict):
            from ..masks import Mask

            try:
                Mask.from_dict(value)
            except MemcontrolError as err:
                raise ValueError(str(err).removeprefix("mask: ")) from None
        return value
