"""GPU-scale benchmark of the feature server (issue 17 part 4): a random-weight model of a real
architecture, a wide random SAE and many random adapters, built offline; prints a table, then JSON.

    python bench/scale.py --out bench-output/scale.json         # Llama-3.2-1B shapes, 16k-wide SAE
    python bench/scale.py --small --device cpu --out /tmp/s.json  # tiny shapes: a CPU smoke test

Nothing is downloaded: the model is ``LlamaForCausalLM`` built from Llama-3.2-1B's config (written
below) with random weights on the device, the tokenizer a word-level one over the whole vocabulary
(``tokenizers``; requests send token ids), the SAE a random sae-lens TopK (or JumpReLU) SAE at the
middle layer, the adapters random LoRA adapters (rank 16, the paper's seven modules, the layers
after the SAE) with ``lorasae.json`` manifests that match the model and SAE.

Measured in one process, in interleaved rounds, for 1, 8 and 32 adapters mixed per batch:
1. bare: ``Engine.run_batch`` on full batches of ``--batch`` rows x ``--tokens`` tokens, the rows'
   adapters cycling over the mix (the engine's spliced forward, no HTTP, no batcher);
2. served: the real app (``create_app``) behind uvicorn (the ``lorasae serve`` options), driven by
   ``--clients`` concurrent httpx clients in ``--client-procs`` processes, each client sending
   one-sequence ``/v1/features`` requests with its own adapter (client c: adapter c mod n), so the
   batcher gathers mixed-adapter batches; tokens/s, served/bare (goal >= 0.9x);
3. naive: the same server and clients with the batcher's ``max_batch`` set to 1 (one request per
   forward), served/naive (goal >= 3x);
then adapter swap times, first-request latency of a one-sequence request whose adapter is hot (in
the model), in the CPU tier or on disk only (registered, not loaded), with the engine's own load
time for it; and the time of ``POST /v1/adapters`` (validate + load). Ratios are taken within a
round (absolute times drift on a shared machine) and reported as medians over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.monotonic()

# meta-llama/Llama-3.2-1B config.json (the fields LlamaConfig reads)
LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "initializer_range": 0.02,
}
SMALL: dict[str, Any] = {
    **LLAMA_3_2_1B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOAL_VS_BARE = 0.9
GOAL_VS_NAIVE = 3.0


# imported by ``import sae_lens`` (its training, datasets and plotting code), never used to load or
# run an SAE; bench/gpu.sh does not install them (~150 MB of wheels): stand-ins where missing
IMPORT_ONLY = ("datasets", "wandb", "pandas", "pyarrow", "plotly", "plotly_express", "nltk", "babe", "scipy")


def stand_in_for_missing(names=IMPORT_ONLY) -> list[str]:
    """Make ``import X`` (and ``from X.y import Z``) succeed for the modules ``names`` that are not
    installed, with placeholder objects; installed ones are untouched (the finder comes last)."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import types

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if not missing:
        return []

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder(name)

        def __or__(cls, other):
            return cls

        __ror__ = __or__

        def __getitem__(cls, item):
            return cls

    def _placeholder(name: str):
        return _Meta(name, (), {"__init__": lambda self, *a, **k: None})

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder(name)

    class _Loader(importlib.abc.Loader):
        def create_module(self, spec):
            module = _Module(spec.name)
            module.__path__ = []  # a package: its submodules are stand-ins too
            return module

        def exec_module(self, module):
            pass

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in missing:
                return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
            return None

    sys.meta_path.append(_Finder())
    return missing


class _Stop(Exception):
    """SIGTERM (the wrapper's timeout): stop measuring, report what was measured."""


# ------------------------------------------------------------------ building the world (offline)


def make_tokenizer(vocab_size: int, bos: int, eos: int):
    """A word-level tokenizer with one token per id of the model's vocabulary (``t<id>``), so every
    id decodes as a real tokenizer's would (the server renders each token's text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    names = {0: "<unk>", bos: "<s>", eos: "</s>", 3: "a"}
    for i, name in names.items():
        del vocab[f"t{i}"]
        vocab[name] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(fields: dict[str, Any], device, dtype, work: Path):
    """``LlamaForCausalLM`` with random weights, made on ``device`` (fast even at 1B), and its
    config + tokenizer written to ``work/model`` (the model id)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorasae.models import LoadedModel

    config = LlamaConfig(**fields)
    tokenizer = make_tokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id)
    folder = work / "model"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=str(folder), device=device, dtype=dtype)


def build_sae(arch: str, d_in: int, d_sae: int, k: int, layer: int, folder: Path) -> Path:
    """A random sae-lens SAE (``topk`` with ``k``, or ``jumprelu``) on ``blocks.<layer>.hook_resid_post``,
    saved as a sae-lens folder."""
    import torch
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
    if arch == "topk":
        from sae_lens import TopKSAE, TopKSAEConfig

        sae: Any = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    else:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":  # JumpReLU: a few percent of the latents fire on random inputs
                p.fill_(2.0 / d_in**0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
            else:
                p.zero_()
    sae.save_model(folder)
    return folder


def make_engine(lm, saes, settings):
    """The engine over the built model, with the residency limits where this engine has them."""
    from lorasae.service.engine import Engine

    fields = {f.name for f in dataclasses.fields(Engine)}
    extra = {
        k: getattr(settings, k)
        for k in ("max_loaded_adapters", "max_cpu_adapters")
        if k in fields and hasattr(settings, k)
    }
    return Engine(lm, saes, keep_first=settings.keep_first, **extra)


# ------------------------------------------------------------------ server and clients


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The app behind uvicorn with ``lorasae serve``'s options, in a background thread."""

    def __init__(self, app, settings) -> None:
        import uvicorn

        from lorasae.service.limits import uvicorn_options

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        options = {**uvicorn_options(settings), "port": self.port, "log_level": "warning"}
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def _client_proc(spec: dict) -> dict:
    """One client process: ``spec["clients"]`` lists of pre-encoded bodies, one list per client;
    each client sends its bodies one after the other. Says ``ready`` after opening its connections,
    starts on a line from stdin."""
    import asyncio

    import httpx

    limits = httpx.Limits(max_connections=len(spec["clients"]) + 4, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=spec["url"], timeout=600, limits=limits) as http:
        await asyncio.gather(*(http.get("/healthz") for _ in spec["clients"]))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        latencies: list[float] = []
        errors: list[str] = []
        headers = {"content-type": "application/json"}

        async def client(bodies: list[str]) -> None:
            for body in bodies:
                while True:
                    sent = time.perf_counter()
                    r = await http.post("/v1/features", content=body.encode(), headers=headers)
                    if r.status_code in (429, 503):  # queue full: back off as a client should
                        await asyncio.sleep(0.05)
                        continue
                    break
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors.append(f"{r.status_code} {r.text[:200]}")

        t0 = time.time()
        await asyncio.gather(*(client(bodies) for bodies in spec["clients"]))
        t1 = time.time()
    return {"t0": t0, "t1": t1, "ok": len(latencies), "latencies": latencies, "errors": errors[:5]}


def drive(url: str, per_client: list[list[dict]], procs: int) -> dict:
    """Send the bodies (``per_client[c]``: client c's requests, in order) from ``procs`` client
    processes at once; tokens/s over the window from the first client's start to the last one's end."""
    procs = max(1, min(procs, len(per_client)))
    groups = [per_client[i::procs] for i in range(procs)]
    running = []
    for group in groups:
        spec = {"url": url, "clients": [[json.dumps(b, separators=(",", ":")) for b in c] for c in group]}
        fh = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        with fh:
            json.dump(spec, fh)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client-spec", fh.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        running.append((proc, fh.name))
    try:
        for proc, _ in running:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"client process failed to start: {line!r}")
        for proc, _ in running:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc, _ in running:
            out, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"client process exited {proc.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc, name in running:
            if proc.poll() is None:
                proc.kill()
            Path(name).unlink(missing_ok=True)
    errors = [e for r in results for e in r["errors"]]
    sent = sum(len(c) for c in per_client)
    ok = sum(r["ok"] for r in results)
    if ok != sent:
        raise RuntimeError(f"{sent - ok} of {sent} requests failed: {errors[:3]}")
    tokens = sum(len(b["inputs"][0]) for c in per_client for b in c)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    return {
        "tokens_per_s": tokens / wall,
        "seconds": wall,
        "requests": sent,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
    }


# ------------------------------------------------------------------ measurements


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.result: dict[str, Any] = {"partial": True, "notes": []}

    def note(self, text: str) -> None:
        print(f"note: {text}", file=sys.stderr, flush=True)
        self.result["notes"].append(text)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- setup

    def setup(self, work: Path) -> None:
        import torch

        from lorasae.manifest import SaeEntry
        from lorasae.models import resolve_device, resolve_dtype
        from lorasae.saes import load_sae
        from lorasae.service.settings import Settings

        a = self.args
        device = resolve_device(a.device)
        dtype = resolve_dtype(a.dtype, device)
        fields = dict(SMALL if a.small else LLAMA_3_2_1B)
        n_layers = fields["num_hidden_layers"]
        sae_layer = n_layers // 2
        self.log(f"building a random {'small' if a.small else 'Llama-3.2-1B'} model on {device} ({dtype})")
        lm = build_model(fields, device, dtype, work)
        params = sum(p.numel() for p in lm.model.parameters())
        self.log(
            f"model: {params / 1e6:.1f}M parameters; SAE {a.sae_arch} d_sae {a.d_sae} at layer {sae_layer}"
        )
        sae_dir = build_sae(a.sae_arch, fields["hidden_size"], a.d_sae, a.sae_k, sae_layer, work / "sae")
        sae = load_sae(str(sae_dir), device=device, model=lm.model)
        self.max_mix = max(a.mixes)
        wanted = {
            "model": lm.model_id,
            "saes": [str(sae_dir)],
            "device": str(device),
            "adapter_root": work / "adapters",
            "db_path": work / "registry.sqlite3",
            "max_batch": a.batch,
            "max_batch_tokens": max(8192, a.batch * a.tokens),
            "max_wait_ms": a.max_wait_ms,
            "max_tokens": max(1024, a.tokens),
            "max_queue": max(256, 4 * a.clients),
            "max_connections": max(256, 4 * a.clients),
            "max_loaded_adapters": max(self.max_mix, a.max_loaded_adapters or 0),
            "max_cpu_adapters": a.cpu_adapters,
        }
        known = set(Settings.model_fields)
        self.settings = Settings(**{k: v for k, v in wanted.items() if k in known})
        (work / "adapters").mkdir()
        self.engine = make_engine(lm, [sae], self.settings)
        self.residency = hasattr(self.engine, "make_resident") and hasattr(self.engine, "resident")
        if not self.residency:
            self.note(
                "this engine has no residency API (make_resident/resident): CPU-tier and cold swap skipped"
            )
        self.layers = (sae.layer,)
        self.lora_layers = list(range(sae_layer + 1, n_layers))
        self.vocab = self.engine.vocab_size
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        # adapters: the swap set first (evicted by the later ones when the residency API is there),
        # then the mix set (the last registered: in the model)
        self.swap_names = [f"x{i}" for i in range(a.cpu_adapters + a.swap_reps + 1)] if self.residency else []
        self.mix_names = [f"a{i}" for i in range(self.max_mix)]
        started = time.perf_counter()
        from serve import make_random_adapter  # bench/serve.py, beside this script

        entries = [SaeEntry.of(s) for s in self.engine.saes]
        for seed, name in enumerate(self.swap_names + self.mix_names, start=1):
            out = work / "adapters" / name
            make_random_adapter(self.engine, out, seed, a.rank, self.lora_layers, entries)
        self.log(
            f"wrote {len(self.swap_names) + len(self.mix_names)} adapters "
            f"in {time.perf_counter() - started:.1f}s"
        )
        started = time.perf_counter()
        for i in range(self.vocab):  # a long-running server has every token's text cached
            self.engine.piece(i)
        self.log(f"token texts cached in {time.perf_counter() - started:.1f}s")
        self.result["config"] = {
            "model": "random LlamaForCausalLM, " + ("small config" if a.small else "Llama-3.2-1B config"),
            "model_config": {k: v for k, v in fields.items() if k != "rope_scaling"},
            "parameters": params,
            "dtype": str(dtype),
            "sae": {"arch": a.sae_arch, "d_in": fields["hidden_size"], "d_sae": a.d_sae, "layer": sae_layer}
            | ({"k": a.sae_k} if a.sae_arch == "topk" else {}),
            "adapters": {
                "rank": a.rank,
                "target_modules": TARGETS,
                "layers": self.lora_layers,
                "mix_set": len(self.mix_names),
                "swap_set": len(self.swap_names),
            },
            "batch_rows": a.batch,
            "tokens_per_row": a.tokens,
            "top_k": a.top_k,
            "clients": a.clients,
            "client_procs": a.client_procs,
            "requests_per_client": a.requests_per_client,
            "naive_requests_per_client": a.naive_requests_per_client,
            "max_wait_ms": a.max_wait_ms,
            "max_loaded_adapters": getattr(self.settings, "max_loaded_adapters", None),
            "max_cpu_adapters": getattr(self.settings, "max_cpu_adapters", None),
            "residency_api": self.residency,
            "rounds": a.rounds,
        }

    # -------------------------------------------------------------- helpers

    def ids(self, gen) -> list[int]:
        import torch

        body = torch.randint(4, self.vocab, (self.args.tokens - 1,), generator=gen).tolist()
        return [self.engine.bos, *body]

    def rows(self, mix: int, gen):
        from lorasae.service.engine import Row

        out = []
        for b in range(self.args.batch):
            name = self.mix_names[b % mix]
            slot = self.engine.adapters[name]
            out.append(
                Row(self.ids(gen), name, self.layers, top_k=self.args.top_k, generation=slot.generation)
            )
        return out

    def requests(self, mix: int, per_client: int, gen) -> list[list[dict]]:
        """Per client its bodies: one sequence each, with the client's adapter (client c: c mod mix)."""
        return [
            [
                {"inputs": [self.ids(gen)], "adapter": self.mix_names[c % mix], "top_k": self.args.top_k}
                for _ in range(per_client)
            ]
            for c in range(self.args.clients)
        ]

    # -------------------------------------------------------------- measures

    def bare(self, mix: int, gen) -> dict:
        """``Engine.run_batch`` on full batches (the spliced forward with mixed adapters)."""
        batches = [self.rows(mix, gen) for _ in range(self.args.bare_batches)]
        self.engine.run_batch(batches[0])  # warm (and the adapters of this mix resident)
        self.sync()
        started = time.perf_counter()
        for rows in batches:
            out = self.engine.run_batch(rows)
            bad = [r for r in out if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"bare forward failed: {bad[0]}")
        self.sync()
        seconds = time.perf_counter() - started
        tokens = sum(len(r.ids) for rows in batches for r in rows)
        return {"tokens_per_s": tokens / seconds, "seconds": seconds, "batches": len(batches)}

    def plain(self, gen) -> dict:
        """The model alone on the same batch shape (no SAE, no adapter): the device's ceiling."""
        import contextlib

        import torch

        eng = self.engine
        batches = [
            torch.tensor([self.ids(gen) for _ in range(self.args.batch)], device=eng.device)
            for _ in range(self.args.bare_batches)
        ]
        model = eng.peft if eng.peft is not None else eng.base
        off = eng.peft.disable_adapter() if eng.peft is not None else contextlib.nullcontext()
        with torch.inference_mode(), off:
            model(input_ids=batches[0])
            self.sync()
            started = time.perf_counter()
            for ids in batches:
                model(input_ids=ids).logits.float()
            self.sync()
            seconds = time.perf_counter() - started
        return {"tokens_per_s": sum(t.numel() for t in batches) / seconds, "seconds": seconds}

    def served(self, url: str, mix: int, per_client: int, gen, naive: bool) -> dict:
        batcher = self.service.batcher
        batcher.max_batch = 1 if naive else self.args.batch
        self.batches.clear()
        try:
            out = drive(url, self.requests(mix, per_client, gen), self.args.client_procs)
        finally:
            batcher.max_batch = self.args.batch
        if self.batches:
            out["batches"] = len(self.batches)
            out["mean_rows"] = statistics.mean(n for n, _ in self.batches)
            out["mean_adapters"] = statistics.mean(k for _, k in self.batches)
        return out

    def register(self, http, names: list[str]) -> list[float]:
        times = []
        for name in names:
            started = time.perf_counter()
            r = http.post("/v1/adapters", json={"name": name, "path": name})
            times.append(1000 * (time.perf_counter() - started))
            if r.status_code != 201:
                raise RuntimeError(f"registering {name}: {r.status_code} {r.text[:300]}")
        return times

    def tier(self, name: str) -> str:
        residency = getattr(self.engine, "residency", None)
        if residency is not None and hasattr(residency, "where"):
            return residency.where(name)
        if self.residency:
            return "hot" if name in self.engine.resident() else "evicted"
        return "hot"

    def load_seconds(self) -> float:
        residency = getattr(self.engine, "residency", None)
        stats = getattr(residency, "stats", None)
        return sum(getattr(stats, "load_seconds", {}).values()) if stats is not None else 0.0

    def first_request(self, http, name: str, gen) -> dict:
        body = {"inputs": [self.ids(gen)], "adapter": name, "top_k": self.args.top_k}
        tier = self.tier(name)
        loaded = self.load_seconds()
        started = time.perf_counter()
        r = http.post("/v1/features", json=body)
        ms = 1000 * (time.perf_counter() - started)
        if r.status_code != 200:
            raise RuntimeError(f"request with adapter {name}: {r.status_code} {r.text[:300]}")
        return {"adapter": name, "tier": tier, "ms": ms, "load_ms": 1000 * (self.load_seconds() - loaded)}

    def swaps(self, http, gen) -> dict:
        """First-request latency by the adapter's tier before the request."""
        out: dict[str, Any] = {}
        picks: dict[str, list[dict]] = {"hot": [], "cpu": [], "disk": []}
        for rep in range(self.args.swap_reps):
            # hot: the least recently used adapter in the model (a switch, no load)
            hot = self.engine.resident()[0] if self.residency else self.mix_names[rep % len(self.mix_names)]
            picks["hot"].append(self.first_request(http, hot, gen))
            for tier in ("cpu", "disk"):
                if not self.residency:
                    continue
                found = [n for n in self.swap_names + self.mix_names if self.tier(n) == tier]
                if tier == "cpu":
                    found = found[::-1]
                if found:
                    picks[tier].append(self.first_request(http, found[0], gen))
        for tier, runs in picks.items():
            if runs:
                out[tier] = {
                    "first_request_ms": statistics.median(r["ms"] for r in runs),
                    "load_ms": statistics.median(r["load_ms"] for r in runs),
                    "n": len(runs),
                }
            elif self.residency:
                self.note(f"no adapter was in the {tier} tier when measured: {tier} swap not measured")
        out["runs"] = picks
        if (
            self.residency
            and hasattr(self.engine, "residency")
            and hasattr(self.engine.residency, "snapshot")
        ):
            snap = self.engine.residency.snapshot()
            out["residency"] = {k: snap[k] for k in ("loads", "load_seconds", "evicted", "hits") if k in snap}
        return out

    # -------------------------------------------------------------- the run

    def run(self, work: Path) -> None:
        import httpx
        import torch

        from lorasae.service.app import create_app

        a = self.args
        self.setup(work)
        eng = self.engine
        self.result["device"] = (
            torch.cuda.get_device_name(eng.device)
            if eng.device.type == "cuda"
            else platform.processor() or "cpu"
        )
        self.batches: list[tuple[int, int]] = []
        real = eng.run_batch

        def recording(rows):
            self.batches.append((len(rows), len({r.adapter for r in rows})))
            return real(rows)

        gen = torch.Generator().manual_seed(1)
        app = create_app(self.settings, eng)
        with Server(app, self.settings) as srv, httpx.Client(base_url=srv.url, timeout=600) as http:
            self.service = app.state.service
            deadline = time.monotonic() + 600
            while http.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server never became ready")
                time.sleep(0.05)
            reg = self.register(http, self.swap_names + self.mix_names)
            self.result["register_ms_median"] = statistics.median(reg)
            self.log(f"registered {len(reg)} adapters (median {statistics.median(reg):.0f} ms each)")
            if self.residency:
                self.result["resident_after_registration"] = len(eng.resident())
            # warm: every mix through the engine, the server, the naive path
            for mix in a.mixes:
                self.bare(mix, gen)
            eng.run_batch = recording
            self.served(srv.url, self.max_mix, 1, gen, naive=False)
            self.served(srv.url, self.max_mix, 1, gen, naive=True)
            self.log("warm")
            rounds: list[dict] = []
            self.result["rounds"] = rounds
            reserve = 20.0 + 3 * a.swap_reps
            for r in range(a.rounds):
                started = time.monotonic()
                one: dict[str, Any] = {"plain": self.plain(gen)}
                for mix in a.mixes:
                    one[str(mix)] = {
                        "bare": self.bare(mix, gen),
                        "served": self.served(srv.url, mix, a.requests_per_client, gen, naive=False),
                        "naive": self.served(srv.url, mix, a.naive_requests_per_client, gen, naive=True),
                    }
                rounds.append(one)
                took = time.monotonic() - started
                self.log(f"round {r + 1}/{a.rounds}: {took:.1f}s " + _round_line(one, a.mixes))
                left = a.time_budget_s - (time.monotonic() - STARTED)
                if r + 1 < a.rounds and left < took * 1.2 + reserve:
                    self.note(f"stopped after {r + 1} of {a.rounds} rounds to stay within --time-budget-s")
                    break
            eng.run_batch = real
            self.summarise(rounds)
            self.result["swap"] = self.swaps(http, gen)
        eng.close()
        self.result["partial"] = False

    def summarise(self, rounds: list[dict]) -> None:
        mixes: dict[str, Any] = {}
        for mix in self.args.mixes:
            key = str(mix)
            per = [r[key] for r in rounds if key in r]
            if not per:
                continue

            def med(kind: str, field: str, per=per) -> float:
                return statistics.median(r[kind][field] for r in per)

            vs_bare = statistics.median(r["served"]["tokens_per_s"] / r["bare"]["tokens_per_s"] for r in per)
            vs_naive = statistics.median(
                r["served"]["tokens_per_s"] / r["naive"]["tokens_per_s"] for r in per
            )
            mixes[key] = {
                "bare_tokens_per_s": med("bare", "tokens_per_s"),
                "served_tokens_per_s": med("served", "tokens_per_s"),
                "naive_tokens_per_s": med("naive", "tokens_per_s"),
                "served_vs_bare": vs_bare,
                "served_vs_naive": vs_naive,
                "served_mean_batch_rows": med("served", "mean_rows"),
                "served_mean_adapters_per_batch": med("served", "mean_adapters"),
                "served_p50_ms": med("served", "p50_ms"),
                "naive_p50_ms": med("naive", "p50_ms"),
                "goal_vs_bare_met": vs_bare >= GOAL_VS_BARE,
                "goal_vs_naive_met": vs_naive >= GOAL_VS_NAIVE,
            }
        self.result["mixes"] = mixes
        self.result["plain_tokens_per_s"] = statistics.median(r["plain"]["tokens_per_s"] for r in rounds)
        self.result["goals"] = {
            "served_vs_bare": GOAL_VS_BARE,
            "served_vs_naive": GOAL_VS_NAIVE,
            "all_met": bool(mixes)
            and all(m["goal_vs_bare_met"] and m["goal_vs_naive_met"] for m in mixes.values()),
        }


def _round_line(one: dict, mixes: list[int]) -> str:
    parts = []
    for mix in mixes:
        m = one[str(mix)]
        parts.append(
            f"mix {mix}: served/bare {m['served']['tokens_per_s'] / m['bare']['tokens_per_s']:.2f}x "
            f"served/naive {m['served']['tokens_per_s'] / m['naive']['tokens_per_s']:.2f}x"
        )
    return "; ".join(parts)


def print_table(r: dict) -> None:
    c = r.get("config", {})
    print(
        f"{c.get('model')} ({c.get('parameters', 0) / 1e6:.0f}M params, {c.get('dtype')}) "
        f"on {r.get('device')}; "
        f"torch {r.get('torch')}; SAE {c.get('sae')}; {c.get('batch_rows')} rows x {c.get('tokens_per_row')} "
        f"tokens per batch, {c.get('clients')} clients; {len(r.get('rounds', []))} rounds"
    )
    rows = [("measure", "tok/s or ms", "ratio", "goal")]
    if "plain_tokens_per_s" in r:
        rows.append(
            ("model alone (no SAE, no adapter), full batches", f"{r['plain_tokens_per_s']:.0f}", "", "")
        )
    for mix, m in r.get("mixes", {}).items():
        ok = {True: "met", False: "NOT met"}
        rows += [
            (
                f"[{mix} adapters] bare Engine.run_batch, full batches",
                f"{m['bare_tokens_per_s']:.0f}",
                "",
                "",
            ),
            (
                f"[{mix} adapters] served /v1/features "
                f"(batches {m['served_mean_batch_rows']:.1f} rows, "
                f"{m['served_mean_adapters_per_batch']:.1f} adapters)",
                f"{m['served_tokens_per_s']:.0f}",
                f"{m['served_vs_bare']:.2f}x bare",
                f">= {GOAL_VS_BARE}x: {ok[m['goal_vs_bare_met']]}",
            ),
            (
                f"[{mix} adapters] naive server (max_batch=1)",
                f"{m['naive_tokens_per_s']:.0f}",
                f"served {m['served_vs_naive']:.2f}x",
                f">= {GOAL_VS_NAIVE}x: {ok[m['goal_vs_naive_met']]}",
            ),
            (
                f"[{mix} adapters] request p50 served / naive (ms)",
                f"{m['served_p50_ms']:.0f} / {m['naive_p50_ms']:.0f}",
                "",
                "",
            ),
        ]
    if "register_ms_median" in r:
        rows.append(("POST /v1/adapters (validate + load), ms", f"{r['register_ms_median']:.1f}", "", ""))
    for tier, what in (("hot", "in the model"), ("cpu", "CPU tier"), ("disk", "cold: on disk only")):
        s = r.get("swap", {}).get(tier)
        if s:
            rows.append(
                (
                    f"first request, adapter {what} (engine load ms)",
                    f"{s['first_request_ms']:.1f}",
                    f"load {s['load_ms']:.1f} ms",
                    "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if "goals" in r:
        print(f"all goals met: {r['goals']['all_met']}")
    for note in r.get("notes", []):
        print(f"note: {note}")


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out |= {"transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import sae_lens

        out["sae_lens"] = sae_lens.__version__
    except Exception:  # only for the report
        pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny model, SAE and sizes (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--mixes", default="1,8,32", help="adapters mixed per batch (comma list)")
    p.add_argument("--batch", type=int, default=None, help="rows per forward, the server's max_batch (32)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row / request (256; 16 small)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (2 x batch)")
    p.add_argument("--client-procs", type=int, default=None, help="client processes (4; 2 small)")
    p.add_argument("--requests-per-client", type=int, default=None, help="served run (8; 2 small)")
    p.add_argument("--naive-requests-per-client", type=int, default=None, help="naive run (2; 1 small)")
    p.add_argument("--bare-batches", type=int, default=None, help="batches per bare timing (8; 4 small)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; 2 small)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--sae-arch", choices=["topk", "jumprelu"], default="topk")
    p.add_argument("--d-sae", type=int, default=None, help="SAE width (16384; 256 small)")
    p.add_argument("--sae-k", type=int, default=64, help="TopK k")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the random adapters")
    p.add_argument("--max-loaded-adapters", type=int, default=None, help="default: the largest mix")
    p.add_argument("--cpu-adapters", type=int, default=4, help="the server's max_cpu_adapters")
    p.add_argument("--swap-reps", type=int, default=5, help="first requests timed per tier")
    p.add_argument("--time-budget-s", type=float, default=420, help="stop starting rounds past this")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (model config, SAE, adapters)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--client-spec", default=None, help=argparse.SUPPRESS)  # a client process
    a = p.parse_args(argv)
    if a.client_spec:
        import asyncio

        spec = json.loads(Path(a.client_spec).read_text())
        print(json.dumps(asyncio.run(_client_proc(spec))), flush=True)
        return 0
    small = a.small
    a.mixes = sorted({int(x) for x in a.mixes.split(",")})
    a.batch = a.batch or 32
    a.tokens = a.tokens or (16 if small else 256)
    a.clients = a.clients or 2 * a.batch
    a.client_procs = a.client_procs or (2 if small else 4)
    a.requests_per_client = a.requests_per_client or (2 if small else 8)
    a.naive_requests_per_client = a.naive_requests_per_client or (1 if small else 2)
    a.bare_batches = a.bare_batches or (4 if small else 8)
    a.rounds = a.rounds or (2 if small else 3)
    a.d_sae = a.d_sae or (256 if small else 16384)
    if max(a.mixes) > a.batch:
        p.error(f"--batch {a.batch} cannot mix {max(a.mixes)} adapters per batch")

    def stop(*_):
        raise _Stop()

    stood_in = stand_in_for_missing()

    signal.signal(signal.SIGTERM, stop)
    bench = Bench(a)
    bench.result |= versions()
    bench.result["args"] = {k: v for k, v in vars(a).items() if k != "client_spec"}
    if stood_in:
        bench.note(
            f"not installed, stood in for (import-only dependencies of sae-lens): {', '.join(stood_in)}"
        )
    work = Path(tempfile.mkdtemp(prefix="lorasae-scale-"))
    failed = None
    try:
        bench.run(work)
    except (_Stop, KeyboardInterrupt):
        bench.note("interrupted (timeout): partial results")
        failed = "interrupted"
    except Exception as exc:
        import traceback

        traceback.print_exc()
        bench.note(f"failed: {type(exc).__name__}: {exc}")
        failed = "error"
    finally:
        if bench.result.get("rounds") and "mixes" not in bench.result:
            bench.summarise(bench.result["rounds"])
        bench.result["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        text = json.dumps(bench.result, indent=2, default=str)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(text + "\n")
        print_table(bench.result)
        print(text)
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if failed is None else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
