"""A loopback stand-in for the Hub endpoints `kvqa publish` uses through the real `huggingface_hub` client.

It speaks the real wire format and keeps a repo's history like the Hub does:

    POST /api/repos/create                      a new repo gets a first commit with `.gitattributes`;
                                                an existing one answers 409 (the client's `exist_ok`)
    GET  /api/datasets/{repo}[/revision/{rev}]  repo info: head `sha`, `siblings`
    GET  /api/datasets/{repo}/tree/{rev}        the files (and folders, when recursive) at a revision
    POST /api/validate-yaml                     a card whose YAML header does not parse is rejected
    POST /api/datasets/{repo}/preupload/{rev}   every file "regular" (inline), with the remote `oid` of a
                                                file that exists, so unchanged files are skipped
    POST /api/datasets/{repo}/commit/{rev}      NDJSON: header (a `parentCommit` other than the head is
                                                refused with 412), `file` (base64), `deletedFile` (404
                                                when absent), `deletedFolder`

The head of every repo is mirrored in `store/<org>/<name>/`, so a test can `load_dataset` it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.jsonl filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    """The oid the Hub reports for a regular file (git's blob hash), as the client computes it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    parent: str | None
    added: list[str]
    deleted: list[str]
    tree: dict[str, bytes] = field(repr=False)


class HubStandIn:
    def __init__(self, store: Path):
        self.store = Path(store)
        self.auth_headers: list[str] = []
        self.requests: list[str] = []
        self.validated_headers: list[dict] = []
        self.repos: dict[str, list[Commit]] = {}  # repo id -> its commits, oldest first
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.auth_headers.append(self.headers.get("Authorization", ""))
                url = urlsplit(self.path)
                hub.requests.append(url.path)
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?$", url.path)
                if m:
                    commit = hub.resolve(m.group(1), unquote(m.group(2) or "main"))
                    if commit is None:
                        return self._reply(404, {"error": f"{m.group(1)}@{m.group(2)} not found"})
                    return self._reply(200, {"id": m.group(1), "sha": commit.oid, "private": False,
                                             "siblings": [{"rfilename": p} for p in sorted(commit.tree)]})
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", url.path)
                if m:
                    commit = hub.resolve(m.group(1), unquote(m.group(2)))
                    if commit is None:
                        return self._reply(404, {"error": f"{m.group(1)}@{m.group(2)} not found"})
                    recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                    return self._reply(200, tree_listing(commit.tree, unquote(m.group(3) or ""), recursive))
                return self._reply(404, {"error": f"stand-in does not serve GET {url.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth_headers.append(self.headers.get("Authorization", ""))
                hub.requests.append(self.path)
                host = f"http://{self.headers['Host']}"
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req.get('organization')}/{req['name']}"
                    url = f"{host}/datasets/{repo_id}"
                    if not hub.create(repo_id):
                        return self._reply(409, {"error": "You already created this dataset repo", "url": url})
                    return self._reply(200, {"url": url})
                if self.path == "/api/validate-yaml":
                    # The Hub rejects a card whose YAML header does not parse; so does the stand-in.
                    content = json.loads(body)["content"]
                    try:
                        header = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                        assert isinstance(header, dict)
                    except Exception as err:  # noqa: BLE001 -- any failure is a validation error
                        return self._reply(400, {"errors": [{"message": f"invalid YAML header: {err}"}]})
                    hub.validated_headers.append(header)
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/preupload/([^/?]+)", self.path)
                if m:
                    head = hub.resolve(m.group(1), unquote(m.group(2)))
                    if head is None:
                        return self._reply(404, {"error": f"{m.group(1)} not found"})
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_blob_oid(head.tree[f["path"]]) if f["path"] in head.tree else None}
                        for f in files]})
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/commit/([^/?]+)", self.path)
                if m:
                    code, reply = hub.commit(m.group(1), unquote(m.group(2)),
                                             [json.loads(line) for line in body.decode().splitlines()])
                    if code == 200:
                        reply = {"commitUrl": f"{host}/datasets/{m.group(1)}/commit/{reply}", "commitOid": reply}
                    return self._reply(code, reply)
                return self._reply(404, {"error": f"stand-in does not serve POST {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- repo state --------------------------------------------------------------------------------
    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos.get(repo_id, []))

    def files(self, repo_id: str) -> list[str]:
        """The files at the head of the repo."""
        return sorted(self.repos[repo_id][-1].tree)

    def resolve(self, repo_id: str, revision: str) -> Commit | None:
        history = self.repos.get(repo_id)
        if not history:
            return None
        if revision == "main":
            return history[-1]
        return next((c for c in history if c.oid == revision), None)

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = []
            self._append(repo_id, "initial commit", {".gitattributes": GITATTRIBUTES}, [".gitattributes"], [])
            return True

    def commit(self, repo_id: str, revision: str, lines: list[dict]) -> tuple[int, object]:
        with self.lock:
            head = self.resolve(repo_id, revision)
            if head is None or revision not in ("main", head.oid):
                return 404, {"error": f"{repo_id}@{revision} not found"}
            header = next(item["value"] for item in lines if item["key"] == "header")
            parent = header.get("parentCommit")
            if parent is not None and not head.oid.startswith(parent):
                return 412, {"error": f"parent commit {parent} is not the head {head.oid}"}
            tree, added, deleted = dict(head.tree), [], []
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                    added.append(value["path"])
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        return 404, {"error": f"cannot delete {value['path']}: no such file"}
                    del tree[value["path"]]
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    gone = [p for p in tree if p.startswith(prefix)]
                    if not gone:
                        return 404, {"error": f"cannot delete folder {value['path']}: no such folder"}
                    for p in gone:
                        del tree[p]
                    deleted += gone
                elif key != "header":
                    return 400, {"error": f"stand-in does not support {key} (every upload is regular)"}
            return 200, self._append(repo_id, header.get("summary", ""), tree, added, deleted).oid

    def _append(self, repo_id: str, summary: str, tree: dict[str, bytes], added: list[str],
                deleted: list[str]) -> Commit:
        history = self.repos[repo_id]
        parent = history[-1].oid if history else None
        oid = hashlib.sha1(json.dumps([parent, summary, sorted(added), sorted(deleted), len(history)])
                           .encode()).hexdigest()
        history.append(Commit(oid, summary, parent, added, deleted, tree))
        folder = self.store / repo_id  # mirror the head on disk
        shutil.rmtree(folder, ignore_errors=True)
        for path, content in tree.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        return history[-1]


def tree_listing(tree: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
    """The Hub's tree entries below `under`: files, and the folders on the way."""
    prefix = under.strip("/") + "/" if under.strip("/") else ""
    entries: dict[str, dict] = {}
    for path, content in sorted(tree.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder,
                                        "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if not recursive:
                break
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}
    return list(entries.values())
