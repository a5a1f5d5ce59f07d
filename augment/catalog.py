"""The artifact catalog (`augment/artifacts.yaml`): the weak base and the ten named imaging artifacts.

The catalog is data the user edits; this module validates it before any image is touched. Every step is
built once, at load time, with albumentations' own parameter validation (strict: an unknown argument is an
error, and so is a value albumentations would silently adjust), so a typo fails in one line naming the
artifact rather than deep inside a worker process.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import
# albumentations imports its torch integration (ToTensorV2) whenever torch is installed, inside
# `suppress(ImportError)`: that is 2 of the 3.5 s its import takes, in every `kvqa` command, augment worker
# and fork server, for a class the catalog never uses (it takes image-only and dual transforms). A None
# entry in sys.modules makes that one import fail, as albumentations expects without torch.
sys.modules.setdefault("albumentations.pytorch", None)  # type: ignore[arg-type]

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402

from kvqa.tables import stable_hash  # noqa: E402

DEFAULT_ARTIFACTS_PATH = Path(__file__).resolve().parent / "artifacts.yaml"
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
# A size used to validate the catalog at load time; the real size of each image is filled in per image.
_PROBE_SIZE = (576, 720)


class CatalogError(ValueError):
    """The artifact catalog names an unknown transform or a parameter albumentations rejects."""


class StepSpec(BaseModel):
    """One albumentations transform with its parameters, as written in the catalog."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]*$")
    transform: str
    params: dict[str, Any] = Field(default_factory=dict)
    p: float = Field(default=1.0, ge=0.0, le=1.0)
    input_size: str | None = None
    input_aspect: str | None = None

    @property
    def geometric(self) -> bool:
        """The step moves pixels (albumentations' dual transforms: crops, affine maps), so it moves boxes too;
        the others change only pixel values."""
        return issubclass(getattr(A, self.transform), A.DualTransform)

    def init_args(self, height: int, width: int) -> dict[str, Any]:
        """The keyword arguments for this image's size: what the record stores and replay rebuilds from."""
        args = {k: _interpolation(k, v) for k, v in self.params.items()}
        if self.input_size:
            args[self.input_size] = [height, width]
        if self.input_aspect:
            low, high = args[self.input_aspect]
            args[self.input_aspect] = [low * width / height, high * width / height]
        return {**args, "p": self.p}


def _interpolation(key: str, value: Any) -> Any:
    """cv2 interpolation names -> constants, for `interpolation` and `interpolation_pair` values."""
    if isinstance(value, dict) and "interpolation" in key:
        return {k: _interpolation(key, v) for k, v in value.items()}
    if "interpolation" in key and isinstance(value, str):
        if value not in INTERPOLATIONS:
            raise CatalogError(f"unknown interpolation {value!r} (one of {sorted(INTERPOLATIONS)})")
        return INTERPOLATIONS[value]
    return value


def build_transform(transform: str, init: dict[str, Any]) -> A.BasicTransform:
    """Instantiate an albumentations transform from its class name and keyword arguments, strictly."""
    cls = getattr(A, transform, None)
    if not (isinstance(cls, type) and issubclass(cls, A.ImageOnlyTransform | A.DualTransform)):
        raise CatalogError(f"unknown transform {transform!r}: albumentations {A.__version__} has no such "
                           "image transform")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in init.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Range ... automatically adjusted" is a bad parameter
        try:
            return cls(**args, strict=True)
        except (ValidationError, ValueError, TypeError, UserWarning) as err:
            raise CatalogError(f"bad parameters for {transform}: {err}") from err


class ArtifactCatalog(BaseModel):
    """The weak base applied to every variant, and the artifacts: variant k = base + artifacts[k]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    base: list[StepSpec]
    artifacts: list[StepSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "ArtifactCatalog":
        names = [s.name for s in (*self.base, *self.artifacts)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"step names must be unique, repeated: {dupes}")
        return self

    @property
    def digest(self) -> str:
        return stable_hash(self.model_dump_json())[:16]

    def steps(self, variant: int) -> list[StepSpec]:
        return [*self.base, self.artifacts[variant]]


def load_artifact_catalog(path: Path | str = DEFAULT_ARTIFACTS_PATH) -> ArtifactCatalog:
    """Load and fully validate the catalog; raise CatalogError naming the offending step."""
    path = Path(path)
    try:
        catalog = ArtifactCatalog.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise CatalogError(f"{path}: {err}") from err
    for spec in (*catalog.base, *catalog.artifacts):
        try:
            build_transform(spec.transform, spec.init_args(*_PROBE_SIZE))
        except (CatalogError, KeyError, ValueError, TypeError) as err:
            raise CatalogError(f"{path}: step {spec.name!r}: {err}") from err
    return catalog
