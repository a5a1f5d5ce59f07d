"""The augmented robustness track: ten weak imaging artifacts per image, reproducible to the pixel."""

from augment.catalog import DEFAULT_ARTIFACTS_PATH, ArtifactCatalog, CatalogError, load_artifact_catalog
from augment.frames import frame_plan
from augment.render import decode_image, replay_variant, step_seed
from augment.sheet import contact_sheet
from augment.track import AUGMENT_COLUMNS, RenderSettings, augment_images, render_chunk, run_in_processes

__all__ = ["AUGMENT_COLUMNS", "DEFAULT_ARTIFACTS_PATH", "ArtifactCatalog", "CatalogError", "RenderSettings",
           "augment_images", "contact_sheet", "decode_image", "frame_plan", "load_artifact_catalog", "render_chunk",
           "replay_variant", "run_in_processes", "step_seed"]
