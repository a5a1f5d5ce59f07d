"""The explain stages: a grounded explanation and the source boxes per kept QA row, and the Medico 2026
subtask-2 files made from a built release."""

from __future__ import annotations


import pandas as pd

from explain import EXPLANATION_COLUMNS, explain_rows, load_phrasings, make_explainer, mask_index
from explain.medico import SUBMISSION_NAME, VAL_SET_NAME, export_task2
from generate.grounding import GroundingChecker
from generate.grounding import LLM_PROMPTS
from generate.prompts import prompt_files
from generate.quality import rejection_problem
from generate.stages import ENGINE_LIBRARIES, USAGE_FILE, llm_caches
from kvqa.catalog import load_catalog
from kvqa.config import Config
from kvqa.errors import BadInput
from kvqa.reconcile import by_reason, reconcile_ids
from kvqa.stage import Stage, StageRun, failed_requests_redo
from kvqa.tables import quarantine_frame, write_table

MEDICO_DIR = "export/medico-task2"


def explain(run: StageRun) -> tuple[dict, list[str]]:
    """A grounded explanation and the source boxes per kept QA row (see `explain.explain`)."""
    cfg, ex = run.cfg, run.cfg.explain
    qa = run.table("stages/qa_dedup.parquet")
    table, rejected = pd.DataFrame(columns=EXPLANATION_COLUMNS), quarantine_frame([])
    usage, failed = {}, 0
    if ex.enabled:
        catalog = load_catalog(cfg.catalog)
        phrasings = load_phrasings(ex.phrasings, catalog)
        backend = make_explainer(ex.backend, ex.llm, catalog, phrasings, cfg.seed,
                                 cache_dir=cfg.output_root / "llm-cache", batch_dir=run.run_dir / "batch",
                                 usage_file=run.run_dir / USAGE_FILE)
        masks = {s.name: s.masks_dir for s in cfg.sources if getattr(s, "masks_dir", None)}
        table, rejected = explain_rows(qa, run.table("stages/plans.parquet"), run.table("stages/facts.parquet"),
                                       backend, GroundingChecker(catalog), phrasings, mask_index(masks))
        usage = getattr(backend, "usage", {})
        failed = backend.client.failed_requests() if usage else 0
        reconcile_ids("QA rows explained", qa["qa_id"], table["qa_id"], rejected["key"])
    write_table(table, run.run_dir / "stages/explanations.parquet")
    write_table(rejected, run.run_dir / "stages/quarantine_explain.parquet")
    return ({"enabled": ex.enabled, "rows": len(qa), "explained": len(table), "rejected": len(rejected),
             "with_boxes": int(table["visual_explanation"].map(len).gt(0).sum()),
             "with_masks": int(table["segmentation_mask"].astype(bool).sum()),
             "by_reason": by_reason(rejected), "llm_usage": usage, "failed_requests": failed}, list(EXPLAIN.outputs))


def too_many_rejected(cfg: Config, summary: dict) -> str | None:
    return rejection_problem(summary["rows"], summary["by_reason"], cfg.explain.max_rejected_share, "QA rows",
                             "explain")


def task2_inputs(run: StageRun) -> list[str]:
    """What the export loads (`datasets`): the card (its `configs:` header) and the `data` and `explanations`
    configs' shards, not the augmented track."""
    release = run.run_dir / "release"
    return sorted(str(p.relative_to(run.run_dir)) for p in [release / "README.md", *(release / "data").glob("*"),
                                                            *(release / "explanations").glob("*")] if p.is_file())


def medico_task2(run: StageRun) -> tuple[dict, list[str]]:
    """`export/medico-task2/` (val_set_task2/, submission_task2.jsonl, visuals/) from the release's test shards."""
    if not any(s.startswith("release/data/test-") for s in task2_inputs(run)):
        raise BadInput(f"no test split in {run.run_dir / 'release'}/data: build the run first (kvqa build)")
    out = run.run_dir / MEDICO_DIR
    summary = export_task2(run.run_dir / "release", out)
    files = sorted(str(p.relative_to(run.run_dir)) for p in out.rglob("*") if p.is_file())
    return {**summary, "folder": MEDICO_DIR, "val_set": f"{MEDICO_DIR}/{VAL_SET_NAME}",
            "submission": f"{MEDICO_DIR}/{SUBMISSION_NAME}"}, files


EXPLAIN = Stage("explain", explain, packages=("explain",), config=("explain", "seed"),
                # (the LLM settings only generation uses, and where the caches live, decide nothing here)
                unkeyed=("explain.max_rejected_share", "explain.llm.cache_dir", "explain.llm.batch_dir",
                         "explain.llm.verify", "explain.llm.naturalize_variants", "explain.llm.second_opinion"),
                tables=("stages/qa_dedup.parquet", "stages/plans.parquet", "stages/facts.parquet"),
                # (every prompt the grounding check reads: its echo check)
                data=("config:catalog", "config:explain.phrasings", *prompt_files(*LLM_PROMPTS),
                      "config:explain.llm.batch_results"),
                listings=("config:sources.masks_dir",),  # the mask files linked, by name (their bytes: the release)
                caches=llm_caches("explain"), outputs=("stages/explanations.parquet", "stages/quarantine_explain.parquet"),
                redo=failed_requests_redo, rejection=too_many_rejected, libraries=("pillow", *ENGINE_LIBRARIES))
MEDICO_TASK2 = Stage("medico_task2", medico_task2, packages=("explain",), run_inputs=task2_inputs,
                     libraries=("datasets", "pillow", "scipy"))
