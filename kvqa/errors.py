"""The errors a run ends with on purpose, and the exit codes the CLI gives them.

Stages and flows raise these; `flows/cli.py` turns each into one line on stderr and its exit code, so a
person reads what went wrong (which file, which line, which stage) instead of a traceback. Anything else
that escapes a run is a bug and keeps its traceback.

| exit | meaning |
|---|---|
| 0 | the release was written |
| 1 | `RunRejected`: the run finished but its output is unusable (empty release, too many failed plans) |
| 2 | `BadInput` / `StageFailed`: a config or input the run cannot start from, or a stage's I/O failed |
| 3 | the `batch` backend wrote requests whose results are still pending |
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_BAD_INPUT = 2
EXIT_PENDING = 3


class BadInput(ValueError):
    """A config or input file the run cannot start from. The message is one line naming the file
    (`path:line: what` where there is a line)."""


class ConfigError(BadInput):
    """The run config (or the catalog it names) cannot be read or does not validate."""


class RunRejected(RuntimeError):
    """The run finished but its output is unusable: an empty release, or more plans rejected than
    `generate.max_rejected_share` allows. The message carries the reason counts."""


class StageFailed(RuntimeError):
    """A stage's build hit an OS error (full disk, permissions, a path that is a file): which stage, the
    error, and how much it had written where, so a person knows what to free or fix before re-running.

    A re-run resumes: the stage's marker is written only after all its outputs, so the failed stage is
    redone and the finished ones are skipped.
    """

    def __init__(self, stage: str, cause: OSError, written_bytes: int | None = None, folder: Path | None = None):
        self.stage, self.cause, self.written_bytes, self.folder = stage, cause, written_bytes, folder
        written = ""
        if written_bytes is not None:
            written = f" ({human_bytes(written_bytes)} written" + (f" to {folder})" if folder is not None else ")")
        super().__init__(one_line(f"stage {stage}: {cause}{written}"))


def read_user_text(path: Path, what: str, error: type[BadInput] = BadInput) -> str:
    """A hand-made file's text, or `error` in one line naming it: missing, a folder, unreadable, or not
    UTF-8 (`path:line:`, the line of the first bad byte)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise error(f"{what} {path}: cannot read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise error(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{raw[err.start]:02x})") from None


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `df -H` prints them)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def one_line(text: str) -> str:
    """Whitespace and line breaks folded to single spaces: a message meant for one line of a terminal."""
    return " ".join(str(text).split())


def validation_summary(err: Exception, limit: int = 3) -> str:
    """A pydantic ValidationError as one line: `where: what; ...` for the first `limit` errors.

    pydantic's own text spends three lines per error (and a documentation URL); a person fixing a config
    needs the key path and the complaint.
    """
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return one_line(str(err))
    items = errors(include_url=False)
    parts = []
    for e in items[:limit]:
        where = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "")
        if e.get("type") in ("missing", "extra_forbidden"):
            msg = {"missing": "required key missing", "extra_forbidden": "unknown key"}[e["type"]]
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return one_line("; ".join(parts) + more)


def yaml_problem(path: Path, err: Exception) -> str:
    """A PyYAML error as `path:line:column: what` (a tab gets a hint: YAML indents with spaces only)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    what = f"{context}: {problem}" if context else problem
    if "'\\t'" in what:
        what += " (a tab: YAML indents with spaces only)"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return one_line(f"{where}: invalid YAML, {what}")
