"""``POST /v1/generate`` on the tiny service world: greedy answers equal the offline steering code,
compare mode, streaming events, features of generated tokens, stop strings, errors and limits,
and a client that disconnects mid-stream frees its slot (a real server process)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from service_fixtures import client, engine, register, server_factory, settings, world  # noqa: F401

from lorasae.steering import BatchGeneration, LatentIntervention, RowSpec
from lorasae_client.schemas import GenerateResponse, TokenEvent

PROMPT = "the cat sat on the"


def _post(client, **body):
    return client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 6, **body})


def _offline(engine, prompt_ids, layers, interventions=(), new=6):
    gen = BatchGeneration(engine.base, [engine.by_layer[x] for x in layers],
                          [RowSpec(prompt_ids, interventions=interventions)], max_new_tokens=new,
                          pad_id=engine.pad, keep_first=engine.keep_first)
    while not gen.done:
        gen.advance()
    return gen.generated[0]


def test_greedy_generation_equals_the_offline_steering_code(client, engine):
    ids = engine.tokenize(PROMPT)
    iv = {"sae": "sae2", "latent": 3, "op": "set", "value": 6.0}
    plain = GenerateResponse.model_validate(_post(client).json())
    steered = GenerateResponse.model_validate(_post(client, interventions=[iv]).json())
    assert [s.layer for s in plain.saes] == [1, 2]
    (p,), (s,) = plain.generations, steered.generations
    assert (p.variant, s.variant, p.steered, s.steered) == ("base", "steered", False, True)
    assert [t.id for t in p.tokens] == _offline(engine, ids, (1, 2))
    assert [t.id for t in s.tokens] == _offline(engine, ids, (1, 2), (LatentIntervention(2, 3, "set", 6.0),))
    assert p.text == engine.decode([t.id for t in p.tokens]) and p.prompt_tokens == len(ids)
    assert plain.usage.generated_tokens == 6 and p.finish_reason == "length"


def test_compare_reports_control_and_treatment_with_kl(client):
    iv = {"sae": "sae2", "latent": 3, "op": "set", "value": 6.0}
    body = _post(client, prompt=[PROMPT, "a dog was"], interventions=[iv], compare=True).json()
    res = GenerateResponse.model_validate(body)
    assert [(g.prompt, g.variant) for g in res.generations] == [
        (0, "unsteered"), (0, "steered"), (1, "unsteered"), (1, "steered")]
    for control, treatment in zip(res.generations[0::2], res.generations[1::2]):
        assert control.kl is None and len(treatment.kl) == len(treatment.tokens) == 6
        assert all(k >= 0 for k in treatment.kl) and max(treatment.kl) > 1e-3
    frame = res.to_pandas()
    assert len(frame) == 24 and set(frame["variant"]) == {"unsteered", "steered"}


def test_stream_events_match_the_final_answer(client):
    body = {"prompt": PROMPT, "max_new_tokens": 5, "stream": True, "return_features": 3}
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds == ["token"] * 5 + ["done"]
    tokens = [TokenEvent.model_validate(e) for _, e in events[:-1]]
    final = GenerateResponse.model_validate(events[-1][1])
    assert [t.id for t in tokens] == [t.id for t in final.generations[0].tokens]
    assert [t.index for t in tokens] == list(range(5))
    for t, kept in zip(tokens, final.generations[0].tokens):
        assert t.features == kept.features and set(t.features) == {"sae1", "sae2"}
        assert all(len(v) <= 3 for v in t.features.values())


def _events(lines) -> list[tuple[str, dict]]:
    out, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


def test_stop_string_cuts_the_text(client):
    full = GenerateResponse.model_validate(_post(client, max_new_tokens=8).json()).generations[0]
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip()
    cut = GenerateResponse.model_validate(_post(client, max_new_tokens=8, stop=[stop]).json()).generations[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert len(cut.tokens) < len(full.tokens)


def test_stop_string_late_in_a_long_generation_decodes_a_bounded_tail(client, monkeypatch):
    """A stop string near the end of 60 tokens is found, and each step decodes only the last
    ``stop_window`` tokens (not the whole text: quadratic), plus one full decode to cut."""
    full = GenerateResponse.model_validate(_post(client, max_new_tokens=60).json()).generations[0]
    assert len(full.tokens) == 60
    stop = next(full.text[i:i + 2] for i in range(len(full.text) - 8, 0, -1) if full.text[i:i + 2].strip())
    engine = client.app.state.service.engine
    decoded: list[int] = []
    real = engine.decode
    monkeypatch.setattr(engine, "decode", lambda ids: decoded.append(len(ids)) or real(ids))
    cut = GenerateResponse.model_validate(_post(client, max_new_tokens=60, stop=[stop]).json()).generations[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    window = 4 * len(stop) + 16
    assert max(decoded[:-1]) <= window < len(cut.tokens) and decoded[-1] == len(cut.tokens)


@pytest.mark.parametrize("body, status, code", [
    ({"interventions": [{"sae": "nope", "latent": 1, "op": "set", "value": 1}]}, 404, "unknown_sae"),
    ({"interventions": [{"sae": "sae1", "latent": 10**6, "op": "set", "value": 1}]}, 404, "unknown_latent"),
    ({"saes": ["sae1"], "interventions": [{"sae": "sae2", "latent": 1, "op": "set", "value": 1}]}, 422,
     "sae_not_spliced"),
    ({"interventions": [{"sae": "sae1", "latent": 1, "op": "set", "value": float("nan")}]}, 422, None),
    ({"interventions": [{"sae": "sae1", "latent": 1, "op": "mul", "value": 1}]}, 422, None),
    ({"adapter": "nope"}, 404, "unknown_adapter"),
    ({"compare": True}, 422, "nothing_to_compare"),
    ({"max_new_tokens": 100_000}, 422, None),
    ({"max_new_tokens": 300}, 413, "too_many_new_tokens"),
    ({"prompt": [[1, 2, 10**7]]}, 422, "invalid_token_id"),
    ({"prompt": ""}, 422, None),
    ({"temperature": -1}, 422, None),
    ({"stop": [""]}, 422, None),
    ({"prompt": ["a"] * 40, "compare": True, "adapter": None, "interventions": [
        {"sae": "sae1", "latent": 1, "op": "add", "value": 1}], "return_features": 64, "max_new_tokens": 256},
     413, "response_too_large"),
    ({"prompt": ["a"] * 6, "compare": True, "interventions": [
        {"sae": "sae1", "latent": 1, "op": "add", "value": 1}]}, 413, "too_many_rows"),
])
def test_bad_requests_are_clear_errors(client, body, status, code):
    r = client.post("/v1/generate", content=json.dumps({"prompt": PROMPT, **body}, allow_nan=True),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code


def test_base_vs_adapter_compare(client):
    assert register(client, "a1").status_code == 201
    res = GenerateResponse.model_validate(_post(client, adapter="a1", compare=True).json())
    assert [g.variant for g in res.generations] == ["base", "adapter"]
    assert [g.adapter for g in res.generations] == [None, "a1"]
    assert res.generations[1].kl is not None and len(res.generations[1].kl) == 6


def test_a_disconnect_mid_stream_frees_the_slot(server_factory):
    server = server_factory("gen", LORASAE_MAX_GENERATIONS="1", LORASAE_MAX_GENERATION_QUEUE="0",
                            LORASAE_MAX_NEW_TOKENS="4000", LORASAE_MAX_TOKENS="4096").start()
    body = json.dumps({"prompt": PROMPT, "max_new_tokens": 4000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:" + str(server.port).encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"event: token") < 3:
        chunk = sock.recv(65536)
        assert chunk, got.decode(errors="replace")
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    busy = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}, timeout=60)
    assert busy.status_code == 429 and busy.headers["retry-after"]
    sock.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "lorasae_generations_active 0.0" in metrics


def test_seeds_make_served_sampling_reproducible(client):
    def run(seed):
        body = _post(client, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed).json()
        return [t["id"] for t in body["generations"][0]["tokens"]]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_a_long_generation_does_not_starve_feature_requests(server_factory):
    """Steps of a generation and feature batches take turns on the engine thread: feature requests
    sent while a long generation streams are answered while it is still streaming."""
    import threading

    server = server_factory("fair", LORASAE_MAX_NEW_TOKENS="4000", LORASAE_MAX_TOKENS="4096").start()
    events: list[str] = []
    started = threading.Event()

    def generate_long() -> None:
        body = {"prompt": PROMPT, "max_new_tokens": 4000, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    started.set()

    thread = threading.Thread(target=generate_long)
    thread.start()
    assert started.wait(120)
    answered = []
    for _ in range(5):
        r = httpx.post(f"{server.url}/v1/features", json={"inputs": ["the cat sat on the mat"] * 4}, timeout=120)
        assert r.status_code == 200
        answered.append(len(events))
    thread.join(600)
    assert events[-1] == "done" and events.count("token") == 4000
    assert all(n < 4000 for n in answered)  # every feature answer came while tokens were still streaming
