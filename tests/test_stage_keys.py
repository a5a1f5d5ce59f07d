"""The stage contract holds: every stage's key covers what its build reads, and nothing else redoes it.

- `test_every_build_reads_only_what_it_declares` runs every stage's build on a copy of the sample build
  under an audit hook (files opened), a tracer (code run) and a recorder of config reads, and lists every
  file, code or config field a build used that its `Stage` declaration does not name: a data file nobody
  keyed (the report's reference YAML once), logic left in `flows/`, a library whose version is in no key;
  `test_llm_builds_read_only_what_they_declare` does the same for the LLM path against the stand-in.
- `test_each_declared_input_changes_exactly_the_stages_that_declare_it` changes every input one at a time
  (a byte appended to a data file, a run table written again, a no-op edit of every `.py` of every stage
  package, a summary, a parameter) and checks that exactly the stages that declare it get a new key.
- `test_a_rebuild_redoes_exactly_the_stages_that_read_what_changed` does it end to end with the CLI in a copy
  of the project: the report's reference YAML, a flow, augment's render code and another augment module.
- `test_flows_hold_no_stage_bodies` is the lint that keeps output-deciding logic out of `flows/`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from augment.stages import AUGMENT
from augment.track import render_chunk
from explain.stages import MEDICO_TASK2
from flows.build_release import RELEASE_STAGES
from kvqa import stage as contract
from kvqa.catalog import load_catalog
from kvqa.config import SAMPLE_CONFIG_PATH, load_config, public_config_yaml
from kvqa import config as config_models
from kvqa.stage import (BASE_LIBRARIES, HOW_NOT_WHAT, STAGE_PACKAGES, Runners, StageRun, data_paths, key_digest,
                        non_deciding_libraries, run_input_paths, stage_key, stage_packages)

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = (*RELEASE_STAGES, MEDICO_TASK2)
# What runs a build's code here besides the build itself: the test harness (pytest's log capture handles
# every record a build logs) and this test's own tracer.
HARNESS = frozenset({"pytest", "pluggy", "iniconfig", "setuptools"})
SITES = sorted({Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")})
PREFIX = Path(sys.prefix).resolve()  # the environment (a venv inside the project is not the project)
# Functions the import system calls on every import (a library's meta path finder): that they ran says
# nothing about what a build computes.
IMPORT_HOOKS = {"find_spec", "find_module", "find_distributions", "invalidate_caches", "create_module",
                "exec_module"}


def _dist_of_top_level() -> dict[str, set[str]]:
    return {top: {d.lower().replace("_", "-") for d in dists}
            for top, dists in metadata.packages_distributions().items()}


DISTS = _dist_of_top_level()


class Tracer:
    """Files opened for reading (audit hook; parquet files, which pyarrow opens in C++ where no audit event
    fires, at pyarrow's entry points) and source files whose code ran (a trace function that only sees
    calls), in this process and its new threads, between enter and exit."""

    PARQUET_READERS = ("read_table", "read_metadata", "read_schema")  # functions of pyarrow.parquet
    PARQUET_CLASSES = ("ParquetFile", "ParquetDataset")  # classes of it, given the source first

    active: "Tracer | None" = None
    hooked = False

    def __init__(self):
        self.opened: set[Path] = set()
        self.code: set[str] = set()
        self._seen: set = set()

    @classmethod
    def _audit(cls, event, args):
        tracer = cls.active
        if tracer is None or event != "open":
            return
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR))
        if not writing:
            tracer.opened.add(Path(os.fsdecode(path)).absolute())

    def _trace(self, frame, event, arg):
        code = frame.f_code
        if code not in self._seen and not threading.current_thread().name.endswith("(process_request_thread)"):
            # (the loopback stand-in's request threads are the test's server, not the build)
            self._seen.add(code)
            if code.co_name not in IMPORT_HOOKS:
                self.code.add(code.co_filename)
        return None

    def _note(self, source) -> None:
        if isinstance(source, (str, os.PathLike)):
            self.opened.add(Path(source).absolute())

    def _recording(self, real):
        def read(source, *args, **kwargs):
            self._note(source)
            return real(source, *args, **kwargs)
        return read

    def _recording_init(self, real):
        def init(obj, source, *args, **kwargs):
            self._note(source)
            return real(obj, source, *args, **kwargs)
        return init

    def __enter__(self):
        import pyarrow.parquet as pq

        if not Tracer.hooked:
            sys.addaudithook(Tracer._audit)
            Tracer.hooked = True
        Tracer.active = self
        self._real = {name: getattr(pq, name) for name in self.PARQUET_READERS}
        self._real_init = {name: getattr(pq, name).__init__ for name in self.PARQUET_CLASSES}
        for name, real in self._real.items():
            setattr(pq, name, self._recording(real))
        for name, real in self._real_init.items():
            setattr(getattr(pq, name), "__init__", self._recording_init(real))
        threading.settrace(self._trace)
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        import pyarrow.parquet as pq

        sys.settrace(None)
        threading.settrace(None)
        Tracer.active = None
        for name, real in self._real.items():
            setattr(pq, name, real)
        for name, real in self._real_init.items():
            setattr(getattr(pq, name), "__init__", real)


class ConfigReads:
    """The config fields a build reads: every config model's attribute reads are recorded by dotted path
    (`sources.max_pixels` for a field of any source); a whole model dumped (`model_dump`, `model_copy`) is a
    read of all of it (`generate.llm.*`). Walking from one model to another reads nothing."""

    WHOLE = ("model_dump", "model_dump_json", "model_copy", "__iter__", "__eq__", "__hash__")

    def __init__(self, cfg):
        self.paths: dict[int, str] = {}
        self.read: set[str] = set()
        self._walk(cfg, "")

    def _walk(self, obj, path: str) -> None:
        if isinstance(obj, config_models._Strict):
            self.paths[id(obj)] = path
            for name in type(obj).model_fields:
                self._walk(getattr(obj, name), f"{path}.{name}" if path else name)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self._walk(item, path)

    def __enter__(self):
        real = self.real = config_models._Strict.__getattribute__
        reads = self

        def recorded(model, name):
            value = real(model, name)
            path = reads.paths.get(id(model))
            if path is not None:
                if name in reads.WHOLE:
                    reads.read.add(f"{path}.*" if path else "*")
                elif name in type(model).model_fields and not isinstance(value, config_models._Strict) and not (
                        isinstance(value, (list, tuple)) and value and isinstance(value[0], config_models._Strict)):
                    reads.read.add(f"{path}.{name}" if path else name)
            return value

        config_models._Strict.__getattribute__ = recorded
        return self

    def __exit__(self, *exc):
        config_models._Strict.__getattribute__ = self.real


def undeclared_config(stage, read: set[str]) -> list[str]:
    """The fields read that neither the declaration (config, unkeyed, `config:` data and listings) nor
    `HOW_NOT_WHAT` names: a field is covered by itself or a declared section above it."""
    declared = [*stage.config, *stage.unkeyed, *HOW_NOT_WHAT,
                *(e[len("config:"):] for e in (*stage.data, *stage.listings) if e.startswith("config:"))]
    return [f"read config {p} (not declared)" for p in sorted(read)
            if not any(p.removesuffix(".*") == d or p.startswith(d + ".") for d in declared)]


def site_of(path: Path) -> Path | None:
    return next((s for s in SITES if within(path, [s])), None)


def distributions(path: Path) -> set[str]:
    """The distributions that may have installed a file under site-packages (by its top-level module or
    folder: `cv2` comes from any of the OpenCV wheels); empty for packaging metadata."""
    rel = path.relative_to(site_of(path))
    top = rel.parts[0].removesuffix(".py")
    if top.endswith((".dist-info", ".egg-info", ".pth")) or top.startswith("__editable__"):
        return set()
    return DISTS.get(top) or DISTS.get(top.split(".")[0]) or {top.lower().replace("_", "-")}


def within(path: Path, roots) -> bool:
    return any(path == r or r in path.parents for r in roots)


def problems_of(stage, run: StageRun, tracer: Tracer, outputs: list[str]) -> list[str]:
    """What a build read or ran that its declaration does not name."""
    allowed_packages = set(stage_packages(*stage.packages))
    libraries = {d.lower() for d in (*BASE_LIBRARIES, *stage.libraries)} | non_deciding_libraries() | HARNESS
    problems = []
    for filename in sorted(tracer.code):
        path = Path(filename)
        if not path.is_absolute():
            continue  # <frozen ...>, <string>
        path = path.resolve()
        if site_of(path) is not None:
            names = distributions(path)
            if names and not names & libraries:
                problems.append(f"ran library {sorted(names)} ({path.relative_to(site_of(path))}) whose version "
                                "is in no key")
        elif within(path, [ROOT]) and not within(path, [PREFIX, ROOT / "tests"]):
            package = path.relative_to(ROOT).parts[0]
            if package not in allowed_packages:
                problems.append(f"ran code of package {package!r} ({path.relative_to(ROOT)})")
    declared_inputs = [p.resolve() for p in run_input_paths(stage, run)]
    data = [p.resolve() for e in (*stage.data, *stage.listings) for p in data_paths(e, run.cfg)] if run.cfg else []
    caches = [Path(p).resolve() for p in (stage.caches(run) if stage.caches else [])]
    own = [(run.run_dir / o).resolve() for o in outputs]
    # Image files named by a declared table that holds their content digest: the source images (the images
    # table's `path`, `sha256`) and the variants (the augment table's `output_path`, `output_sha256`).
    named = set()
    if "stages/images.parquet" in stage.tables:
        named |= {Path(p).resolve() for p in run.table("stages/images.parquet")["path"]}
    if "stages/augmentations.parquet" in stage.tables:
        named |= {(run.run_dir / p).resolve() for p in run.table("stages/augmentations.parquet")["output_path"]}
    run_root = run.run_dir.resolve().parent  # the output root: the run folder and the caches beside it
    for path in sorted(tracer.opened):
        if not path.exists():
            continue  # an open that failed read nothing
        path = path.resolve()
        if site_of(path) is not None:
            names = distributions(path)
            if names and not names & libraries and path.suffix not in (".py", ".pyc"):
                problems.append(f"read {path.relative_to(site_of(path))} of library {sorted(names)}, whose version "
                                "is in no key")
            continue
        checked = within(path, [ROOT, run_root, ROOT.parent / "shared"]) and not within(path, [PREFIX])
        if not checked or path.suffix in (".py", ".pyc") or path.is_dir() or path.parent.suffix == ".egg-info":
            continue  # imports are the code check's (and the install's metadata); outside the project, the data
            # and the runs: the system's
        if path not in named and not within(path, [*declared_inputs, *data, *caches, *own]):
            problems.append(f"read {path} (not a declared input)")
    return problems


def in_process_augment(chunks, settings):
    """The augment stage's chunks rendered in this process (the tracer does not see pool processes)."""
    return [render_chunk(chunk, settings) for chunk in chunks]


@pytest.fixture(scope="module")
def run_copy(sample_run, tmp_path_factory):
    """The sample build copied, with its config, stage summaries and the flow's parameters."""
    run_dir = tmp_path_factory.mktemp("keys") / "runs" / "sample"
    shutil.copytree(sample_run, run_dir)
    cfg = load_config(SAMPLE_CONFIG_PATH, {"output_root": str(run_dir.parent)})
    summaries = {p.name.removesuffix(".done.json"): json.loads(p.read_text())["summary"]
                 for p in (run_dir / "stages").glob("*.done.json")}
    params = {"config_text": public_config_yaml(cfg, SAMPLE_CONFIG_PATH.parent), "run_dir": str(run_dir)}
    return run_dir, cfg, summaries, params


def given(stage, cfg, run_dir, summaries, params, runners=Runners()) -> StageRun:
    return StageRun(None if stage is MEDICO_TASK2 else cfg, run_dir, {n: summaries[n] for n in stage.after},
                    {p: params[p] for p in stage.params}, runners)


def test_every_build_reads_only_what_it_declares(run_copy, tmp_path):
    run_dir, cfg, summaries, params = run_copy
    shutil.rmtree(run_dir / "augmented")  # render again, so the render code runs under the tracer
    # An empty embedding cache, so the model is loaded and run under the tracer too.
    cfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"cache_dir": tmp_path / "embed-cache"})})
    # Inputs the sample build has none of: an expert's verdicts (two rows judged wrong) and an added class.
    from generate.plans import write_class_additions
    from review import record_verdicts, row_digests

    qa, images = pd.read_parquet(run_dir / "stages/qa_dedup.parquet"), pd.read_parquet(run_dir / "stages/images.parquet")
    digests = row_digests(qa.head(2), images)
    record_verdicts(run_dir, pd.DataFrame([{"qa_id": q, "verdict": "wrong", "comment": "", "sheet": "s", "line": i + 2,
                                            "row_digest": d} for i, (q, d) in enumerate(sorted(digests.items()))]))
    facts = pd.read_parquet(run_dir / "stages/facts.parquet")
    write_class_additions(run_dir, (next(c for c in load_catalog(cfg.catalog).classes
                                         if c not in set(facts["question_class"])),))
    (run_dir / "export" / "medico-task2").mkdir(parents=True, exist_ok=True)
    problems = {}
    for stage in ALL_STAGES:
        run = given(stage, cfg, run_dir, summaries, params, Runners(augment=in_process_augment))
        with Tracer() as tracer, ConfigReads(cfg) as config_reads:
            summaries[stage.name], outputs = stage.build(run)
        problems[stage.name] = problems_of(stage, run, tracer, outputs) + undeclared_config(stage, config_reads.read)
    assert not {name: p for name, p in problems.items() if p}, json.dumps(problems, indent=1)


def copy_project(to: Path) -> None:
    """The code and data a build reads from the project (its packages, flows and prompts)."""
    for package in (*STAGE_PACKAGES, "flows", "prompts"):
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))


def test_llm_builds_read_only_what_they_declare(sample_run, tmp_path, monkeypatch):
    """The same for the LLM path, which the sample build does not take: generate (with the judge,
    paraphrases and the second opinion) and explain with the `openai` backend, against the loopback stand-in,
    on 12 plans and 12 QA rows of a copy of the sample build."""
    from openai_standin import OpenAIStandIn

    from explain.stages import EXPLAIN
    from generate.stages import GENERATE

    run_dir = tmp_path / "runs" / "sample"
    shutil.copytree(sample_run, run_dir, ignore=shutil.ignore_patterns("augmented", "release", "export"))
    for table in ("plans", "qa_dedup"):
        path = run_dir / "stages" / f"{table}.parquet"
        pd.read_parquet(path).head(12).to_parquet(path, index=False)
    monkeypatch.setenv("KVQA_TEST_KEY", "sk-test")
    with OpenAIStandIn() as standin:
        llm = dict(base_url=standin.url, api_key_env="KVQA_TEST_KEY", concurrency=4, timeout_s=5.0, verify=True,
                   naturalize_variants=1, second_opinion=True)
        cfg = load_config(SAMPLE_CONFIG_PATH, {"output_root": str(run_dir.parent),
                                               "generate": {"backend": "openai", "llm": llm},
                                               "explain": {"backend": "openai", "llm": llm}})
        problems = {}
        for stage in (GENERATE, EXPLAIN):
            run = StageRun(cfg, run_dir)
            with Tracer() as tracer, ConfigReads(cfg) as config_reads:
                summary, outputs = stage.build(run)
            assert summary["llm_usage"], stage.name  # the requests went to the stand-in
            problems[stage.name] = problems_of(stage, run, tracer, outputs) + undeclared_config(stage,
                                                                                                config_reads.read)
    assert not {name: p for name, p in problems.items() if p}, json.dumps(problems, indent=1)


def test_render_code_names_every_module_that_renders_a_variant():
    """`augment.track.RENDER_CODE` (what a reused variant must have been rendered by) is exactly the project
    code that runs to make a variant's bytes and recipe: decode, plan, apply, encode."""
    from augment import load_artifact_catalog
    from augment.render import apply_steps, decode_image, encode_jpeg, make_recipe, plan_recipe
    from augment.track import RENDER_CODE

    image = sorted((ROOT / "data" / "sample" / "images").glob("*.jpg"))[0]
    catalog = load_artifact_catalog()
    with Tracer() as tracer:
        decoded = decode_image(image.read_bytes(), image.name)
        height, width = decoded.pixels.shape[:2]
        for variant in range(len(catalog.artifacts)):
            steps = plan_recipe(catalog, 42, "kvasir-vqa", image.stem, variant, height, width, True)
            pixels, applied, _ = apply_steps(decoded.pixels, steps, {}, [])
            encode_jpeg(pixels, decoded.output_mode, 95)
            make_recipe(applied, decoded, 95, [], "")
    ran = {str(Path(f).resolve().relative_to(ROOT)) for f in tracer.code
           if Path(f).is_absolute() and within(Path(f).resolve(), [ROOT])
           and not within(Path(f).resolve(), [PREFIX, ROOT / "tests"])}
    assert ran == set(RENDER_CODE)


class Digests:
    """`kvqa.tables.file_digest`, memoised by (path, size, mtime): many keys of one run read the same files."""

    def __init__(self, real):
        self.real, self.memo = real, {}

    def __call__(self, path, *args):
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self.memo:
            self.memo[key] = self.real(path, *args)
        return self.memo[key]


def _appended(path: Path):
    """Change `path`'s bytes, not what it means (one byte appended; a parquet table written again with
    another compression, so a key that reads it can still read it), and return how to undo it."""
    import pyarrow.parquet as pq

    original = path.read_bytes()
    if path.suffix == ".parquet":
        pq.write_table(pq.read_table(path), path, compression="gzip")
    else:
        path.write_bytes(original + b"\n")
    return lambda: path.write_bytes(original)


def test_each_declared_input_changes_exactly_the_stages_that_declare_it(run_copy, tmp_path, monkeypatch):
    run_dir, cfg, summaries, params = run_copy
    code = tmp_path / "project"
    copy_project(code)
    monkeypatch.setattr(contract, "CODE_ROOT", code)
    monkeypatch.setattr(contract, "file_digest", Digests(contract.file_digest))
    contract._imported_packages.cache_clear()
    # The config and its data files, copied beside the project copy (a byte appended must not touch the tree).
    shutil.copytree(ROOT / "data" / "configs", tmp_path / "data" / "configs")
    shutil.copytree(ROOT / "data" / "sample", tmp_path / "data" / "sample")
    cfg = load_config(tmp_path / "data" / "configs" / SAMPLE_CONFIG_PATH.name, {"output_root": str(run_dir.parent)})
    cfg = cfg.model_copy(update={
        "catalog": code / cfg.catalog.relative_to(ROOT),
        "augment": cfg.augment.model_copy(update={"catalog": code / cfg.augment.catalog.relative_to(ROOT)}),
        "explain": cfg.explain.model_copy(update={"phrasings": code / cfg.explain.phrasings.relative_to(ROOT)})})

    def keys() -> dict[str, str]:
        return {s.name: key_digest(stage_key(s, given(s, cfg, run_dir, summaries, params))) for s in ALL_STAGES}

    base = keys()
    assert keys() == base  # a key is a function of its inputs only
    changes: dict[str, tuple] = {}  # what -> (undo, the stages that declare it)
    for package in STAGE_PACKAGES:
        readers = {s.name for s in ALL_STAGES if package in stage_packages(*s.packages)}
        for path in sorted((code / package).rglob("*.py")):
            changes[str(path.relative_to(code))] = (path, readers)
    for stage in ALL_STAGES:
        run = given(stage, cfg, run_dir, summaries, params)
        for path in [*run_input_paths(stage, run), *[p for e in stage.data for p in data_paths(e, cfg)]]:
            if path.is_file():
                readers = {s.name for s in ALL_STAGES
                           if path in run_input_paths(s, given(s, cfg, run_dir, summaries, params))
                           or any(path == p or p in path.parents for e in s.data for p in data_paths(e, cfg))}
                changes.setdefault(str(path), (path, readers))
    wrong = {}
    for what, (path, readers) in changes.items():
        undo = _appended(path)
        try:
            changed = {name for name, key in keys().items() if key != base[name]}
        finally:
            undo()
        if changed != readers:
            wrong[what] = {"redone": sorted(changed), "declared by": sorted(readers)}
    assert not wrong, json.dumps(wrong, indent=1)
    # Every .py of every stage package, every declared table and data file that exists: each stage has some.
    assert {name for _, readers in changes.values() for name in readers} == {s.name for s in ALL_STAGES}
    assert {"report/kvasir_vqa_x1_reference.yaml", "prompts/llm/explain.yaml"} <= {
        str(Path(w).relative_to(code)) for w in changes if Path(w).is_relative_to(code)}
    for flow in sorted((code / "flows").glob("*.py")):  # the flows decide nothing: no key moves
        undo = _appended(flow)
        try:
            assert keys() == base, flow.name
        finally:
            undo()
    # A summary or a parameter a stage reads is its input too.
    for name in {n for s in ALL_STAGES for n in s.after}:
        before, summaries[name] = summaries[name], {**summaries[name], "changed": 1}
        try:
            changed = {n for n, key in keys().items() if key != base[n]}
        finally:
            summaries[name] = before
        assert changed == {s.name for s in ALL_STAGES if name in s.after}, name
    for name in {p for s in ALL_STAGES for p in s.params}:
        before, params[name] = params[name], f"{params[name]} changed"
        try:
            changed = {n for n, key in keys().items() if key != base[n]}
        finally:
            params[name] = before
        assert changed == {s.name for s in ALL_STAGES if name in s.params}, name


def cli(project: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(project)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def redone(log: str) -> set[str]:
    done = set(re.findall(r"stage (\S+)\s+done:", log))
    cached = set(re.findall(r"stage (\S+)\s+cached", log))
    assert done | cached == {s.name for s in RELEASE_STAGES}, (done, cached)
    return done


def test_a_rebuild_redoes_exactly_the_stages_that_read_what_changed(sample_run, tmp_path):
    """With the CLI, in a copy of the project (so that nothing in the working tree is edited), from a copy
    of the sample build: each change redoes exactly its readers, and augment re-renders only for its render
    code."""
    project = tmp_path / "project"
    copy_project(project)
    runs = tmp_path / "runs"
    shutil.copytree(sample_run, runs / "sample")
    config = ["--config", str(SAMPLE_CONFIG_PATH), "--output-root", str(runs)]
    cli(project, "build", *config)  # paths in the config moved with the project: the baseline of the copy

    def readers(package: str) -> set[str]:
        return {s.name for s in RELEASE_STAGES if package in stage_packages(*s.packages)}

    (project / "report" / "kvasir_vqa_x1_reference.yaml").open("a").write("\n")
    assert redone(cli(project, "build", *config)) == {"report"}
    (project / "flows" / "build_release.py").open("a").write("\n# orchestration only\n")
    assert redone(cli(project, "build", *config)) == set()
    (project / "augment" / "sheet.py").open("a").write("\n# not render code\n")
    log = cli(project, "build", *config)
    assert redone(log) == readers("augment") and "augment: 0 variants rendered" in log
    (project / "augment" / "render.py").open("a").write("\n# render code\n")
    log = cli(project, "build", *config)
    assert "augment: 740 variants rendered, 0 verified on disk" in log
    assert {"augment", "release", "export", "report"} <= redone(log)


def _only_runs_a_stage(fn: ast.FunctionDef) -> bool:
    body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return (len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call)
            and getattr(body[0].value.func, "id", None) == "run_stage")


def test_flows_hold_no_stage_bodies():
    """A stage is declared and built in its own package: `flows/` declares no `Stage`, writes no table,
    holds no `build` closure, and a function of it given a `StageRun` only hands it to `run_stage`; every
    declared stage is run by a flow."""
    writers = {"write_table", "write_table_pieces", "write_text", "atomic_path"}
    found = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "Stage":
                found.append(f"{where}: declares a Stage")
            if isinstance(node, ast.ImportFrom) and writers & {a.name for a in node.names}:
                found.append(f"{where}: imports a table writer")
            if isinstance(node, ast.FunctionDef):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.FunctionDef) and n is not node]
                found += [f"{path.name}:{n.lineno}: a build closure in {node.name}" for n in inner if n.name == "build"]
                takes_run = any(getattr(a.annotation, "id", None) == "StageRun" for a in node.args.args)
                if takes_run and not _only_runs_a_stage(node):
                    found.append(f"{where}: {node.name} is given a StageRun and does more than run the stage")
    assert not found, found
    declared = {m.group(1) for path in ROOT.glob("*/stages.py")
                for m in re.finditer(r'^\w+ = Stage\(\s*"(\w+)"', path.read_text(), re.M)}
    assert declared == {s.name for s in ALL_STAGES}
    assert AUGMENT in RELEASE_STAGES
