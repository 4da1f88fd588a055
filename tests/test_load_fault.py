"""Load and fault suite against a real ``lorasae serve`` process (uvicorn on 127.0.0.1).

Tiny random model + tiny SAEs (``service_fixtures``), never the default model. Each part runs its
own server process:

1. load: ``LORASAE_LOAD_CLIENTS`` concurrent clients for ``LORASAE_LOAD_SECONDS`` mix
   ``/v1/features`` over several adapters (and none) with register/delete of other adapters; no
   5xx, and the responses equal the offline splice code (``lorasae.splice.Splice`` on a fresh copy
   of the model + ``PeftModel.from_pretrained``, one sequence at a time);
2. hostile: >= 200 generated malformed or hostile requests, each answered with its documented 4xx;
   the server stays up, the registry (API listing and SQLite rows) is unchanged and the served
   numbers are still right;
3. kill -9 during registrations and during load: after a restart on the same database and
   adapter root, the registry holds exactly the committed adapters, each loads and answers;
4. overload: a small queue flooded: 429/503 with Retry-After past the bound, never another 5xx,
   bounded RSS, and recovery.

``make test`` runs a bounded version; ``make load`` lengthens it through the env vars. The summary
is printed (visible with ``pytest -s``) and written to ``test-output/load_fault_summary.json``.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import random
import shutil
import statistics
import struct
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from service_fixtures import REPO, SAE_LAYERS, TEXTS, WORDS, ServerProcess, server_factory, world  # noqa: F401

pytestmark = pytest.mark.load

SUMMARY_PATH = REPO / "test-output" / "load_fault_summary.json"
LOAD_SECONDS = float(os.environ.get("LORASAE_LOAD_SECONDS", "8"))
LOAD_CLIENTS = int(os.environ.get("LORASAE_LOAD_CLIENTS", "16"))
API_KEY = "load-fault-secret"
ADMIN = {"Authorization": f"Bearer {API_KEY}"}
STABLE = ("a1", "a2", "a12")  # registered before the load, never deleted during it
TOL = 1e-4  # served (batched, padded, mixed adapters) vs offline (one sequence): float32 noise
SAMPLE_CAP = 500  # responses kept (reservoir) for the numeric comparison
# The flooded server queues at most 4 rows of <= 128 tokens; its RSS may move by the allocator's
# caching and the connections' buffers, not with the size of the flood.
RSS_BOUND_MB = 64.0
# every part's server: the admin key, request limits, and one torch thread (the clients share the
# small, busy CPU with the server)
SERVER = {"api_key": API_KEY, "LORASAE_TORCH_THREADS": "1", "LORASAE_MAX_TOKENS": "128",
          "LORASAE_MAX_INPUTS": "8", "LORASAE_MAX_FULL_LOGITS": "20000", "LORASAE_MAX_UPLOAD_MB": "0.25"}
# the load parts expect no 429: a queue for every client's <= 3 rows (the overload part tests 429)
ROOMY_QUEUE = {"LORASAE_MAX_QUEUE": str(max(256, 4 * LOAD_CLIENTS + 64))}
UPLOAD_LIMIT = int(0.25 * 2**20)


# ------------------------------------------------------------------ offline reference numbers


class Reference:
    """The offline numbers: ``lorasae.splice.Splice`` on a fresh copy of the tiny model, wrapped
    with ``PeftModel.from_pretrained`` for an adapter, one sequence at a time (not the server's code)."""

    def __init__(self, world) -> None:
        from peft import PeftModel

        from lorasae.models import load_model
        from lorasae.saes import load_sae

        lm = load_model(str(world.model), "cpu")
        self.tokenizer = lm.tokenizer
        self.bos = lm.tokenizer.bos_token_id
        self.saes = {layer: load_sae(str(world.saes[layer]), model=lm.model) for layer in SAE_LAYERS}
        self.models = {None: lm.model.eval()}
        for name in STABLE:
            base = load_model(str(world.model), "cpu").model
            self.models[name] = PeftModel.from_pretrained(base, str(world.adapters / name)).eval()
        manifests = {name: json.loads((world.adapters / name / "lorasae.json").read_text())
                     for name in STABLE}
        self.trained_layers = {name: tuple(sorted(s["layer"] for s in m["saes"]))
                               for name, m in manifests.items()}
        self.vocab_size = int(lm.model.config.vocab_size)
        self._cache: dict[tuple, dict] = {}
        self._lock = threading.Lock()

    def ids(self, item: str | list[int]) -> list[int]:
        if isinstance(item, list):
            return item
        return [self.bos] + list(self.tokenizer(item, add_special_tokens=False)["input_ids"])

    def layers(self, body: dict, source: str | None) -> tuple[int, ...]:
        """The SAE layers a request splices (``saes`` null: the adapter's own, else all)."""
        if body.get("saes") is None:
            return self.trained_layers[source] if source else tuple(SAE_LAYERS)
        return tuple(sorted({int(s[-1]) for s in body["saes"]}))

    def numbers(self, ids: list[int], adapter: str | None, layers: tuple[int, ...]) -> dict:
        from lorasae.splice import Splice

        key = (tuple(ids), adapter, layers)
        with self._lock:
            if key not in self._cache:
                model = self.models[adapter]
                with torch.inference_mode(), Splice(model, [self.saes[layer] for layer in layers],
                                                    keep_first=True, record=True) as splice:
                    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
                self._cache[key] = {
                    "latents": {layer: splice.records[layer].latents[0] for layer in layers},
                    "error": {layer: splice.records[layer].error_sq()[0] for layer in layers},
                    "logprobs": torch.log_softmax(logits, -1)}
            return self._cache[key]

    def check(self, body: dict, response: dict, source: str | None) -> None:
        """Assert that ``response`` (to ``body``, served through an adapter made from ``source``)
        equals the offline numbers within ``TOL``; near-ties may swap top-k order, so every served
        entry is checked against the reference value at its own index."""
        layers = self.layers(body, source)
        assert [s["layer"] for s in response["saes"]] == list(layers)
        items = [body["inputs"]] if isinstance(body["inputs"], str) else body["inputs"]
        assert len(response["results"]) == len(items)
        top_k = body.get("top_k", 8)
        for item, result in zip(items, response["results"]):
            ids = self.ids(item)
            tokens = result["tokens"]
            assert [t["id"] for t in tokens] == ids
            ref = self.numbers(ids, source, layers)
            for t, tok in enumerate(tokens):
                assert tok["position"] == t
                for layer in layers:
                    latents = ref["latents"][layer][t]
                    kth = latents.topk(min(top_k, latents.numel())).values
                    got = tok["features"][f"sae{layer}"]
                    assert len(got) == int((kth > 0).sum()), (t, layer, got, kth)
                    assert len({f["index"] for f in got}) == len(got)
                    for f in got:
                        expected = float(latents[f["index"]])
                        assert abs(expected - f["activation"]) <= TOL * (1 + f["activation"])
                        assert f["activation"] >= float(kth[-1]) - TOL
                    assert math.isclose(tok["recon_error"][f"sae{layer}"], float(ref["error"][layer][t]),
                                        rel_tol=TOL, abs_tol=TOL)
                if t + 1 < len(ids):
                    assert abs(tok["loss"] - float(-ref["logprobs"][t, ids[t + 1]])) <= TOL
                else:
                    assert tok["loss"] is None
                if body.get("logits") == "top_k":
                    k = min(body.get("logits_top_k", 5), self.vocab_size)
                    kth_lp = float(ref["logprobs"][t].topk(k).values[-1])
                    assert len(tok["top_logits"]) == k
                    for entry in tok["top_logits"]:
                        assert abs(entry["logprob"] - float(ref["logprobs"][t, entry["id"]])) <= TOL
                        assert entry["logprob"] >= kth_lp - TOL


@pytest.fixture(scope="module")
def refs(world) -> Reference:
    return Reference(world)


# ------------------------------------------------------------------ shared helpers


def _tar_dir(folder: Path, arcname: str = "adapter") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _random_body(rng: random.Random, pool_ids: list[list[int]], pool_texts: list[str]) -> dict:
    """A valid /v1/features body over the stable adapters (or none), SAE choices and options."""
    n = rng.randint(1, 3)
    inputs = rng.sample(pool_texts, n) if rng.random() < 0.3 else rng.sample(pool_ids, n)
    body = {"inputs": inputs, "adapter": rng.choice([None, *STABLE]),
            "saes": rng.choice([None, ["sae1", "sae2"], ["sae2"], ["sae1"]]),
            "top_k": rng.choice([1, 4, 8])}
    if rng.random() < 0.5:
        body.update(logits="top_k", logits_top_k=3)
    return body


def _pools(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[str]]:
    rng = random.Random(seed)
    ids = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))] for _ in range(10)]
    texts = TEXTS + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(5)]
    return ids, texts


@dataclass
class Tally:
    """What the clients saw: statuses per route, latencies of /v1/features, kept responses."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    seen: int = 0
    sample: list[tuple[dict, dict, str | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def keep(self, rng: random.Random, item: tuple[dict, dict, str | None]) -> None:
        self.seen += 1
        if len(self.sample) < SAMPLE_CAP:
            self.sample.append(item)
        elif (j := rng.randrange(self.seen)) < SAMPLE_CAP:
            self.sample[j] = item


async def _features_worker(http: httpx.AsyncClient, deadline: float, rng: random.Random,
                           tally: Tally, vocab: int) -> None:
    pool_ids, pool_texts = _pools(vocab)
    while time.monotonic() < deadline:
        body = _random_body(rng, pool_ids, pool_texts)
        started = time.perf_counter()
        r = await http.post("/v1/features", json=body)
        tally.latencies.append(time.perf_counter() - started)
        tally.statuses[f"features {r.status_code}"] += 1
        if r.status_code != 200:
            tally.problems.append(f"features {r.status_code}: {r.text[:200]}")
            continue
        data = r.json()
        tally.tokens += sum(len(res["tokens"]) for res in data["results"])
        tally.keep(rng, (body, data, body["adapter"]))


@dataclass
class Churn:
    """Register/delete of adapters other than the stable ones; ``state[name]`` is what the client
    knows: "present" (201 received, no delete sent), "absent" (204 received) or "unknown"
    (a request for it was in flight)."""

    state: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)


async def _churn_worker(http: httpx.AsyncClient, w: int, deadline: float, tally: Tally,
                        churn: Churn, uploads: dict[str, bytes], rng: random.Random,
                        delete: bool = True) -> None:
    i = 0
    while time.monotonic() < deadline:
        name, source = f"churn-{w}-{i}", ("a1", "a2")[i % 2]
        churn.source[name], churn.state[name] = source, "unknown"
        if i % 3 == 2:  # an upload (packed folder) every third time, else a folder of the root
            r = await http.post("/v1/adapters", data={"name": name}, headers=ADMIN,
                                files={"file": (f"{source}.tar.gz", uploads[source])})
        else:
            r = await http.post("/v1/adapters", json={"name": name, "path": source}, headers=ADMIN)
        tally.statuses[f"register {r.status_code}"] += 1
        if r.status_code != 201:
            tally.problems.append(f"register {name} {r.status_code}: {r.text[:200]}")
            return
        churn.state[name] = "present"
        body = {"inputs": [[1, 5, 9, 12, 7, 30]], "adapter": name, "top_k": 8}
        r = await http.post("/v1/features", json=body)
        tally.statuses[f"features {r.status_code}"] += 1
        if r.status_code != 200:
            tally.problems.append(f"features on {name} {r.status_code}: {r.text[:200]}")
            return
        tally.keep(rng, (body, r.json(), source))
        if delete:
            churn.state[name] = "unknown"
            r = await http.delete(f"/v1/adapters/{name}", headers=ADMIN)
            tally.statuses[f"delete {r.status_code}"] += 1
            if r.status_code != 204:
                tally.problems.append(f"delete {name} {r.status_code}: {r.text[:200]}")
                return
            churn.state[name] = "absent"
        i += 1


def _client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=120,
                             limits=httpx.Limits(max_connections=connections,
                                                 max_keepalive_connections=connections))


def _register_stable(server: ServerProcess) -> None:
    for name in STABLE:
        r = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": name}, headers=ADMIN,
                       timeout=60)
        assert r.status_code == 201, r.text


def _verify_sample(refs: Reference, tally: Tally) -> int:
    """Compare the kept responses to the offline numbers; returns how many were compared."""
    for body, data, source in tally.sample:
        try:
            refs.check(body, data, source)
        except AssertionError as exc:
            tally.problems.append(f"numbers differ for {body}: {exc}"[:500])
    return len(tally.sample)


# ------------------------------------------------------------------ summary


@pytest.fixture(scope="module")
def summary():
    """Each test adds its section; written to test-output/ and printed after the module."""
    data: dict = {"config": {"load_seconds": LOAD_SECONDS, "load_clients": LOAD_CLIENTS,
                             "rss_bound_mb": RSS_BOUND_MB}}
    yield data
    totals: Counter = Counter()
    for section in ("load", "hostile", "kill9", "overload"):
        for status, n in data.get(section, {}).get("status_counts", {}).items():
            totals[status] += n
    data["total"] = {
        "status_counts": dict(sorted(totals.items())),
        "5xx": sum(n for status, n in totals.items() if status.startswith("5")),
        "5xx_other_than_503": sum(n for status, n in totals.items()
                                  if status.startswith("5") and status != "503"),
        "lost_adapters": data.get("kill9", {}).get("lost_adapters"),
        "p50_ms": data.get("load", {}).get("p50_ms"), "p99_ms": data.get("load", {}).get("p99_ms"),
        "rss_before_mb": data.get("overload", {}).get("rss_before_mb"),
        "rss_peak_mb": data.get("overload", {}).get("rss_peak_mb"),
    }
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print("\n==== load/fault summary ====")
    for section, values in data.items():
        print(f"{section}: {json.dumps(values)}")
    print(f"(written to {SUMMARY_PATH})")


def _status_counts(statuses: Counter) -> dict[str, int]:
    """Per HTTP status (the route prefix dropped), for the summary."""
    counts: Counter = Counter()
    for key, n in statuses.items():
        counts[key.rsplit(" ", 1)[-1]] += n
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------ 1. load


def test_load_mixed_adapters_with_churn(server_factory, refs, world, summary):
    server = server_factory("load", **SERVER, **ROOMY_QUEUE).start()
    _register_stable(server)
    uploads = {name: _tar_dir(world.adapters / name) for name in ("a1", "a2")}
    tally, churn = Tally(), Churn()

    async def main() -> float:
        async with _client(server.url, LOAD_CLIENTS + 4) as http:
            started = time.monotonic()
            deadline = started + LOAD_SECONDS
            await asyncio.gather(
                *(_features_worker(http, deadline, random.Random(c), tally, refs.vocab_size)
                  for c in range(LOAD_CLIENTS)),
                *(_churn_worker(http, w, deadline, tally, churn, uploads, random.Random(100 + w))
                  for w in range(2)))
            return time.monotonic() - started

    wall = asyncio.run(main())
    compared = _verify_sample(refs, tally)
    listed = [a["name"] for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]]
    features = [k for k in tally.statuses if k.startswith("features")]
    n_features = sum(tally.statuses[k] for k in features)
    lat_ms = [x * 1000 for x in tally.latencies]
    section = {
        "clients": LOAD_CLIENTS, "seconds": round(wall, 1), "requests": sum(tally.statuses.values()),
        "status_counts": _status_counts(tally.statuses), "by_route": dict(sorted(tally.statuses.items())),
        "features_requests": n_features, "requests_per_s": round(n_features / wall, 1),
        "tokens_per_s": round(tally.tokens / wall, 1),
        "p50_ms": round(statistics.median(lat_ms), 1), "p99_ms": round(_percentile(lat_ms, 99), 1),
        "responses_compared_offline": compared, "adapters_churned": len(churn.state),
        "problems": len(tally.problems)}
    summary["load"] = section
    print(f"\nload: {json.dumps(section)}")
    assert not tally.problems, tally.problems[:5]
    assert set(tally.statuses) <= {"features 200", "register 201", "delete 204"}
    assert tally.statuses["register 201"] >= 2 and tally.statuses["delete 204"] >= 2, tally.statuses
    assert compared >= min(200, tally.seen)
    assert listed == sorted(STABLE)  # every churned adapter was deleted again
    assert server.alive() and server.unexpected_errors() == 0, server.log_tail()


# ------------------------------------------------------------------ 2. hostile requests


@dataclass
class Case:
    family: str
    label: str
    method: str
    path: str
    expect: int
    code: str | None = None
    kwargs: dict = field(default_factory=dict)
    body: dict | None = None  # for a 200, the features body to check numerically


def _json_bytes(value) -> bytes:
    # ensure_ascii escapes lone surrogates as \udXXX, the way a hostile client would send them
    return json.dumps(value).encode()


def _features_cases(vocab: int, limits_tokens: int = 128) -> list[Case]:
    cases: list[Case] = []
    ct = {"content-type": "application/json"}

    def feat(family: str, label: str, body, expect: int, code: str | None = None,
             headers: dict | None = None) -> None:
        content = body if isinstance(body, bytes) else _json_bytes(body)
        cases.append(Case(family, label, "POST", "/v1/features", expect, code,
                          {"content": content, "headers": headers or ct},
                          json.loads(content) if expect == 200 else None))  # as the server reads it

    wrong = {
        "inputs": [5, 5.5, True, None, {}, {"a": 1}, [1, 2], [[1, "x"]], [["a"]], [[1.5]], [[True]],
                   [[None]], [[[1]]], ["a", ["b"]], [1, "a"]],
        "top_k": ["5", 5.5, True, None, [], {}, "", -1, 0, 1025, 10**30, -(10**30)],
        "logits_top_k": ["5", 5.5, True, None, [], {}, -1, 0, 1001, 10**30],
        "logits": [5, "FULL", "", None, "top-k", ["full"]],
        "adapter": [5, [], {}, True, 1.5],
        "saes": ["sae1", [5], [], [None], {"a": 1}, 5],
    }
    for field_name, values in wrong.items():
        for value in values:
            body = {"inputs": "the cat", field_name: value}
            feat("wrong_type", f"{field_name}={value!r}"[:60], body, 422, "validation_error")
    for body in ({"inputs": "a", "x": 1}, {"input": "a"}, {}, []):
        feat("wrong_type", f"body {body!r}", body, 422, "validation_error")

    malformed = [b"", b"{", b"[", b"null", b"1", b'"str"', b"{not json", b'{"inputs": NaN}',
                 b'{"inputs": "a", "top_k": Infinity}', b'{"inputs": "a"}garbage', b"\xff\xfe",
                 b'{"inputs": "a \xff b"}', b"[" * 50_000 + b"]" * 50_000,
                 b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    for i, raw in enumerate(malformed):
        feat("malformed_json", f"#{i}", raw, 422, "validation_error")
        # any other content type is refused before the body is read (no cross-site simple requests)
        feat("content_type", f"#{i} text/plain", raw, 415, "unsupported_media_type",
             {"content-type": "text/plain"})

    for inputs in ("", " ", "\n\t ", [], [""], ["ok", " "], [[]], [[1], []]):
        feat("empty", repr(inputs), {"inputs": inputs}, 422, "validation_error")

    huge = [("2 MB text", {"inputs": "word " * 400_000}, "too_many_tokens"),
            ("text over the char bound", {"inputs": "the " * 5000}, "too_many_tokens"),
            ("text over the token limit", {"inputs": "the " * (limits_tokens + 10)}, "too_many_tokens"),
            ("emoji flood", {"inputs": "\U0001F600" * 10_000}, "too_many_tokens"),
            ("ids 129", {"inputs": [[1] * (limits_tokens + 1)]}, "too_many_tokens"),
            ("ids 100k", {"inputs": [[1] * 100_000]}, "too_many_tokens"),
            ("9 texts", {"inputs": ["a"] * 9}, "too_many_inputs"),
            ("9 id lists", {"inputs": [[1]] * 9}, "too_many_inputs"),
            ("1000 x 1000 ids", {"inputs": [[1] * 1000] * 1000}, "too_many_inputs"),
            ("full logits", {"inputs": [[1] * 100] * 8, "logits": "full"}, "too_many_logits")]
    for label, body, code in huge:
        feat("huge", label, body, 413, code)

    valid_unicode = ["\u202eabc the cat", "\u05e9\u05dc\u05d5\u05dd the", "\u0645\u0631\u062d\u0628\u0627",
                     "\u200b", "a\u200db\u200c", "\ufeffthe", "\U0001F600",
                     "\U0001F469\u200d\U0001F469\u200d\U0001F467",
                     "\u0000", "a\u0000b", "e\u0301", "\U0010ffff", "\ufffd", "\u180e", "\ud83d\ude00"]
    for text in valid_unicode:
        feat("unicode_ok", repr(text), {"inputs": text, "top_k": 4}, 200)
    surrogates = [b'{"inputs": "\\ud800"}', b'{"inputs": "\\udfff the"}', b'{"inputs": "a\\ud83d"}',
                  b'{"inputs": "\\udc00\\ud800"}', b'{"inputs": ["ok", "\\ud800"]}',
                  b'{"inputs": "a \xed\xa0\x80 b"}', b'{"inputs": "\xed\xbf\xbf"}',
                  b'{"inputs": ["\xed\xa0\x80"]}']
    for raw in surrogates:
        feat("lone_surrogate", repr(raw)[:60], raw, 422, "validation_error")
    feat("lone_surrogate", "adapter", b'{"inputs": "a", "adapter": "\\ud800"}', 404, "unknown_adapter")
    feat("lone_surrogate", "saes", b'{"inputs": "a", "saes": ["\\ud800"]}', 404, "unknown_sae")

    for sel in (["nope"], ["3"], ["0"], ["-1"], ["1.0"], ["sae1", "nope"], ["SAE1"], [" sae1"],
                ["../sae1"], ["blocks.1.hook_resid_post"], [""]):
        feat("unknown_sae", repr(sel), {"inputs": "a", "saes": sel}, 404, "unknown_sae")
    for name in ("nope", "A1", "a1 ", "../a1", "__base__", "", "a" * 1000, "\u0000"):
        feat("unknown_adapter", repr(name)[:40], {"inputs": "a", "adapter": name}, 404, "unknown_adapter")
    for ids in ([[vocab]], [[-1]], [[2**31]], [[2**63]], [[2**70]], [[1, 5, 10**20]], [[-(2**70)]]):
        feat("token_id", repr(ids)[:40], {"inputs": ids}, 422, "invalid_token_id")
    feat("top_k_edge", "top_k 1024", {"inputs": "the cat", "top_k": 1024}, 200)
    return cases


def _adapter_variants(root: Path, outside: Path) -> list[tuple[str, int, str]]:
    """Broken adapter folders inside ``root`` (copies of a1, one thing wrong each):
    (folder, expected status, expected code)."""
    from safetensors.torch import load_file, save_file

    variants: list[tuple[str, int, str]] = []
    weights = (root / "a1" / "adapter_model.safetensors").read_bytes()
    state = load_file(str(root / "a1" / "adapter_model.safetensors"))

    def make(name: str, expect: int, code: str, change: Callable[[Path], None]) -> None:
        folder = root / name
        shutil.copytree(root / "a1", folder)
        change(folder)
        variants.append((name, expect, code))

    def write(file: str, data: bytes) -> Callable[[Path], None]:
        return lambda folder: (folder / file).write_bytes(data)

    def config(**changes) -> Callable[[Path], None]:
        def change(folder: Path) -> None:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            cfg.update(changes)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return change

    def manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
        def change(folder: Path) -> None:
            data = json.loads((folder / "lorasae.json").read_text())
            edit(data)
            (folder / "lorasae.json").write_text(json.dumps(data))
        return change

    def tensors(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
        return lambda folder: save_file(fn(dict(state)), str(folder / "adapter_model.safetensors"))

    key = next(iter(state))
    header = b'{"%s":{"dtype":"F32","shape":[4,32],"data_offsets":[0,99999]}}' % key.encode()
    for label, data in [("empty", b""), ("8-bytes", weights[:8]), ("half", weights[:len(weights) // 2]),
                        ("one-byte-short", weights[:-1]), ("header-huge", struct.pack("<Q", 2**62) + b"{}"),
                        ("header-garbage", struct.pack("<Q", 10) + b"x" * 10),
                        ("offsets-beyond", struct.pack("<Q", len(header)) + header),
                        ("no-tensors", struct.pack("<Q", 2) + b"{}"), ("random", os.urandom(4096))]:
        make(f"st-{label}", 400, "invalid_adapter", write("adapter_model.safetensors", data))
    make("st-int32", 400, "invalid_adapter", tensors(lambda s: {k: v.to(torch.int32) for k, v in s.items()}))
    make("st-nan", 400, "invalid_adapter", tensors(lambda s: {k: v * float("nan") for k, v in s.items()}))
    make("st-inf", 400, "invalid_adapter", tensors(lambda s: {k: v / 0.0 for k, v in s.items()}))
    make("st-3d", 409, "adapter_mismatch", tensors(lambda s: {k: v[None] for k, v in s.items()}))
    make("st-foreign-key", 409, "adapter_mismatch",
         tensors(lambda s: {**s, "base_model.model.lm_head.weight": torch.zeros(4, 32)}))
    make("st-missing", 400, "invalid_adapter", lambda f: (f / "adapter_model.safetensors").unlink())
    make("cfg-not-json", 400, "invalid_adapter", write("adapter_config.json", b"{nope"))
    make("cfg-list", 400, "invalid_adapter", write("adapter_config.json", b"[1, 2]"))
    make("cfg-missing", 400, "invalid_adapter", lambda f: (f / "adapter_config.json").unlink())
    make("cfg-ia3", 400, "invalid_adapter", config(peft_type="IA3"))
    make("cfg-dora", 400, "invalid_adapter", config(use_dora=True))
    make("cfg-r0", 400, "invalid_adapter", config(r=0))
    make("cfg-rank-pattern-0", 400, "invalid_adapter",
         config(rank_pattern={"model.layers.3.self_attn.q_proj": 0}))
    make("cfg-r-mismatch", 409, "adapter_mismatch", config(r=8))
    make("cfg-no-such-module", 409, "adapter_mismatch", config(target_modules=["foo_proj"]))
    make("cfg-layers-out-of-range", 409, "adapter_mismatch", config(layers_to_transform=[7]))
    make("cfg-extra-target", 409, "adapter_mismatch",
         config(target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    make("cfg-norm-target", 409, "adapter_mismatch",
         config(target_modules=["q_proj", "v_proj", "input_layernorm"], init_lora_weights=False))
    make("man-missing", 400, "invalid_adapter", lambda f: (f / "lorasae.json").unlink())
    make("man-not-json", 400, "invalid_adapter", write("lorasae.json", b"{"))
    make("man-list", 400, "invalid_adapter", write("lorasae.json", b"[1]"))
    make("man-saes-str", 400, "invalid_adapter", manifest(lambda m: m.update(saes="x")))
    make("man-sae-entry", 400, "invalid_adapter", manifest(lambda m: m.update(saes=[{"id": 1}])))
    make("man-other-model", 409, "adapter_mismatch",
         manifest(lambda m: m.update(base_model_fingerprint="0123456789abcdef")))
    make("man-other-sae", 409, "adapter_mismatch",
         manifest(lambda m: m["saes"][0].update(fingerprint="fedcba9876543210")))
    make("man-layer-str", 400, "invalid_adapter", manifest(lambda m: m["saes"][0].update(layer="x")))
    # links inside the root that lead outside it
    shutil.copytree(root / "a1", outside / "a1")
    (root / "link-dir").symlink_to(outside / "a1")
    variants.append(("link-dir", 400, "path_outside_root"))
    make("link-weights", 400, "path_outside_root", lambda f: (
        (f / "adapter_model.safetensors").unlink(),
        (f / "adapter_model.safetensors").symlink_to(outside / "a1" / "adapter_model.safetensors")))
    make("link-manifest", 400, "path_outside_root", lambda f: (
        (f / "lorasae.json").unlink(), (f / "lorasae.json").symlink_to(outside / "a1" / "lorasae.json")))
    (root / "link-loop").symlink_to(root / "link-loop")
    variants.append(("link-loop", 400, "invalid_path"))
    (root / "link-etc").symlink_to("/etc")
    variants.append(("link-etc", 400, "path_outside_root"))
    return variants


def _archive_cases(root: Path) -> list[tuple[str, bytes, int, str | None]]:
    """Hostile uploads: (label, archive bytes, expected status, expected code)."""
    good = _tar_dir(root / "a1")

    def tar(add: Callable[[tarfile.TarFile], None], mode: str = "w:gz") -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as tf:
            add(tf)
        return buffer.getvalue()

    def member(tf: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
        for k, v in attrs.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if info.size else None)

    def with_adapter(extra: Callable[[tarfile.TarFile], None]) -> Callable[[tarfile.TarFile], None]:
        def add(tf: tarfile.TarFile) -> None:
            tf.add(root / "a1", arcname="adapter")
            extra(tf)
        return add

    def zipped(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression) as zf:
            for name, data in entries.items():
                zf.writestr(name, data)
        return buffer.getvalue()

    def flipped(data: bytes, at: float) -> bytes:
        i = int(len(data) * at)
        return data[:i] + bytes(b ^ 0xA5 for b in data[i:i + 16]) + data[i + 16:]

    big = b"\0" * (4 * UPLOAD_LIMIT + 4096)
    cases = [
        ("not an archive", b"not an archive at all", 400, "invalid_archive"),
        ("empty file", b"", 400, "invalid_archive"),
        ("random bytes", os.urandom(2048), 400, "invalid_archive"),
        ("gzip of garbage", __import__("gzip").compress(os.urandom(512)), 400, "invalid_archive"),
        ("tar.gz cut at 50%", good[:len(good) // 2], 400, "invalid_archive"),
        ("tar.gz cut at 90%", good[:int(len(good) * 0.9)], 400, "invalid_archive"),
        ("tar.gz bits flipped at 30%", flipped(good, 0.3), 400, None),
        ("tar.gz bits flipped at 60%", flipped(good, 0.6), 400, None),
        ("tar.gz bits flipped at 95%", flipped(good, 0.95), 400, None),
        ("corrupt adapter", _tar_dir(root / "corrupt"), 400, "invalid_adapter"),
        ("manifest for another model", _tar_dir(root / "mismatch"), 409, "adapter_mismatch"),
        ("wrong LoRA shapes", _tar_dir(root / "badshape"), 409, "adapter_mismatch"),
        ("no adapter inside", tar(lambda tf: member(tf, "readme.txt")), 400, "invalid_adapter"),
        ("two adapters", tar(lambda tf: (tf.add(root / "a1", arcname="x"), tf.add(root / "a2", arcname="y"))),
         400, "invalid_adapter"),
        ("member ../escape", tar(with_adapter(lambda tf: member(tf, "../escape"))), 400, "invalid_archive"),
        ("member ../../ deep", tar(with_adapter(lambda tf: member(tf, "adapter/../../../etc/x"))),
         400, "invalid_archive"),
        ("absolute symlink", tar(with_adapter(lambda tf: member(
            tf, "adapter/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"))), 400, "invalid_archive"),
        ("relative symlink out", tar(with_adapter(lambda tf: member(
            tf, "adapter/link", type=tarfile.SYMTYPE, linkname="../../../../etc/passwd"))),
         400, "invalid_archive"),
        ("hardlink out", tar(with_adapter(lambda tf: member(
            tf, "adapter/hard", type=tarfile.LNKTYPE, linkname="../../etc/passwd"))), 400, "invalid_archive"),
        ("fifo member", tar(with_adapter(lambda tf: member(tf, "adapter/fifo", type=tarfile.FIFOTYPE))),
         400, "invalid_archive"),
        ("device member", tar(with_adapter(lambda tf: member(tf, "adapter/dev", type=tarfile.CHRTYPE))),
         400, "invalid_archive"),
        ("zip ../escape", zipped({"adapter/lorasae.json": b"{}", "../escape": b"x"}), 400, "invalid_archive"),
        ("zip absolute", zipped({"/etc/evil": b"x"}), 400, "invalid_archive"),
        ("zip truncated", zipped({"adapter/lorasae.json": b"{}" * 100})[:60], 400, "invalid_archive"),
        ("zip corrupt deflate", flipped(zipped({"adapter/lorasae.json": os.urandom(3000).hex().encode()},
                                              zipfile.ZIP_DEFLATED), 0.4), 400, "invalid_archive"),
        ("zip bomb", zipped({"adapter/big.bin": big}, zipfile.ZIP_DEFLATED), 413, "upload_too_large"),
        ("tar.gz bomb", tar(lambda tf: member(tf, "adapter/big.bin", big)), 413, "upload_too_large"),
        ("over max_upload_mb", os.urandom(UPLOAD_LIMIT + 4096), 413, "upload_too_large"),
        ("far over (content-length)", os.urandom(2 * 2**20), 413, "upload_too_large"),
    ]
    return cases


def _admin_cases(root: Path, outside: Path) -> list[Case]:
    cases: list[Case] = []
    n = iter(range(10_000))

    def register(family: str, label: str, body, expect: int, code: str | None,
                 headers: dict | None = None) -> None:
        content = body if isinstance(body, bytes) else _json_bytes(body)
        cases.append(Case(family, label, "POST", "/v1/adapters", expect, code,
                          {"content": content, "headers": {"content-type": "application/json",
                                                           **(ADMIN if headers is None else headers)}}))

    for name in ("", "a" * 65, "../x", "a/b", "__base__", "a b", "\u00e4", "a\u0000", "\U0001F600",
                 ".hidden", "-dash", "_x", 5, None, [], {}, True):
        register("bad_name", repr(name)[:40], {"name": name, "path": "a1"}, 422, "validation_error")
    register("bad_name", "lone surrogate", b'{"name": "\\ud800", "path": "a1"}', 422, "validation_error")
    register("duplicate", "a1 again", {"name": "a1", "path": "a1"}, 409, "duplicate_adapter")
    register("duplicate", "a1 from a2", {"name": "a1", "path": "a2"}, 409, "duplicate_adapter")
    for body in (b"", b"{", b"null", b"[]", b'"x"', b"\xff", b"[" * 50_000, b'{"name": "x"}',
                 b'{"path": "a1"}', b'{"name": "x", "path": 5}', b'{"name": "x", "path": null}',
                 b'{"name": "x", "path": ["a1"]}'):
        register("malformed_json", repr(body)[:40], body, 422, "validation_error")

    paths = [("../", "path_outside_root"), ("../..", "path_outside_root"), ("/etc", "path_outside_root"),
             ("/", "path_outside_root"), ("a1/../../", "path_outside_root"), ("..", "path_outside_root"),
             ("~", "path_outside_root"), ("~root", None),  # None: the account may not exist
             ("a1/../../../etc/passwd", "path_outside_root"), (str(outside / "a1"), "path_outside_root"),
             ("a" * 5000, "invalid_path"), ("a/" * 3000, "invalid_path"), ("a1\u0000", "invalid_path"),
             ("does-not-exist", "path_not_found"), ("%2e%2e%2f", "path_not_found"),
             ("a1/adapter_config.json", "path_not_found"), ("uploads", "path_reserved"),
             (".", "invalid_adapter"), ("not-an-adapter", "invalid_adapter"),
             ("corrupt", "invalid_adapter")]
    for path, code in paths:
        register("path", repr(path)[:40], {"name": f"p{next(n)}", "path": path}, 400, code)
    register("path", "empty", {"name": f"p{next(n)}", "path": ""}, 422, "validation_error")
    register("path", "mismatch fixture", {"name": f"p{next(n)}", "path": "mismatch"}, 409, "adapter_mismatch")
    register("path", "badshape fixture", {"name": f"p{next(n)}", "path": "badshape"}, 409, "adapter_mismatch")
    for folder, expect, code in _adapter_variants(root, outside):
        register("broken_adapter", folder, {"name": f"v{next(n)}", "path": folder}, expect, code)

    for label, archive, expect, code in _archive_cases(root):
        cases.append(Case("upload", label, "POST", "/v1/adapters", expect, code,
                          {"data": {"name": f"u{next(n)}"}, "files": {"file": ("x.tar.gz", archive)},
                           "headers": ADMIN}))
    good = _tar_dir(root / "a1")
    multipart = [
        ("no file part", {"data": {"name": "m1"}, "files": {"other": ("x", b"1")}}, 422, "validation_error"),
        ("file as a plain field", {"data": {"name": "m2", "file": "abc"},
                                   "files": {"other": ("x", b"1")}}, 422, "validation_error"),
        ("no name", {"files": {"file": ("a.tar.gz", good)}}, 422, "validation_error"),
        ("bad name", {"data": {"name": "../x"}, "files": {"file": ("a.tar.gz", good)}},
         422, "validation_error"),
        ("name __base__", {"data": {"name": "__base__"}, "files": {"file": ("a.tar.gz", good)}},
         422, "validation_error"),
        ("duplicate name", {"data": {"name": "a1"}, "files": {"file": ("a.tar.gz", good)}},
         409, "duplicate_adapter"),
        ("two files", {"data": {"name": "m3"}, "files": [("file", ("a.tar.gz", good)),
                                                          ("file", ("b.tar.gz", good))]}, 400, None),
        ("garbage multipart", {"content": b"garbage", "headers": {
            "content-type": "multipart/form-data; boundary=xyz"}}, 400, None),
        ("missing boundary", {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
         400, None),
    ]
    for label, kwargs, expect, code in multipart:
        kwargs["headers"] = {**ADMIN, **kwargs.get("headers", {})}
        cases.append(Case("multipart", label, "POST", "/v1/adapters", expect, code, kwargs))
    raw_name = (b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\n\xed\xa0\x80\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.tar.gz"\r\n\r\n'
                + good + b"\r\n--b--\r\n")
    cases.append(Case("multipart", "surrogate bytes in name", "POST", "/v1/adapters", 422, "validation_error",
                      {"content": raw_name,
                       "headers": {**ADMIN, "content-type": "multipart/form-data; boundary=b"}}))

    bad_auth = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                {"Authorization": "Bearer"}, {"Authorization": f"Token {API_KEY}"},
                {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": f"Bearer {API_KEY.upper()}"},
                {"Authorization": "Bearer " + "k" * 10_000}, {"Authorization": b"Bearer \xff\xfe"},
                {"X-Api-Key": API_KEY}]
    for i, headers in enumerate(bad_auth):
        register("auth", f"register #{i}", {"name": f"auth{i}", "path": "a2"}, 401, "unauthorized", headers)
        cases.append(Case("auth", f"delete #{i}", "DELETE", "/v1/adapters/a1", 401, "unauthorized",
                          {"headers": headers}))
        cases.append(Case("auth", f"upload #{i}", "POST", "/v1/adapters", 401, "unauthorized",
                          {"data": {"name": f"authu{i}"}, "files": {"file": ("a.tar.gz", good)},
                           "headers": headers}))

    routes = [("GET", "/v1/features", 405), ("PUT", "/v1/adapters", 405), ("PATCH", "/v1/adapters/a1", 405),
              ("DELETE", "/v1/adapters", 405), ("POST", "/healthz", 405), ("GET", "/v1/adapters/nope", 404),
              ("GET", "/v1/adapters/..%2F..%2Fetc%2Fpasswd", 404), ("GET", "/v1/adapters/%00", 404),
              ("GET", "/nope", 404), ("DELETE", "/v1/adapters/nope", 404),
              ("DELETE", "/v1/adapters/%2e%2e", 404),
              ("GET", "/v1/adapters/" + "x" * 5000, 404)]
    for method, path, expect in routes:
        cases.append(Case("route", f"{method} {path[:40]}", method, path, expect, None, {"headers": ADMIN}))
    return cases


async def _send_cases(url: str, cases: list[Case], concurrency: int = 8) -> list[httpx.Response | Exception]:
    """Each case on a fresh connection: a request the server refuses before reading its body may
    end its connection, which a pooled client would then reuse for an unrelated case."""
    gate = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, case: Case):
        async with gate:
            try:
                return await http.request(case.method, case.path, **case.kwargs)
            except httpx.HTTPError as exc:
                return exc

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return await asyncio.gather(*(one(http, case) for case in cases))


def test_hostile_requests(server_factory, refs, world, tmp_path, summary):
    server = server_factory("hostile", **SERVER)
    outside = tmp_path / "outside-the-root"
    outside.mkdir()
    cases = _features_cases(refs.vocab_size) + _admin_cases(server.adapter_root, outside)
    server.start()
    r = httpx.post(f"{server.url}/v1/adapters", json={"name": "a1", "path": "a1"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{server.url}/v1/adapters", data={"name": "a2"}, headers=ADMIN,
                   files={"file": ("a2.tar.gz", _tar_dir(world.adapters / "a2"))})
    assert r.status_code == 201, r.text
    listing_before, rows_before = httpx.get(f"{server.url}/v1/adapters").json(), server.db_rows()
    uploads_before = sorted(p.name for p in (server.adapter_root / "uploads").iterdir())

    responses = asyncio.run(_send_cases(server.url, cases))

    counts: Counter = Counter()
    families: Counter = Counter()
    wrong = []
    for case, response in zip(cases, responses):
        families[case.family] += 1
        if isinstance(response, Exception):
            counts["no answer"] += 1
            wrong.append(f"{case.family}/{case.label}: {type(response).__name__}: {response}")
            continue
        counts[str(response.status_code)] += 1
        ok = response.status_code == case.expect
        if ok and case.expect != 200:
            error = response.json().get("error", {})
            ok = set(error) == {"code", "message"} and (case.code is None or error["code"] == case.code)
        if ok and case.body is not None:
            try:
                refs.check(case.body, response.json(), None)
            except AssertionError as exc:
                ok, response = False, f"numbers differ: {exc}"
        if not ok:
            text = response if isinstance(response, str) else f"{response.status_code} {response.text[:200]}"
            wrong.append(f"{case.family}/{case.label}: expected {case.expect} {case.code or ''}, got {text}")

    hostile = sum(1 for case in cases if case.expect >= 400)
    alive = server.alive() and httpx.get(f"{server.url}/healthz").status_code == 200
    ready = httpx.get(f"{server.url}/readyz").json()
    listing_after, rows_after = httpx.get(f"{server.url}/v1/adapters").json(), server.db_rows()
    uploads_after = sorted(p.name for p in (server.adapter_root / "uploads").iterdir())
    # and the served numbers are still right (a refused adapter must leave no trace in the model)
    for adapter in (None, "a1", "a2"):
        body = {"inputs": [[1, 5, 9, 12, 7, 30], [1, 40, 41]], "adapter": adapter, "top_k": 8,
                "logits": "top_k", "logits_top_k": 3}
        r = httpx.post(f"{server.url}/v1/features", json=body)
        assert r.status_code == 200, r.text
        refs.check(body, r.json(), adapter)
    section = {"requests": len(cases), "hostile_4xx_expected": hostile,
               "families": dict(sorted(families.items())), "status_counts": dict(sorted(counts.items())),
               "wrong": len(wrong), "server_alive": alive,
               "registry_unchanged": listing_after == listing_before and rows_after == rows_before}
    summary["hostile"] = section
    print(f"\nhostile: {json.dumps(section)}")
    assert not wrong, "\n".join(wrong[:20])
    assert hostile >= 200
    assert alive and ready["status"] == "ready" and ready["adapters"] == 2
    assert listing_after == listing_before and rows_after == rows_before
    assert uploads_after == uploads_before  # refused uploads left nothing behind
    assert not any((server.adapter_root / ".incoming").iterdir())
    assert server.unexpected_errors() == 0, server.log_tail()


# ------------------------------------------------------------------ 3. kill -9


def _check_after_restart(server: ServerProcess, refs: Reference, churn: Churn) -> dict:
    """After a restart: committed adapters present, refused/deleted ones absent, in-flight ones
    either; every listed adapter ready and answering with its source's numbers."""
    listed = {a["name"]: a for a in httpx.get(f"{server.url}/v1/adapters").json()["adapters"]}
    rows = {row[0] for row in server.db_rows()}
    lost = sorted(n for n, s in churn.state.items() if s == "present" and n not in listed)
    resurrected = sorted(n for n, s in churn.state.items() if s == "absent" and n in listed)
    broken = []
    body = {"inputs": [[1, 5, 9, 12, 7, 30], [1, 40, 41, 2]], "top_k": 8, "logits": "top_k",
            "logits_top_k": 3}
    for name, info in listed.items():
        r = httpx.post(f"{server.url}/v1/features", json={**body, "adapter": name})
        if info["status"] != "ready" or r.status_code != 200:
            broken.append(f"{name}: {info['status']} {info['error']} / {r.status_code} {r.text[:200]}")
            continue
        try:
            refs.check({**body, "adapter": name}, r.json(), churn.source[name])
        except AssertionError as exc:
            broken.append(f"{name}: numbers differ: {exc}")
    uploads = server.adapter_root / "uploads"
    referenced = {info["path"] for info in listed.values() if info["source"] == "upload"}
    orphans = [p for p in uploads.iterdir()
               if f"uploads/{p.name}" not in referenced] if uploads.exists() else []
    incoming = server.adapter_root / ".incoming"
    result = {"listed": len(listed), "committed": sum(s == "present" for s in churn.state.values()),
              "in_flight": sum(s == "unknown" for s in churn.state.values()),
              "in_flight_present": sum(s == "unknown" and n in listed for n, s in churn.state.items()),
              "lost": lost, "resurrected": resurrected, "broken": broken,
              "db_matches_listing": rows == set(listed), "orphan_upload_dirs": len(orphans),
              "incoming_leftovers": len(list(incoming.iterdir())) if incoming.exists() else 0}
    for name, state in churn.state.items():  # what was in flight is now settled, one way or the other
        if state == "unknown":
            churn.state[name] = "present" if name in listed else "absent"
    return result


def test_kill9_during_registration_and_load(server_factory, refs, world, summary):
    server = server_factory("kill9", **SERVER, **ROOMY_QUEUE).start()
    _register_stable(server)
    churn = Churn(state={name: "present" for name in STABLE}, source={name: name for name in STABLE})
    uploads = {name: _tar_dir(world.adapters / name) for name in ("a1", "a2")}
    tally = Tally()

    async def registration_burst(n: int = 16, kill_after: int = 3) -> None:
        """n registrations at once (they run one at a time on the server); kill -9 as soon as
        ``kill_after`` of them got their 201, with the rest in flight, while features load runs."""
        done = asyncio.Event()

        async def register(http: httpx.AsyncClient, i: int) -> None:
            name, source = f"burst-{i}", ("a1", "a2")[i % 2]
            churn.source[name], churn.state[name] = source, "unknown"
            try:
                if i % 2:
                    r = await http.post("/v1/adapters", data={"name": name}, headers=ADMIN,
                                        files={"file": (f"{source}.tar.gz", uploads[source])})
                else:
                    r = await http.post("/v1/adapters", json={"name": name, "path": source}, headers=ADMIN)
            except httpx.TransportError:
                return  # killed while in flight
            tally.statuses[f"register {r.status_code}"] += 1
            assert r.status_code == 201, r.text
            churn.state[name] = "present"
            if sum(s == "present" for s in churn.state.values()) - len(STABLE) >= kill_after \
                    and not done.is_set():
                server.kill9()
                done.set()

        async def features(http: httpx.AsyncClient, rng: random.Random) -> None:
            try:
                await _features_worker(http, time.monotonic() + 60, rng, tally, refs.vocab_size)
            except httpx.TransportError:
                return

        async with _client(server.url, n + 8) as http:
            loads = [asyncio.create_task(features(http, random.Random(c))) for c in range(4)]
            await asyncio.gather(*(register(http, i) for i in range(n)))
            await done.wait()
            await asyncio.gather(*loads)

    asyncio.run(registration_burst())
    assert not server.alive()
    in_flight_at_kill = sum(s == "unknown" for s in churn.state.values())
    server.start()
    first = _check_after_restart(server, refs, churn)

    async def load_then_kill() -> None:
        """Features load + registrations and deletes; kill -9 at a random moment."""
        kill_at = LOAD_SECONDS / 4 + random.Random(1).random() * LOAD_SECONDS / 4

        async def guarded(coro) -> None:
            try:
                await coro
            except httpx.TransportError:
                pass  # the kill

        async with _client(server.url, LOAD_CLIENTS + 8) as http:
            deadline = time.monotonic() + 120
            tasks = [asyncio.create_task(guarded(_features_worker(http, deadline, random.Random(c), tally,
                                                                  refs.vocab_size)))
                     for c in range(LOAD_CLIENTS)]
            tasks += [asyncio.create_task(guarded(_churn_worker(
                http, w, deadline, tally, churn, uploads, random.Random(w), delete=w % 2 == 0)))
                for w in range(10, 14)]
            registered = tally.statuses["register 201"]
            await asyncio.sleep(kill_at)
            # on a busy machine registrations are slow: kill only once this phase committed one
            while tally.statuses["register 201"] == registered and time.monotonic() < deadline - 30:
                await asyncio.sleep(0.05)
            server.kill9()
            await asyncio.gather(*tasks)

    registered_before = tally.statuses["register 201"]
    asyncio.run(load_then_kill())
    server.start()
    second = _check_after_restart(server, refs, churn)
    lost = len(first["lost"]) + len(second["lost"])
    section = {"in_flight_registrations_at_first_kill": in_flight_at_kill,
               "after_kill_during_registration": {k: v if not isinstance(v, list) else len(v)
                                                  for k, v in first.items()},
               "after_kill_during_load": {k: v if not isinstance(v, list) else len(v)
                                          for k, v in second.items()},
               "status_counts": _status_counts(tally.statuses), "lost_adapters": lost,
               "broken_adapters": len(first["broken"]) + len(second["broken"])}
    summary["kill9"] = section
    print(f"\nkill9: {json.dumps(section)}")
    assert in_flight_at_kill >= 1  # the kill really landed during registrations
    assert set(tally.statuses) <= {"features 200", "register 201", "delete 204"}, tally.statuses
    assert not tally.problems, tally.problems[:5]
    for check in (first, second):
        assert not check["lost"] and not check["resurrected"] and not check["broken"], check
        assert check["db_matches_listing"]
        # the restart swept what the kill left half-done: no unpacked or unreferenced uploads
        assert check["incoming_leftovers"] == 0 and check["orphan_upload_dirs"] == 0, check
    assert tally.statuses["register 201"] > registered_before  # the second phase committed some too
    assert server.unexpected_errors() == 0, server.log_tail()


# ------------------------------------------------------------------ 4. overload


def test_queue_overload(server_factory, refs, summary):
    max_queue = 4
    server = server_factory("overload", LORASAE_MAX_QUEUE=str(max_queue), LORASAE_MAX_BATCH="1",
                            LORASAE_MAX_WAIT_MS="0", **SERVER).start()
    pool_ids, _ = _pools(refs.vocab_size)
    rng = random.Random(0)
    body = {"inputs": [[1] + [rng.randrange(3, refs.vocab_size) for _ in range(120)] for _ in range(2)],
            "top_k": 8, "logits": "top_k", "logits_top_k": 5}
    for _ in range(20):  # warm: allocator and caches at their working size before the baseline
        assert httpx.post(f"{server.url}/v1/features", json=body, timeout=60).status_code == 200
    rss_before = server.rss_mb()
    peak = [rss_before]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    flood_seconds = max(3.0, LOAD_SECONDS / 2)
    concurrency = max(128, 4 * LOAD_CLIENTS)
    statuses: Counter = Counter()
    missing_retry_after = []

    async def flood() -> None:
        async def worker(http: httpx.AsyncClient, deadline: float) -> None:
            while time.monotonic() < deadline:  # a hostile client: no backoff, no Retry-After
                r = await http.post("/v1/features", json=body)
                statuses[str(r.status_code)] += 1
                if r.status_code in (429, 503) and not r.headers.get("retry-after", "").isdigit():
                    missing_retry_after.append(r.status_code)

        async with _client(server.url, concurrency) as http:
            deadline = time.monotonic() + flood_seconds
            await asyncio.gather(*(worker(http, deadline) for _ in range(concurrency)))

    sampler.start()
    started = time.monotonic()
    asyncio.run(flood())
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    too_big = httpx.post(f"{server.url}/v1/features", json={"inputs": [[1, 5]] * (max_queue + 1)})
    # recovery: the queue drains, plain requests succeed again with the right numbers
    recovered = []
    for ids in pool_ids[:8]:
        check = {"inputs": [ids], "top_k": 8}
        r = httpx.post(f"{server.url}/v1/features", json=check, timeout=60)
        recovered.append(r.status_code)
        if r.status_code == 200:
            refs.check(check, r.json(), None)
    depth = next(line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                 if line.startswith("lorasae_queue_depth"))
    section = {"max_queue": max_queue, "clients": concurrency, "seconds": round(wall, 1),
               "requests": sum(statuses.values()), "status_counts": dict(sorted(statuses.items())),
               "rss_before_mb": round(rss_before, 1), "rss_peak_mb": round(peak[0], 1),
               "rss_growth_mb": round(peak[0] - rss_before, 1), "rss_bound_mb": RSS_BOUND_MB,
               "oversized_request_status": too_big.status_code, "recovered": recovered == [200] * 8}
    summary["overload"] = section
    print(f"\noverload: {json.dumps(section)}")
    assert set(statuses) <= {"200", "429", "503"}, statuses
    assert statuses["429"] + statuses["503"] > 0 and statuses["200"] > 0, statuses
    assert not missing_retry_after
    assert peak[0] - rss_before < RSS_BOUND_MB, section
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_many_inputs"
    assert recovered == [200] * 8 and float(depth.split()[-1]) == 0
    assert server.alive() and httpx.get(f"{server.url}/healthz").status_code == 200
    assert server.unexpected_errors() == 0, server.log_tail()
