"""The generation stages: facts -> plans (what each pair asks) -> realised, grounded QA pairs."""

from __future__ import annotations

from pathlib import Path

from kvqa.catalog import load_catalog
from kvqa.config import Config
from kvqa.fanout import task_count
from kvqa.reconcile import by_reason, reconcile, reconcile_ids
from kvqa.stage import Stage, StageRun, failed_requests_redo
from kvqa.tables import write_table
from generate.grounding import LLM_PROMPTS, GroundingChecker
from generate.plans import ADDITIONS_FILE, class_additions, compose_plans
from generate.prompts import prompt_files
from generate.quality import rejection_problem
from generate.realize import image_chunks, in_plan_order, make_backend, realize_chunk, realize_plans
from generate.second_opinion import STAGE as SECOND_OPINION

USAGE_FILE = "llm_usage.jsonl"  # the run's LLM usage ledger (generate.llm.UsageLedger)
# The `vllm` backend's in-process engine decides the replies with its own libraries (absent: keyed as such).
# A server's versions are not in any key: its replies are cached by the request, model named.
ENGINE_LIBRARIES = ("vllm", "torch", "transformers")
# Every LLM prompt: the backends send theirs, and the grounding check reads all of them (a question that
# echoes a prompt is rejected).
PROMPT_FILES = prompt_files(*LLM_PROMPTS, SECOND_OPINION)


def llm_caches(section: str):
    """What an LLM stage (its config section: `generate`, `explain`) keeps across runs, every entry keyed by
    its own request: the request cache, the Batch API's request files and the usage ledger (appended, never
    read back into a table)."""
    def caches(run: StageRun) -> list[Path]:
        llm = getattr(run.cfg, section).llm
        return [Path(llm.cache_dir or run.cfg.output_root / "llm-cache"), Path(llm.batch_dir or run.run_dir / "batch"),
                run.run_dir / USAGE_FILE]
    return caches


def too_many_rejected(cfg: Config, summary: dict) -> str | None:
    return rejection_problem(summary["plans"], summary["by_reason"], cfg.generate.max_rejected_share)


def plans(run: StageRun) -> tuple[dict, list[str]]:
    """Which facts each QA pair covers (`stages/plans.parquet`), seeded per image."""
    facts = run.table("stages/facts.parquet")
    table = compose_plans(facts, run.cfg.plans, run.cfg.seed, class_additions(run.run_dir))
    reconcile("level-1 plans vs facts", len(facts), int((table["complexity"] == 1).sum()))
    write_table(table, run.run_dir / "stages/plans.parquet")
    levels = {int(k): int(v) for k, v in table["complexity"].value_counts().sort_index().items()}
    return {"plans": len(table), "per_level": levels}, list(PLANS.outputs)


def generate(run: StageRun) -> tuple[dict, list[str]]:
    """Realise every plan as a QA pair with the configured backend; a pair the grounding check rejects is
    quarantined with its reason (`stages/qa.parquet`, `stages/quarantine_generate.parquet`)."""
    cfg = run.cfg
    catalog = load_catalog(cfg.catalog)
    facts, table = run.table("stages/facts.parquet"), run.table("stages/plans.parquet")
    if run.runners.map is not None and cfg.generate.backend == "template":
        # LLM backends stay in this process: their requests are concurrent already, and one client holds
        # the cache, the rate limits and the endpoint routing.
        chunks = image_chunks(table, facts, task_count(len(table), cfg.runner.n_workers, cfg.runner.chunks_per_worker))
        parts = run.runners.map("realize", realize_chunk, chunks, cfg.generate, catalog, cfg.seed)
        qa, rejected = in_plan_order(table, parts)
        usage, failed, second = {}, 0, None  # the template backend sends no requests
    else:
        backend = make_backend(cfg.generate, catalog, cfg.seed, cache_dir=cfg.output_root / "llm-cache",
                               batch_dir=run.run_dir / "batch", usage_file=run.run_dir / USAGE_FILE)
        qa, rejected = realize_plans(table, facts, backend, GroundingChecker(catalog))
        usage = getattr(backend, "usage", {})
        failed = backend.client.failed_requests() if usage else 0
        second = backend.second_opinion_stats
    reconcile_ids("plans", table["plan_id"], qa.loc[qa["paraphrase_of"] == "", "qa_id"], rejected["key"])
    write_table(qa, run.run_dir / "stages/qa.parquet")
    write_table(rejected, run.run_dir / "stages/quarantine_generate.parquet")
    return ({"plans": len(table), "qa": len(qa), "rejected": len(rejected), "by_reason": by_reason(rejected),
             "llm_usage": usage, "failed_requests": failed,
             **({"second_opinion": second.as_dict()} if second is not None else {})}, list(GENERATE.outputs))


PLANS = Stage("plans", plans, packages=("generate",), config=("plans", "seed"),
              tables=("stages/facts.parquet", ADDITIONS_FILE), outputs=("stages/plans.parquet",))
# A Batch API result file is an input (its replies are the rows); where the caches live is not.
GENERATE = Stage("generate", generate, packages=("generate",), config=("generate", "seed"),
                 unkeyed=("generate.max_rejected_share", "generate.llm.cache_dir", "generate.llm.batch_dir"),
                 tables=("stages/facts.parquet", "stages/plans.parquet"),
                 data=("config:catalog", *PROMPT_FILES, "config:generate.llm.batch_results"),
                 libraries=ENGINE_LIBRARIES, caches=llm_caches("generate"), outputs=("stages/qa.parquet", "stages/quarantine_generate.parquet"),
                 redo=failed_requests_redo, rejection=too_many_rejected)
