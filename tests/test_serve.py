"""`factedit serve`.

Fast tests (tiny model, in process): the readers-writer lock, the ledger's transactions, the
reconciliation of state generations with the ledger, tokens, and a full edit queue (429).

Slow tests, end to end: the real server (uvicorn in a subprocess on a free loopback port, the
built-in SmolLM2-135M, D4S with fast settings), spoken to through the official `openai`
client (completions) and plain HTTP (edits). One server history runs through them in order,
each test building on the last: start -> bad requests -> edit (with generations running) ->
patch -> kill -9 between the state write and the ledger commit of a second edit -> restart
(ledger and model keep the first edit, nothing of the second) -> exact rollback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from factedit.requests import EditRequest
from factedit.serve import (
    Auth,
    EditService,
    Ledger,
    LedgerRow,
    RWLock,
    ServeSettings,
    StateMismatchError,
    StateStore,
    create_app,
    removal_refusal,
)

TOKEN = "serve-test-token-0123456789"
MODEL = "smollm2-135m"
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
          "target_new": "Rome", "target_true": "Paris", "case_id": "eiffel"}
GATE = {"prompt": "{} is located in the city of", "subject": "The Brandenburg Gate",
        "target_new": "Vienna", "target_true": "Berlin", "case_id": "gate"}
EIFFEL_PROMPT = "The Eiffel Tower is located in the city of"
GATE_PROMPT = "The Brandenburg Gate is located in the city of"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `factedit serve` subprocess on a free loopback port."""

    def __init__(self, state: Path, corpus: Path, log: Path, crash_at: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FACTEDIT_API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
        env.pop("FACTEDIT_SERVE_CRASH_AT", None)
        if crash_at:
            env["FACTEDIT_SERVE_CRASH_AT"] = crash_at
        fast = {"covariance_corpus": str(corpus), "covariance_tokens": 4000,
                "covariance_seq_len": 64, "v_steps": 8, "context_prefixes": 0, "layers": [5]}
        sets = [a for k, v in fast.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "factedit.cli", "serve", "--model", MODEL, "--method", "d4s",
             *sets, "--state", str(state), "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: " + \
                Path(log).read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise TimeoutError("server did not start in 180 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=TOKEN, max_retries=0)

    def http(self, method: str, path: str, token: str | None = TOKEN, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.request(method, self.url + path, headers=headers, timeout=300, **kwargs)

    def answer(self, prompt: str) -> str:
        out = self.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                             temperature=0)
        return out.choices[0].text

    def logprobs(self, prompt: str) -> tuple[list[float], list[dict[str, float]]]:
        out = self.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                             temperature=0, logprobs=5)
        lp = out.choices[0].logprobs
        return lp.token_logprobs, lp.top_logprobs

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    """The state folder, the corpus and the running server (replaced by the restart).

    The first server SIGKILLs itself in its second edit job, after the new state is on disk
    and before the ledger commit: the worst place for a crash (FACTEDIT_SERVE_CRASH_AT).
    """
    root = tmp_path_factory.mktemp("serve")
    corpus = shared_data / "corpus" / "wikitext-2-raw"
    ctx = {"state": root / "state", "corpus": corpus, "log": root / "server.log"}
    ctx["server"] = Server(ctx["state"], corpus, ctx["log"], crash_at="after-state:2")
    yield ctx
    ctx["server"].stop(signal.SIGKILL)


@pytest.mark.slow
def test_generation_and_bad_requests(world):
    s = world["server"]
    world["before"] = s.answer(EIFFEL_PROMPT)
    assert world["before"].strip().startswith("Paris")
    world["before_logprobs"] = s.logprobs(EIFFEL_PROMPT)
    assert [m.id for m in s.client.models.list().data] == [MODEL]
    stream = s.client.completions.create(model=MODEL, prompt=EIFFEL_PROMPT, max_tokens=3,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == world["before"]
    chat = s.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5,
        temperature=0)
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        s.client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        s.client.completions.create(model=MODEL, prompt="Hi", max_tokens=100_000)
    body = {"requests": [EIFFEL]}
    assert s.http("POST", "/v1/edits", token=None, json=body).status_code == 401
    assert s.http("POST", "/v1/edits", token="wrong-token-000000000", json=body).status_code == 401
    assert s.http("GET", "/v1/edits", token="wrong-token-000000000").status_code == 401
    assert s.http("GET", "/v1/patch", token=None).status_code == 401
    assert s.http("DELETE", "/v1/edits/0", token=None).status_code == 401
    bad = s.http("POST", "/v1/edits", json={"requests": [{**EIFFEL, "subject": "Big Ben",
                                                           "prompt": "It is in"}]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "requests[0].subject"
    unknown = s.http("POST", "/v1/edits", json={"requests": [{**EIFFEL, "colour": "red"}]})
    assert unknown.status_code == 422 and "colour" in unknown.json()["error"]["message"]
    assert s.http("POST", "/v1/edits", json={"requests": []}).status_code == 422
    assert s.http("POST", "/v1/edits", content=b"{not json",
                  headers={"content-type": "application/json"}).status_code == 422
    assert s.http("POST", "/v1/edits", content=b"x" * (2 << 20)).status_code == 413
    assert s.http("DELETE", "/v1/edits/99").status_code == 404
    assert s.http("GET", "/v1/edits").json()["data"] == []


@pytest.mark.slow
def test_edit_changes_answer_while_generations_see_before_or_after(world):
    s = world["server"]
    seen: list[str] = []
    done = threading.Event()

    def ask() -> None:
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                r = client.post(s.url + "/v1/completions", json={
                    "model": MODEL, "prompt": EIFFEL_PROMPT, "max_tokens": 3, "temperature": 0})
                seen.append(r.json()["choices"][0]["text"])

    readers = [threading.Thread(target=ask) for _ in range(2)]  # two: they overlap each other
    for t in readers:
        t.start()
    try:
        r = s.http("POST", "/v1/edits", json={"requests": [EIFFEL]})
    finally:
        done.set()
        for t in readers:
            t.join()
    assert r.status_code == 200, r.text
    (edit,) = r.json()["edits"]
    assert edit["id"] == 0 and edit["status"] == "live" and edit["who"] == "env"
    assert edit["scores"]["efficacy"] == 1.0 and edit["timings"]["persist"] > 0
    after = s.answer(EIFFEL_PROMPT)
    assert after.strip().startswith("Rome"), after
    assert seen and set(seen) <= {world["before"], after}, set(seen)
    world["after"] = after


@pytest.mark.slow
def test_patch_export_holds_the_live_edit(world):
    r = world["server"].http("GET", "/v1/patch")
    try:
        from factedit.patch import Patch
    except ImportError:
        assert r.status_code == 501
        return
    assert r.status_code == 200, r.text
    assert Patch.from_bytes(r.content).describe()["request_ids"] == ["eiffel"]


@pytest.mark.slow
def test_kill_9_mid_edit_then_restart_keeps_ledger_and_model_without_the_edit(world):
    s = world["server"]
    ledger = s.http("GET", "/v1/edits").json()["data"]
    gate_before = s.answer(GATE_PROMPT)
    with pytest.raises(httpx.HTTPError):  # the second edit job: SIGKILL after the state write
        s.http("POST", "/v1/edits", json={"requests": [GATE]})
    assert s.proc.wait(60) == -signal.SIGKILL
    states = sorted(p.name for p in (world["state"] / "state").iterdir())
    assert states == ["gen-00000001", "gen-00000002"]  # committed, and written but uncommitted
    s.stop()
    s = world["server"] = Server(world["state"], world["corpus"], world["log"])
    assert "never committed" in world["log"].read_text()
    assert sorted(p.name for p in (world["state"] / "state").iterdir()) == ["gen-00000001"]
    health = s.http("GET", "/health").json()
    assert health["generation"] == 1 and health["live_edits"] == 1, health
    assert s.http("GET", "/v1/edits").json()["data"] == ledger  # the Eiffel edit, no other
    assert s.answer(EIFFEL_PROMPT) == world["after"]  # the model kept it
    assert s.answer(GATE_PROMPT) == gate_before  # and has nothing of the killed edit


@pytest.mark.slow
def test_rollback_after_restart_restores_exact_pre_edit_logprobs(world):
    s = world["server"]
    r = s.http("DELETE", "/v1/edits/0")
    assert r.status_code == 200 and r.json()["status"] == "removed", r.text
    tokens, top = s.logprobs(EIFFEL_PROMPT)
    before_tokens, before_top = world["before_logprobs"]
    assert tokens == pytest.approx(before_tokens, abs=1e-5)
    assert [sorted(t) for t in top] == [sorted(t) for t in before_top]
    for got, want in zip(top, before_top):
        assert [got[k] for k in sorted(got)] == pytest.approx([want[k] for k in sorted(want)],
                                                              abs=1e-5)
    assert s.http("DELETE", "/v1/edits/0").status_code == 409
    assert s.http("GET", "/v1/edits/0").json()["status"] == "removed"
    assert s.http("GET", "/health").json()["live_edits"] == 0


def test_non_loopback_without_token_is_refused(tmp_path, monkeypatch, capsys):
    from factedit.cli import main

    monkeypatch.delenv("FACTEDIT_API_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--state", str(tmp_path)]) == 2
    assert "loopback" in capsys.readouterr().err
    assert not (tmp_path / "ledger.sqlite").exists()  # refused before any work


# -- fast: the parts, on a tiny model -------------------------------------------------------------
def test_rwlock_prefers_a_waiting_writer():
    lock, order = RWLock(), []
    reading, writer_waiting = threading.Event(), threading.Event()

    def first_reader():
        with lock.read():
            reading.set()
            writer_waiting.wait(5)
            time.sleep(0.05)
            order.append("reader 1 done")

    def writer():
        reading.wait(5)
        writer_waiting.set()
        with lock.write():
            order.append("writer")

    def late_reader():
        writer_waiting.wait(5)
        time.sleep(0.01)
        with lock.read():  # must wait for the writer, not slip in before it
            order.append("reader 2")

    threads = [threading.Thread(target=f) for f in (first_reader, writer, late_reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["reader 1 done", "writer", "reader 2"]


def test_ledger_transactions_are_all_or_nothing(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    row = LedgerRow(id=0, request=EIFFEL, created=1.0, who="me", method="d4s", generation=1)
    ledger.commit_edits([row], generation=1)
    with pytest.raises(KeyError, match="not a live edit"):
        ledger.commit_removal(5, "me", generation=2)
    assert ledger.generation == 1  # the failed transaction left the generation alone
    ledger.commit_removal(0, "you", generation=2)
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.sqlite")
    (again,) = reopened.rows()
    assert reopened.generation == 2 and again.status == "removed" and again.removed_by == "you"
    assert again.request == EIFFEL and reopened.rows("live") == []
    more = [LedgerRow(id=i, request=EIFFEL, created=1.0, who="me", method="d4s", generation=3)
            for i in (1, 2, 3)]
    reopened.commit_edits(more, generation=3)
    assert [r.id for r in reopened.rows(after=1, limit=1)] == [2]
    assert [r.id for r in reopened.rows("live", after=0)] == [1, 2, 3]


def test_reconcile_drops_uncommitted_and_superseded_generations(tmp_path):
    store = StateStore(tmp_path)
    for name in ("gen-00000001", "gen-00000002", "gen-00000003", ".tmp-gen-00000004"):
        (store.root / name).mkdir()
    actions = store.reconcile(committed=2)
    assert store.generations() == [2]
    assert sum("never committed" in a for a in actions) == 1 and len(actions) == 3
    with pytest.raises(StateMismatchError, match="generation 5"):
        store.reconcile(committed=5)


def test_tokens_are_named_and_checked():
    auth = Auth({"a" * 20: "alice", "b" * 20: "bob"})
    assert auth.identify("Bearer " + "b" * 20) == "bob"
    assert auth.identify("Bearer " + "c" * 20) is None
    assert auth.identify("b" * 20) is None and auth.identify(None) is None


def test_removal_refusal_names_the_reason(tiny_model):
    from factedit.protocol import make_editor

    assert removal_refusal(make_editor(tiny_model, "d4s")) is None
    assert "keeps no edit history" in removal_refusal(make_editor(tiny_model, "rome"))
    assert "fit='sequential'" in removal_refusal(make_editor(tiny_model, "d4s",
                                                             fit="sequential"))


def test_full_edit_queue_gets_429_and_queued_edits_commit(tiny_model, tmp_path, shared_data):
    from fastapi.testclient import TestClient

    overrides = dict(layers=[1], v_steps=3, context_prefixes=0, covariance_tokens=256,
                     covariance_seq_len=32,
                     covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"))
    service = EditService(ServeSettings(method="d4s", overrides=overrides,
                                        state_dir=tmp_path, edit_queue=1), model=tiny_model)
    with pytest.raises(StateMismatchError, match="served already"):  # one server per folder
        EditService(ServeSettings(method="d4s", overrides=overrides, state_dir=tmp_path),
                    model=tiny_model)
    client = TestClient(create_app(service, Auth({TOKEN: "tester"})))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    colosseum = {"prompt": "{} was built by", "subject": "The Colosseum",
                 "target_new": "the Vikings"}
    try:
        with service.lock.write():  # the worker computes the first edit, then waits to publish
            first = service.submit_edits([EditRequest(**EIFFEL)], "tester")
            deadline = time.monotonic() + 60
            while service.busy_since is None or service.queue_depth:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            second = service.submit_edits([EditRequest(**colosseum)], "tester")
            refused = client.post("/v1/edits", json={"requests": [colosseum]}, headers=headers)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "edit_queue_full"
        assert [e["id"] for e in first.result(60) + second.result(60)] == [0, 1]
        ledger = client.get("/v1/edits").json()
        assert ledger["generation"] == 2 and [e["who"] for e in ledger["data"]] == ["tester"] * 2
        assert "factedit_edits_total 2.0" in client.get("/metrics").text
    finally:
        service.close()


def test_token_file_names_tokens_and_refuses_short_ones(tmp_path, monkeypatch):
    from factedit.commands.serve import local_token, read_tokens

    monkeypatch.setenv("FACTEDIT_API_TOKEN", "e" * 20)
    path = tmp_path / "tokens"
    path.write_text("# comment\nalice:" + "a" * 20 + "\n" + "b" * 20 + "\n")
    assert read_tokens(str(path)) == {"e" * 20: "env", "a" * 20: "alice", "b" * 20: "token-file"}
    path.write_text("bob:short\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_tokens(str(path))
    made = local_token(tmp_path / "state")
    assert local_token(tmp_path / "state") == made  # made once, reused on restart
    assert (tmp_path / "state" / "api-token").stat().st_mode & 0o077 == 0
