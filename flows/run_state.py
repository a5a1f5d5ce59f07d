"""What a run folder remembers besides its tables: where its config is, and the classes added to it.

`run.json` records the config file a run was built from, so `kvqa add-class NAME --run RUN` needs no
`--config`. `class_additions.json` lists the classes added with `kvqa add-class`, in order: the plans stage
draws the base plans without them and each added class's plans on top, so a later `kvqa build` of the same
run reproduces the same rows (and a fresh run folder, without the file, regenerates from scratch).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvqa.tables import write_json

RUN_FILE = "run.json"
ADDITIONS_FILE = "class_additions.json"


def record_run(run_dir: Path, config_path: Path) -> None:
    write_json({"config": str(Path(config_path).resolve())}, Path(run_dir) / RUN_FILE)


def recorded_config(run_dir: Path) -> Path | None:
    path = Path(run_dir) / RUN_FILE
    return Path(json.loads(path.read_text())["config"]) if path.is_file() else None


def class_additions(run_dir: Path) -> tuple[str, ...]:
    path = Path(run_dir) / ADDITIONS_FILE
    return tuple(json.loads(path.read_text())["classes"]) if path.is_file() else ()


def write_class_additions(run_dir: Path, classes: tuple[str, ...]) -> None:
    if classes:
        write_json({"classes": list(classes)}, Path(run_dir) / ADDITIONS_FILE)
    else:
        (Path(run_dir) / ADDITIONS_FILE).unlink(missing_ok=True)
