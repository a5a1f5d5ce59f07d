"""A loopback stand-in for the three Hub endpoints `HfApi.create_repo` + `upload_folder` use.

It speaks the real wire format (preupload JSON, NDJSON commit with base64 file contents) so the test goes
through the real `huggingface_hub` client; it stores committed files in a local folder laid out like the repo.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


class HubStandIn:
    def __init__(self, store: Path):
        self.store = Path(store)
        self.auth_headers: list[str] = []
        self.requests: list[str] = []
        self.validated_headers: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth_headers.append(self.headers.get("Authorization", ""))
                hub.requests.append(self.path)
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/datasets/"
                                                    f"{req.get('organization')}/{req['name']}"})
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
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/preupload/(\w+)$", self.path)
                if m:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                m = re.match(r"^/api/datasets/([^/]+/[^/]+)/commit/(\w+)$", self.path)
                if m:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            dest = hub.store / m.group(1) / item["value"]["path"]
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(base64.b64decode(item["value"]["content"]))
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/datasets/"
                                                          f"{m.group(1)}/commit/0123abcd",
                                             "commitOid": "0123abcd" * 5})
                return self._reply(404, {"error": f"stand-in does not serve {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
