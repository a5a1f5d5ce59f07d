"""A loopback OpenAI-compatible chat server for tests and benchmarks (POST /v1/chat/completions).

It answers deterministically from the facts in the prompt, like a competent model would: the compose
prompt's facts are parsed back and realised with the project's template phrasings (never one that is an
atomic source question verbatim: a model that naturalizes does not copy them), the judge says
"consistent". Paraphrases are one of each kind dedup's paraphrase band sorts (`paraphrases`): a verbatim
copy, a faithful rewording, a drifted question on the same topic, then one that covers no class. Faults are injected on request, by a
`chooser(messages, attempt) -> fault | None` the test provides (`attempt` counts earlier requests with
the same messages):

    429        HTTP 429 with `Retry-After: 1`          500          HTTP 500
    hang       sleep `hang_s` before answering           invalid_json content that is not JSON
    missing    JSON without the `answer` field          refusal      message.refusal set, no content
    contradict an answer whose first fact is flipped     judge_no     the judge says inconsistent
    long       a reply that needs `long_reply_tokens`: cut in half (finish_reason=length) below that max_tokens
    vague      a composed answer in words the catalog lacks ("It looks just as the record has it (ref kdpa).":
               the reader reads no value; the ref names the facts, so the stand-in knows what it meant)
    second_yes the second opinion states the facts' value of a `vague` answer (without it the second
               opinion reads the answer with generate.reader: the value it finds, else "not_stated")

`kill_after=N` makes the server die once N requests have arrived: requests in flight then get no reply
and new connections are refused, as when a GPU server crashes half way.

Run alone for benchmarks: `python tests/openai_standin.py --latency 0.1` serves the same answers from
one asyncio thread and prints its URL.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate.backends import PlanFact, PlanInput  # noqa: E402
from generate.grounding import cue_regex  # noqa: E402
from generate.reader import Reader, reading_form  # noqa: E402
from generate.template import TemplateRealizer  # noqa: E402
from kvqa.catalog import load_catalog  # noqa: E402
from sources.kvasir_vqa import parse_answer  # noqa: E402

# "not relevant" flips to "no" (polyps remain): "no polyps remain", a phrasing of "yes", is true of an image
# with no polyp to remove too, so it would not contradict.
FLIP = {"yes": "no", "no": "yes", "not relevant": "no"}


def natural_phrasings(catalog):
    """The catalog with each class's question phrasings less the atomic source questions (a class whose
    phrasings are all atomic keeps them)."""
    atomic = {q for qc in catalog.classes.values() for q in qc.source_questions}
    out = catalog.model_copy(deep=True)
    for qc in out.classes.values():
        qc.questions = [q for q in qc.questions if q not in atomic] or qc.questions
    return out


class OpenAIStandIn:
    def __init__(self, latency_s: float = 0.0, hang_s: float = 2.0,
                 chooser: Callable[[list[dict], int], str | None] | None = None, kill_after: int | None = None):
        self.catalog = load_catalog()
        self.realizer = TemplateRealizer(natural_phrasings(self.catalog), seed=7)
        self.latency_s, self.hang_s = latency_s, hang_s
        self.chooser = chooser or (lambda messages, attempt: None)
        self.attempts: Counter = Counter()
        self.log: list[tuple[float, str, str | None]] = []  # (time, schema name, fault)
        self.bodies: list[dict] = []  # every request body received, in order
        self.long_reply_tokens = 400
        self.reader = Reader(self.catalog)
        self.vague: dict[str, list[PlanFact]] = {}  # ref of a `vague` answer -> the facts it was written from
        self.lock = threading.Lock()
        self.kill_after = kill_after  # dies (`kill`) when this many requests have arrived
        self.dead = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                if hub.dead:  # a dead server answers nothing: the connection drops
                    self.close_connection = True
                    return
                body = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                code, obj, headers = hub.respond(req)
                self._send(code, obj, headers)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default backlog of 5 resets connections under concurrency

            def handle_error(self, request, client_address):
                # A client that timed out on a "hang" closed its socket: expected, not a server error.
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "OpenAIStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def requests(self) -> int:
        return len(self.log)

    def kill(self) -> None:
        """Die as a crashed server does: requests in flight get no reply, new connections are refused."""
        self.dead = True
        threading.Thread(target=self.__exit__, daemon=True).start()  # not from a handler: shutdown waits

    # -- answering -------------------------------------------------------------------------------
    def respond(self, req: dict, sleep: bool = True) -> tuple[int, dict, dict]:
        messages = req["messages"]
        name = req.get("response_format", {}).get("json_schema", {}).get("name", "")
        key = json.dumps([messages, req.get("seed")], sort_keys=True)  # one conversation of one item
        with self.lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
        fault = self.chooser(messages, attempt)
        with self.lock:
            if self.dead:
                return 500, {}, {}  # never sent: `_send` drops the connection
            self.log.append((time.monotonic(), name, fault))
            self.bodies.append(req)
            if self.kill_after is not None and len(self.log) >= self.kill_after:
                self.kill()
        if self.latency_s and sleep:
            time.sleep(self.latency_s)
        if fault == "429":
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"}
        if fault == "500":
            return 500, {"error": {"message": "server error"}}, {}
        if fault == "hang":
            time.sleep(self.hang_s)
        content, refusal, finish = self._content(name, messages, fault), None, "stop"
        if fault == "refusal":
            content, refusal = None, "I cannot help with medical images."
        if fault == "long" and req.get("max_tokens", 1 << 30) < self.long_reply_tokens:
            content, finish = content[:len(content) // 2], "length"
        usage = {"prompt_tokens": sum(len(m["content"].split()) for m in messages),
                 "completion_tokens": len((content or "").split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {"id": "chatcmpl-standin", "object": "chat.completion", "created": 0,
                     "model": req.get("model", "standin"),
                     "choices": [{"index": 0, "finish_reason": finish,
                                  "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                     "usage": usage}, {}

    def _facts(self, text: str) -> list[PlanFact]:
        raw = json.loads(re.search(r"(\[\s*\{.*?\}\s*\])", text, re.S).group(1))
        facts = []
        for f in raw:
            qc = self.catalog.classes[f["class"]]
            facts.append(PlanFact("f", qc.name, str(qc.answer_type), parse_answer(qc, f["answer"]),
                                  f["question"], f["answer"]))
        return facts

    def _content(self, name: str, messages: list[dict], fault: str | None) -> str:
        user = messages[1]["content"]
        if fault == "invalid_json":
            return "Sure! Here is the JSON: {question: oops"
        if name == "compose":
            facts = self._facts(user)
            if fault == "contradict":
                f = facts[0]
                vocab = [v for v in self.catalog.classes[f.question_class].values if v not in f.values]
                values = ((FLIP.get(f.values[0], "yes"),) if f.answer_type == "yes_no"
                          else (str(int(f.values[0]) + 1),) if f.answer_type == "count"
                          else ("none",) if "none" in vocab else (vocab[0],))
                facts[0] = PlanFact(f.fact_id, f.question_class, f.answer_type, values, f.source_question,
                                    f.source_answer)
            res = self.realizer.realize_one(PlanInput("p", "s", "i", len(facts), tuple(facts)))
            reply = {"question": res.question, "answer": res.answer}
            if fault == "vague":
                digest = hashlib.sha256(json.dumps([[f.question_class, f.values] for f in facts]).encode()).hexdigest()
                ref = "".join(chr(ord("a") + int(c, 16)) for c in digest[:6])  # letters: no number to read
                with self.lock:
                    self.vague[ref] = facts
                reply["answer"] = f"It looks just as the record has it (ref {ref})."
            if fault == "missing":
                reply.pop("answer")
            return json.dumps(reply)
        if name == "explain":  # the pair's answer over every cited fact, then the prompt's region sentence
            facts = self._facts(user)
            if fault == "contradict":
                f = facts[0]
                facts[0] = PlanFact(f.fact_id, f.question_class, f.answer_type,
                                    (FLIP.get(f.values[0], "yes"),) if f.answer_type == "yes_no"
                                    else (str(int(f.values[0]) + 1),), f.source_question, f.source_answer)
            res = self.realizer.realize_one(PlanInput("p", "s", "i", len(facts), tuple(facts)))
            region = re.search(r'for example: "(.*)"', user).group(1)
            return json.dumps({} if fault == "missing" else {"explanation": f"{res.answer} {region}"})
        if name == "second_opinion":
            return json.dumps({"value": self._second_opinion(user, fault)})
        if name == "verify":
            return json.dumps({"consistent": fault != "judge_no", "reason": "checked against the facts"})
        if name == "naturalize":
            question = re.search(r"Question: (.*)\n", user).group(1)
            n = int(re.search(r"Write (\d+) different", user).group(1))
            return json.dumps({"paraphrases": self.paraphrases(question)[:n]})
        return json.dumps({})

    def _second_opinion(self, user: str, fault: str | None):
        """The value a `second_opinion` request's answer states for its class, in the reply's shape."""
        answer = re.search(r"^Answer: (.*)$", user, re.M).group(1)
        name = re.search(r"state for (\w+) \(the question", user).group(1)
        qc = self.catalog.classes[name]
        ref = re.search(r"\(ref ([a-p]+)\)", answer)
        values: list[str] = []
        if fault == "second_yes" and ref and ref.group(1) in self.vague:
            values = [v for f in self.vague[ref.group(1)] if f.question_class == name for v in f.values]
        elif fault != "second_yes":
            for st in self.reader.read(answer).of(name):
                if st.polarity != "asserted":
                    continue
                if qc.answer_type == "count" and st.interval and st.interval[0] == st.interval[1]:
                    values = [str(int(st.interval[0]))]
                elif st.none:
                    values = ["none"]
                else:
                    values += [v for v in st.values if v not in values]
        multi = qc.answer_type in ("multi_choice", "color", "location")
        if not values:
            return ["not_stated"] if multi else "not_stated"
        if qc.answer_type == "count":
            return int(values[0])
        return values if multi else values[0]

    def paraphrases(self, question: str) -> list[str]:
        """[verbatim, faithful, drifted, no class]: the question in lower case
        (dedup: an exact duplicate); the question behind a preamble (faithful); a question about the
        referral letter that keeps only the words carrying the question's class cues, so it passes the
        grounding check but asks something else (drifted); "What is shown?" (fails the grounding check)."""
        q = reading_form(question).rstrip("?")
        words: list[str] = []
        for qc in self.catalog.classes.values():
            hits = [next((m for c in group for m in [re.search(cue_regex(c) + r"[\w-]*", q)] if m), None)
                    for group in qc.question_cues]
            if all(hits):
                for hit in hits:
                    words += [hit.group(0)] if hit.group(0) not in words else []
        return [question.lower(), f"In this endoscopy image, {question[0].lower()}{question[1:]}",
                f"According to last year's referral letter, what was noted about {', '.join(words)}, and which "
                "sedation did the patient receive?", "What is shown?"]


async def serve_asyncio(standin: OpenAIStandIn, latency_s: float) -> None:
    """The same answers from one asyncio thread: for benchmarks, where 64 server threads fighting over
    the GIL on a 2-core machine would measure the stand-in instead of the client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                req = json.loads(await reader.readexactly(length))
                await asyncio.sleep(latency_s)
                code, obj, headers = standin.respond(req, sleep=False)
                body = json.dumps(obj).encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                writer.write(f"HTTP/1.1 {code} OK\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args()
    try:
        asyncio.run(serve_asyncio(OpenAIStandIn(), args.latency))
    except KeyboardInterrupt:
        pass
