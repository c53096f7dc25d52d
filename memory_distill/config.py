"""Frozen configuration models: the only place defaults live.

Every config is a frozen pydantic model with ``extra="forbid"`` so a misspelt key is an error
that names the key and the nearest real one ("did you mean 'epochs'?"). :class:`Settings` reads the same
tree from the environment (``MEMORY_DISTILL_`` prefix, ``__`` between nesting levels), e.g.
``MEMORY_DISTILL_STORE__MODE=http``.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import nearest_name
from .types import is_real

__all__ = [
    "BinsConfig",
    "DistillConfig",
    "EmbedderConfig",
    "GateConfig",
    "JobConfig",
    "Settings",
    "StoreConfig",
    "TeacherConfig",
    "default_home",
]

_C = TypeVar("_C", bound=BaseModel)

_FROZEN = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class _Config(BaseModel):
    """Base of the config models: frozen, no unknown keys; an unknown key's error names the nearest real one."""

    model_config = _FROZEN

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_nearest_key(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as e:
            errors = e.errors()
            if not any(x["type"] == "extra_forbidden" and len(x["loc"]) == 1 for x in errors):
                raise
            fixed: list[InitErrorDetails] = []
            for x in errors:
                msg = x["msg"]
                if x["type"] == "extra_forbidden" and len(x["loc"]) == 1:
                    near = nearest_name(str(x["loc"][0]), cls.model_fields)
                    msg += (f": did you mean {near!r}?" if near else
                            f" ({cls.__name__} takes {', '.join(cls.model_fields)})")
                fixed.append({"type": PydanticCustomError(x["type"], msg.replace("{", "{{").replace("}", "}}")),
                              "loc": x["loc"], "input": x["input"]})
            raise ValidationError.from_exception_data(e.title, fixed) from None


DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The device names a job takes (``JobConfig.device``, ``--device``): what :func:`~memory_distill.models.resolve_device`
resolves."""


def default_home() -> Path:
    """Directory holding the persistent store, artifacts and caches (``$MEMORY_DISTILL_HOME``)."""
    return Path(os.environ.get("MEMORY_DISTILL_HOME", "").strip() or ".memory_distill")  # (set but empty: unset)


class EmbedderConfig(_Config):
    """Which embedder turns episode text into vectors."""

    kind: Literal["auto", "hashing", "openai", "local"] = "auto"
    """``auto`` picks ``openai`` when an API key is configured, else the offline ``hashing`` embedder."""
    model: str = "text-embedding-3-small"
    """OpenAI model name, or the sentence-transformers name/path for ``local``."""
    dim: int | None = Field(default=None, ge=8, le=8192)
    """Output dimension. Hashing default 512; for OpenAI ``text-embedding-3-*`` it is sent as ``dimensions``."""
    api_key: SecretStr | None = None
    """OpenAI API key; falls back to ``$OPENAI_API_KEY``. Never logged."""
    base_url: str | None = None
    """Any OpenAI-compatible endpoint (falls back to ``$OPENAI_BASE_URL``)."""
    batch_size: int = Field(default=2048, ge=1, le=2048)
    """Inputs per embeddings request (the OpenAI API accepts at most 2048)."""
    max_tokens_per_request: int = Field(default=250_000, ge=1000, le=300_000)
    """Estimated token budget per request (API limit ~300k; estimate is conservative)."""
    max_input_chars: int = Field(default=24_000, ge=100)
    """OpenAI: longer texts are embedded in pieces of at most this many characters (8191-token model limit),
    or cut here with ``long_texts="truncate"``."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Per-request timeout in seconds."""
    max_retries: int = Field(default=5, ge=0, le=20)
    """Retries with exponential backoff on 429, 5xx, timeouts and connection errors."""
    max_concurrency: int = Field(default=4, ge=1, le=32)
    """OpenAI: requests in flight at once when a call needs several (large imports, re-embedding a store);
    1 sends them one after the other. Lower it if the account's rate limit answers 429."""
    cache: bool = True
    """Cache embeddings on disk keyed by (embedder name, text hash) so nothing is embedded twice."""
    cache_max_entries: int | None = Field(default=200_000, ge=1)
    """Bound on the cache: past it the entries written longest ago go (200k entries are 1.2 GB at dim 1536);
    ``None`` keeps everything."""
    long_texts: Literal["chunk", "truncate"] = "chunk"
    """``local`` and ``openai``: a text longer than the model reads is embedded in pieces and averaged
    (``chunk``), or cut at the limit (``truncate``)."""


class StoreConfig(_Config):
    """Where memories live (Chroma)."""

    mode: Literal["persistent", "ephemeral", "http"] = "persistent"
    """``persistent``: embedded directory (one process); ``http``: a ``chroma run`` server (many processes)."""
    path: Path | None = None
    """Directory for ``persistent`` mode; default ``<home>/chroma``."""
    host: str = "127.0.0.1"
    """Chroma server host for ``http`` mode."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Chroma server port for ``http`` mode."""
    ssl: bool = False
    """``http`` mode over TLS (``https://``), e.g. a server behind a TLS-terminating proxy on another machine."""
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    """HTTP headers sent with every request in ``http`` mode, e.g. the credentials a proxy or Chroma's auth
    expects: ``MEMORY_DISTILL_STORE__HEADERS='{"Authorization": "Bearer ..."}'``. Never shown in reprs."""
    tenant: str = "default_tenant"
    """Chroma tenant (``http`` mode)."""
    database: str = "default_database"
    """Chroma database within the tenant (``http`` mode); it must exist on the server."""
    collection: str = "memories"
    """Collection name (3-512 chars of ``[a-zA-Z0-9._-]``)."""
    reward_min: float = Field(default=0.0, allow_inf_nan=True)
    """Lowest reward accepted; rewards outside [reward_min, reward_max] are rejected (``-inf``: no lower bound)."""
    reward_max: float = Field(default=1.0, allow_inf_nan=True)
    """Highest reward accepted (``inf``: no upper bound)."""
    write_batch_size: int = Field(default=5000, ge=1, le=5461)
    """Rows per Chroma write (Chroma's maximum batch is 5461)."""
    read_page_size: int = Field(default=5000, ge=1)
    """Rows per page when streaming training rows out of Chroma."""

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]", v):
            raise ValueError(
                f"collection name {v!r} is invalid: use 3-512 characters from [a-zA-Z0-9._-], "
                "starting and ending with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _range(self) -> StoreConfig:
        if not self.reward_min < self.reward_max:
            raise ValueError(
                f"reward_min ({self.reward_min}) must be below reward_max ({self.reward_max})"
            )
        return self


class BinsConfig(_Config):
    """How scalar rewards become 64-bin target distributions."""

    n_bins: int = Field(default=64, ge=2, le=1024)
    """Number of reward bins."""
    low: float | None = None
    """Lower edge of the support; ``None`` fits it once from the data (with ``margin``) and freezes it."""
    high: float | None = None
    """Upper edge of the support; ``None`` fits it from the data."""
    margin: float = Field(default=0.05, ge=0.0, le=1.0)
    """Fraction of the observed range added on each side when fitting the support."""
    target: Literal["hl_gauss", "hard"] = "hl_gauss"
    """``hl_gauss``: Gaussian-smoothed histogram targets (Farebrother et al. 2024); ``hard``: one-hot bin."""
    sigma_ratio: float = Field(default=0.75, gt=0.0, le=10.0)
    """HL-Gauss sigma as a multiple of the bin width."""

    @model_validator(mode="after")
    def _support(self) -> BinsConfig:
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}): they are the reward support's "
                             "edges (leave both None to fit them from the data)")
        return self


class TeacherConfig(_Config):
    """Phase 1: the teacher MLP trained on rewarded memories."""

    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (1024, 512, 256, 128)
    """Hidden layer widths (``()``: a linear model)."""
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Dropout after each hidden layer."""
    batchnorm: bool = True
    """BatchNorm after each hidden Linear."""
    epochs: int = Field(default=30, ge=1)
    """Maximum epochs (early stopping usually ends sooner)."""
    batch_size: int = Field(default=256, ge=2)
    """Maximum minibatch size; small datasets use smaller batches so an epoch takes >= ``min_steps`` steps."""
    min_steps: int = Field(default=16, ge=1)
    """Minimum optimizer steps per epoch (caps the batch size on small datasets, never below 16 rows)."""
    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=1e-2, ge=0)
    """AdamW weight decay."""
    patience: int = Field(default=5, ge=1)
    """Epochs without validation improvement before stopping (best weights are restored)."""


class DistillConfig(_Config):
    """Phase 2: distilling the teacher into the compact student."""

    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (256, 128)
    """Student hidden layer widths (``()``: a linear model)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout after each student hidden layer."""
    temperature: float = Field(default=4.0, gt=0)
    """Softmax temperature T for soft targets; the KL term is scaled by T^2."""
    alpha: float = Field(default=0.7, ge=0)
    """Weight of KL(teacher_T || student_T) * T^2."""
    beta: float = Field(default=0.3, ge=0)
    """Weight of the cross-entropy to the reward targets (rewarded memories only)."""
    epochs: int = Field(default=30, ge=1)
    """Maximum distillation epochs."""
    batch_size: int = Field(default=256, ge=2)
    """Maximum minibatch size; small datasets use smaller batches so an epoch takes >= ``min_steps`` steps."""
    min_steps: int = Field(default=16, ge=1)
    """Minimum optimizer steps per epoch (caps the batch size on small datasets, never below 16 rows)."""
    lr: float = Field(default=2e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=1e-4, ge=0)
    """AdamW weight decay."""
    patience: int = Field(default=5, ge=1)
    """Epochs without validation improvement before stopping."""
    curriculum: Literal["uniform", "easy_to_hard", "hard_to_easy", "adaptive", "sec_bandit"] = "uniform"
    """Which memories each step distills on (see :mod:`memory_distill.curriculum`)."""
    adaptive_teaching: bool = False
    """Down-weight memories the student already agrees on; corrective weight on disagreements."""
    agreement_threshold: float = Field(default=0.8, gt=0, le=1)
    """Similarity exp(-KL(teacher || student)) above which the student counts as agreeing."""

    @model_validator(mode="after")
    def _weights(self) -> DistillConfig:
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: set alpha > 0 (KL) and/or beta > 0 (CE)")
        return self


class GateConfig(_Config):
    """When a new student may replace the published one."""

    metric: Literal["spearman", "mae", "nll", "crps"] = "spearman"
    """Metric compared on the held-out slice (higher is better for spearman, lower for mae/nll/crps). ``crps`` judges
    the whole predicted distribution in reward units: a tolerance of 0.02 is about a tenth of a typical value."""
    tolerance: float = Field(default=0.02, ge=0)
    """Allowed regression: the candidate may be at most this much worse than the incumbent."""
    holdout_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    """Fraction of the most recent rewarded memories held out for evaluation and gating."""
    min_holdout: int = Field(default=20, ge=1)
    """Below this many held-out memories the gate passes a first model and refuses a replacement."""


class JobConfig(_Config):
    """One consolidation run."""

    bins: BinsConfig = BinsConfig()
    """Reward binning."""
    teacher: TeacherConfig = TeacherConfig()
    """Teacher training."""
    distill: DistillConfig = DistillConfig()
    """Student distillation."""
    gate: GateConfig = GateConfig()
    """Promotion gate."""
    seed: int = Field(default=0, ge=0)
    """Seed for splits, initialisation and sampling: same data + seed -> same model."""
    device: str = "auto"
    """``auto`` uses CUDA when available; ``cpu``, ``cuda`` or ``cuda:N`` (one GPU of several)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads torch may use during the run (``None``: torch's default, every core). Set it when the job
    shares the machine with agents, e.g. a worker in the agent's process: ``threads=1`` leaves the other cores to
    them. Torch's thread count is process-wide: it is set for the run and restored afterwards."""
    min_rewarded: int = Field(default=20, ge=2)
    """Refuse to train on fewer rewarded memories than this."""
    keep_versions: int | None = Field(default=20, ge=1)
    """After each run, delete all but this many newest model versions of the registry (never the current one,
    nor the one ``rollback`` would restore): a worker publishing every few minutes would otherwise fill the
    disk (a version at dim 1536 holds 11 MB of weights plus 4 MB of training ids per 100k memories). ``None``
    keeps every version, except stale ones (trained on forgotten memories), which are deleted once they do not
    serve whatever this says."""
    warm_start: bool = False
    """Initialise from the published models (same shapes and bins) instead of from scratch; either way the run
    trains on every stored memory. Off by default: on the real data a warm-started second run ranked unseen
    episodes worse than one from scratch (Spearman -0.012 [-0.024, -0.001] over 4 datasets and 10 seeds, lower in
    25 of 40 runs; BENCHMARKS.md, "Warm start vs from scratch"), tied on best-of-n, kept its ranking barely closer
    to the published model's, and saved 0.7 s. Its early stopping watches validation groups the published model has already
    fit. From scratch, a run on unchanged memories reproduces the published model (same seed)."""
    namespace: str | None = None
    """Train on one namespace only (``None``: all). Its models are published, gated and served from their
    own registry (``ArtifactRegistry.scoped(namespace)``), apart from other namespaces' and the top-level one."""
    text_features: bool = True
    """Let the models see four text statistics next to the embedding (log1p of characters, words, line
    breaks, distinct words; :mod:`memory_distill.features`). Embeddings are normalised and lose length,
    which real judges reward; ``False`` trains on the embedding alone."""
    ranking: bool = True
    """When memories carry a ``group`` (answers to the same prompt), also fit the student's
    within-group ranking head for best-of-n (:mod:`memory_distill.ranking`): a fixed-effects ridge
    on the student's inputs plus a stacked weight on its expected reward. Predictions then carry
    ``advantage`` and ``best_of_n`` ranks by it."""
    histogram_mix: bool = True
    """Serve the student's distribution mixed with the training rewards' histogram, ``(1 - w) * student + w *
    histogram``, with ``w`` in 0-0.9 chosen on the validation groups by CRPS (``w = 0``: no mix;
    :func:`memory_distill.evaluate.fit_histogram_mix`). It tempers a student surer on new groups than it has
    reason to be, and keeps the order of the expected rewards, so rankings and best-of-n do not change. On the real
    data it lowers Reflexion's held-out CRPS and calibration error and changes little elsewhere (BENCHMARKS.md,
    "The predicted distribution"). ``False`` serves the distribution as distilled."""
    metadata_features: tuple[str, ...] = ()
    """Metadata keys whose values the models read as categories, e.g. ``("agent",)`` or
    ``("tool", "prompt_version")``: which agent, tool or prompt produced an episode is often what
    decides its reward. Each value seen in at least two training memories gets a 0/1 input (at most
    64 per key); a memory without the key, or with a value not yet trained on, reads as the training
    average. Predictions
    then take the same metadata (``Predictor.predict(texts, metadata=...)``, a ``Document``'s
    metadata in the scorer, a stored memory's in the retriever). A key that no training memory has
    adds nothing; consolidation logs a warning naming the nearest key the memories do have, and a
    prediction given a near miss of a feature key (``tol`` for ``tool``) warns once."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_NAMES.fullmatch(v):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (the N-th GPU), got {v!r}")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"namespace {v!r} is empty: give a namespace's name, or None to train on all of them")
        return v

    @field_validator("metadata_features", mode="before")
    @classmethod
    def _one_key(cls, v: Any) -> Any:  # metadata_features="agent": one key, not the letters of one
        return (v,) if isinstance(v, str) else v

    @field_validator("metadata_features")
    @classmethod
    def _check_metadata_features(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for k in v:
            if not k or k.startswith("_md_") or k == "group":
                raise ValueError(f"metadata_features: {k!r} cannot be a feature; use your own metadata keys "
                                 "(not empty, not 'group', not starting with '_md_')")
        if len(set(v)) != len(v):
            raise ValueError(f"metadata_features: {list(v)} lists a key twice; list each key once")
        return v


def as_config(value: Any, cls: type[_C], name: str) -> _C:
    """``value`` as a ``cls`` config: itself, ``cls()`` for ``None``, or built from a dict of its fields (a misspelt
    one is an error naming the nearest); anything else is a TypeError naming ``name``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def seconds(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A duration given as seconds (a number) or as text (``"10m"``, :func:`parse_duration`): finite and > 0
    (>= 0 with ``allow_zero``); anything else is an error naming ``name``."""
    if isinstance(value, str):
        try:
            value = parse_duration(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if not is_real(value):
        raise TypeError(f"{name} must be seconds (a number) or a duration like '10m', got {type(value).__name__}")
    out = float(value)  # (numpy numbers too)
    if not (math.isfinite(out) and (out >= 0 if allow_zero else out > 0)):
        raise ValueError(f"{name} must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}, got {value}")
    return out


def parse_duration(text: str) -> float:
    """Seconds in ``"30s"``, ``"10m"``, ``"2h"``, ``"90d"`` (or a bare number of seconds); ``ValueError`` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 2h, 90d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


_ENV_PREFIX = "MEMORY_DISTILL_"
_ENV_NOT_SETTINGS = {"FAULT"}  # MEMORY_DISTILL_FAULT: crash-safety tests' fault injection (memory_distill._faults)


def _check_env_names(settings: type[BaseSettings]) -> None:
    """A ``MEMORY_DISTILL_*`` variable whose first part names no setting is an error naming the nearest one.

    pydantic-settings reads only the variables that name a field, so a typo in the first part
    (``MEMORY_DISTILL_JOBB__TEACHER__EPOCHS``) would silently change nothing; typos further down are
    already errors (``_Config``)."""
    fields = [f.upper() for f in settings.model_fields]
    for key in sorted(os.environ):
        if not key.upper().startswith(_ENV_PREFIX):
            continue
        head = key[len(_ENV_PREFIX):].split("__")[0].upper()
        if head in fields or head in _ENV_NOT_SETTINGS:
            continue
        near = nearest_name(head, fields)
        hint = (f"did you mean {_ENV_PREFIX + near + key[len(_ENV_PREFIX) + len(head):]}?" if near else
                f"the settings are {', '.join(_ENV_PREFIX + f for f in fields)} (nested parts after '__')")
        raise ValueError(f"environment variable {key} is not a memory_distill setting: {hint}")


def _takes_json(annotation: Any) -> bool:
    """Whether pydantic-settings reads an environment variable for this field as JSON (a list, a dict, a model)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_json(a) for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return origin in (list, tuple, dict, set, frozenset) or (isinstance(origin, type) and issubclass(origin, BaseModel))


def _env_json_error(settings: type[BaseSettings]) -> str | None:
    """The ``MEMORY_DISTILL_*`` variable whose value pydantic-settings could not parse as JSON, and the fix
    (its own error names only the top-level field: 'error parsing value for field "job"')."""
    for key in sorted(os.environ):
        if not key.upper().startswith(_ENV_PREFIX):
            continue
        model: Any = settings
        annotation: Any = None
        for part in key[len(_ENV_PREFIX):].lower().split("__"):
            fields = getattr(model, "model_fields", None)
            if not fields or part not in fields:
                annotation = None
                break
            annotation = fields[part].annotation
            model = annotation
        if annotation is None or not _takes_json(annotation):
            continue
        try:
            json.loads(os.environ[key])
        except ValueError:  # (the value is not shown: it may be credentials)
            origin = typing.get_origin(annotation) or annotation
            kind = "list" if origin in (list, tuple, set, frozenset) else "object"
            example = _ENV_JSON_EXAMPLES.get(part, '["..."]' if kind == "list" else '{"...": ...}')
            return f"environment variable {key} is not JSON: this setting takes a JSON {kind}, e.g. {key}='{example}'"
    return None


_ENV_JSON_EXAMPLES = {"metadata_features": '["agent"]', "hidden": "[256, 128]",
                      "headers": '{"Authorization": "Bearer ..."}'}


class Settings(BaseSettings):
    """Everything, readable from ``MEMORY_DISTILL_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="MEMORY_DISTILL_",
        env_nested_delimiter="__",
        env_ignore_empty=True,  # MEMORY_DISTILL_HOME= (set but empty) is unset, as in most tools, not "" or an error
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_env_names(type(self))
        try:
            super().__init__(*args, **kwargs)
        except SettingsError as e:
            raise ValueError(_env_json_error(type(self)) or str(e)) from e

    home: Path = Field(default_factory=default_home)
    """Root directory for the persistent store, artifacts and caches."""

    @field_validator("home", mode="before")
    @classmethod
    def _home(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():  # (Path("") is the working directory itself)
            raise ValueError("home is empty: give a directory path (default ./.memory_distill)")
        return v
    embedder: EmbedderConfig = EmbedderConfig()
    """Embedder settings."""
    store: StoreConfig = StoreConfig()
    """Chroma store settings."""
    job: JobConfig = JobConfig()
    """Consolidation settings."""

    @property
    def store_path(self) -> Path:
        return self.store.path or (self.home / "chroma")

    @property
    def artifacts_path(self) -> Path:
        return self.home / "artifacts"

    @property
    def cache_path(self) -> Path:
        return self.home / "embedding_cache.sqlite"
