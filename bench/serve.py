"""Benchmark of the feature server against issue 5's bars; prints a table of ratios, then JSON.

    python bench/serve.py                       # the embedded default model + default SAE
    python bench/serve.py --model DIR --sae SAE_DIR --quick   # a tiny model, a short run

Measures, on one loaded model (same process, real HTTP on 127.0.0.1 through uvicorn):
1. served: ``/v1/features`` throughput (real tokens/s) under ``--clients`` concurrent clients
   (asyncio, in a separate process, each with one request in flight at a time), requests cycling over two random LoRA adapters and the base model (mixed batches);
2. bare: the same batches the server formed (same rows, same padding), as plain HF forwards of the
   model without SAE or adapter; and the same requests as one plain forward each (batch 1): the
   ratio of the two is the most any batching server can gain over one forward per request on this
   device (the ceiling of the served/naive bar);
3. naive: a server that runs one hooked (spliced) forward per request, no batching, same clients;
4. hot swap: extra latency of a one-row forward when the adapter changes from the previous request
   (peft's per-row ``adapter_names``: nothing moves) vs reloading the adapter from disk
   (validate + load its files into the model, what a server without hot swap does per switch).
5. residency: a one-row forward whose adapter is in the model (hot), in the CPU tier (moved into
   the model first) or evicted to disk (its files read, checked and loaded first).
Targets (issue 5): served/bare >= 0.8, served/naive >= 3, hot swap <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """uvicorn serving ``app`` in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_random_adapter(engine, out: Path, seed: int, rank: int = 16, layers: list[int] | None = None,
                        sae_entries: list | None = None) -> Path:
    """A LoRA adapter with random weights for ``engine``'s model, written as a trained adapter would
    be (peft files + matching lorasae.json), without loading a second copy of the model. B is
    non-zero (the adapter changes the model). ``layers``: the decoder layers adapted (default:
    every one after the first SAE); ``sae_entries``: ``SaeEntry.of`` each loaded SAE, when the
    caller made them once (hashing a wide SAE takes a second)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lorasae.manifest import AdapterManifest, SaeEntry
    from lorasae.models import decoder_layers

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    present = {name.rsplit(".", 1)[-1] for name, _ in engine.base.named_modules()}
    targets = [t for t in targets if t in present] or ["c_attn"]
    n_layers = len(decoder_layers(engine.base))
    if layers is None:
        layers = list(range(min(s.layer for s in engine.saes) + 1, n_layers)) or list(range(n_layers))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, layers_to_transform=layers,
                        lora_dropout=0.0)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in engine.base.named_modules():
        parts = name.split(".")
        if parts[-1] not in targets or not isinstance(module, torch.nn.Linear):
            continue
        if not any(f".{layer}." in f".{name}." for layer in layers):
            continue
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
        state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"))
    AdapterManifest(base_model=engine.model_id, base_model_fingerprint=engine.model_fingerprint,
                    saes=sae_entries or [SaeEntry.of(s) for s in engine.saes],
                    lora={"rank": rank, "alpha": 2 * rank, "target_modules": targets,
                          "layers_to_transform": layers},
                    created_at="bench").save(out)
    return out


def make_inputs(engine, n: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of ``tokens`` ids: held-out corpus text for the default model, else random ids."""
    import torch

    from lorasae.models import DEFAULT_MODEL_NAME

    body = tokens - 1
    if engine.model_id == DEFAULT_MODEL_NAME:
        from lorasae.data import token_stream

        stream = token_stream(engine.lm.tokenizer, "heldout", n * body).tolist()
    else:
        gen = torch.Generator().manual_seed(seed)
        stream = torch.randint(3, engine.vocab_size, (n * body,), generator=gen).tolist()
    bos = [engine.bos] if engine.bos is not None else [stream[0]]
    return [bos + stream[i * body:(i + 1) * body] for i in range(n)]


async def _drive(url: str, requests: list[dict], clients: int) -> float:
    """Send ``requests`` with ``clients`` concurrent workers; returns the wall time."""
    from lorasae_client import AsyncLoraSaeClient

    queue: asyncio.Queue = asyncio.Queue()
    for body in requests:
        queue.put_nowait(body)

    async def worker(api):
        while not queue.empty():
            body = queue.get_nowait()
            await api.features(body["inputs"], adapter=body["adapter"], top_k=body["top_k"])

    async with AsyncLoraSaeClient(url, timeout=600, max_retries=10) as api:
        started = time.perf_counter()
        await asyncio.gather(*(worker(api) for _ in range(clients)))
        return time.perf_counter() - started


def drive(url: str, requests: list[dict], clients: int) -> float:
    """``_drive`` in a separate process (clients never share the server's interpreter and GIL)."""
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(requests, fh)
    code = ("import asyncio, json, sys; sys.path.insert(0, sys.argv[4]); import serve; "
            "reqs = json.load(open(sys.argv[2])); "
            "print(asyncio.run(serve._drive(sys.argv[1], reqs, int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, url, fh.name, str(clients),
                          str(Path(__file__).resolve().parent)],
                         check=True, capture_output=True, text=True)
    Path(fh.name).unlink()
    return float(out.stdout.strip().splitlines()[-1])


def naive_app(engine):
    """One hooked forward per request: no batching, requests serialised on one lock."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    from lorasae.service.engine import Row
    from lorasae.service.routes.features import render_tokens

    app = FastAPI()
    lock = threading.Lock()
    layers = tuple(s.layer for s in engine.saes)

    @app.post("/v1/features")
    def features(body: dict) -> Response:  # sync: runs in the threadpool, like a plain Flask view
        results = []
        adapter = body.get("adapter")
        generation = engine.adapters[adapter].generation if adapter else 0
        for ids in body["inputs"]:
            with lock:
                out = engine.run_batch([Row(ids, adapter, layers, body.get("top_k", 8), generation=generation)])[0]
            results.append({"tokens": render_tokens(engine, out)})
        return Response(json.dumps({"model": engine.model_id, "adapter": body.get("adapter"),
                                    "saes": engine.sae_info(), "results": results}),
                        media_type="application/json")
    return app


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def run(args) -> dict:
    import torch

    from lorasae.service.app import create_app
    from lorasae.service.engine import Engine, Row
    from lorasae.service.settings import Settings
    from lorasae.training.train_sae import ensure_default_sae
    from lorasae_client import LoraSaeClient

    work = Path(tempfile.mkdtemp(prefix="lorasae-bench-"))
    settings = Settings(model=args.model, saes=args.sae or [], device=args.device, dtype=args.dtype,
                        adapter_root=work / "adapters", db_path=work / "registry.sqlite3",
                        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        max_tokens=max(1024, args.tokens), torch_threads=args.threads)
    print(f"loading {args.model} ...", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_settings(settings, ensure_default_sae)  # trains the default SAE if missing
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, seed in (("A", 1), ("B", 2)):
        make_random_adapter(engine, settings.adapter_root / name, seed)
    inputs = make_inputs(engine, args.requests, args.tokens)
    cycle = ["A", "B", None]
    requests = [{"inputs": [ids], "adapter": cycle[i % 3], "top_k": args.top_k}
                for i, ids in enumerate(inputs)]
    warm = requests[:max(args.clients, 4)]
    n_tokens = sum(len(r["inputs"][0]) for r in requests)

    # 1. the server, mixed adapters, concurrent clients; record the batches it forms
    batches: list[list[int]] = []
    real_run = engine.run_batch

    def recording(rows):
        batches.append([len(r.ids) for r in rows])
        return real_run(rows)

    with _Server(create_app(settings, engine)) as srv:
        with LoraSaeClient(srv.url) as api:
            api.wait_ready(timeout=600)
            api.register_adapter("A", "A")
            api.register_adapter("B", "B")
        drive(srv.url, warm, args.clients)
        engine.run_batch = recording
        served_s = drive(srv.url, requests, args.clients)
        engine.run_batch = real_run

        # 4. hot swap vs reload, on the engine thread's code path (server idle)
        one = inputs[0]
        layers = tuple(s.layer for s in engine.saes)

        def forward(adapter):
            generation = engine.adapters[adapter].generation if adapter else 0
            out = engine.run_batch([Row(one, adapter, layers, args.top_k, generation=generation)])[0]
            assert not isinstance(out, Exception), out
            sync()

        forward("A")
        same = _median_ms(lambda: forward("A"), args.swap_reps)
        flip = iter(["B", "A"] * args.swap_reps)
        alternating = _median_ms(lambda: forward(next(flip)), args.swap_reps)

        def reload():
            engine.remove_adapter("B")
            engine.add_adapter("B", engine.validate_adapter(settings.adapter_root / "B"))
            sync()

        reload_ms = _median_ms(reload, max(3, args.swap_reps // 4))

        # 5. residency: a one-row forward whose adapter is in the model, in the CPU tier, on disk
        def first_use(tier: str) -> float:
            engine.residency.max_cpu = 1 if tier == "cpu" else 0
            engine.evict("A")
            where = engine.residency.where("A")
            assert where == tier, (where, tier, engine.residency.snapshot())
            started = time.perf_counter()
            forward("A")
            return (time.perf_counter() - started) * 1000

        first_ms = {"hot": same}
        for tier in ("cpu", "disk"):
            first_ms[tier] = statistics.median(first_use(tier) for _ in range(max(3, args.swap_reps // 4)))
    served_tps = n_tokens / served_s

    # 3. naive server: one hooked forward per request
    with _Server(naive_app(engine)) as srv:
        drive(srv.url, warm, args.clients)
        naive_s = drive(srv.url, requests, args.clients)
    naive_tps = n_tokens / naive_s

    # 2. bare HF forwards of the same batches (no SAE, no adapter: the plain model)
    for name in list(engine.adapters):
        engine.remove_adapter(name)
    assert engine.peft is None
    model = engine.base
    shapes = [(len(b), max(b)) for b in batches]
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randint(3, engine.vocab_size, s, generator=gen).to(device) for s in shapes]
    with torch.inference_mode():
        for t in tensors[:2]:
            model(input_ids=t)
        sync()
        started = time.perf_counter()
        for t in tensors:
            model(input_ids=t)
        sync()
        bare_s = time.perf_counter() - started
        singles = [torch.tensor([ids], device=device) for ids in inputs]
        started = time.perf_counter()
        for t in singles:
            model(input_ids=t)
        sync()
        single_s = time.perf_counter() - started
    bare_tps = n_tokens / bare_s
    single_tps = n_tokens / single_s
    engine.close()

    swap_ms = max(0.0, alternating - same)
    return {
        "model": engine.model_id, "device": str(device), "dtype": str(engine.lm.dtype),
        "torch_threads": torch.get_num_threads(),
        "saes": list(engine.names.values()), "clients": args.clients, "requests": args.requests,
        "tokens_per_request": args.tokens, "top_k": args.top_k,
        "batches": len(batches), "mean_batch_rows": round(sum(map(len, batches)) / len(batches), 2),
        "served_tokens_per_s": round(served_tps, 1), "bare_tokens_per_s": round(bare_tps, 1),
        "naive_tokens_per_s": round(naive_tps, 1), "bare_batch1_tokens_per_s": round(single_tps, 1),
        "batching_ceiling": round(bare_tps / single_tps, 3),
        "served_vs_bare": round(served_tps / bare_tps, 3),
        "served_vs_naive": round(served_tps / naive_tps, 3),
        "forward_same_adapter_ms": round(same, 3), "forward_alternating_adapter_ms": round(alternating, 3),
        "hot_swap_ms": round(swap_ms, 3), "reload_from_disk_ms": round(reload_ms, 3),
        # below ~0.05 ms the difference of two medians is noise: no ratio then
        "reload_vs_hot_swap": round(reload_ms / swap_ms, 1) if swap_ms >= 0.05 else None,
        "first_request_ms": {tier: round(ms, 3) for tier, ms in first_ms.items()},
    }


def print_table(r: dict) -> None:
    rows = [
        ("served /v1/features, tokens/s", f"{r['served_tokens_per_s']:.1f}", ""),
        ("bare HF forwards (same batches), tokens/s", f"{r['bare_tokens_per_s']:.1f}", ""),
        ("naive server (1 forward/request), tokens/s", f"{r['naive_tokens_per_s']:.1f}", ""),
        ("bare HF forwards, one per request (batch 1), tokens/s", f"{r['bare_batch1_tokens_per_s']:.1f}", ""),
        ("served / bare", f"{r['served_vs_bare']:.2f}x", ">= 0.8x"),
        ("served / naive", f"{r['served_vs_naive']:.2f}x", ">= 3x"),
        ("batching ceiling: bare batched / bare batch 1", f"{r['batching_ceiling']:.2f}x", "(device bound)"),
        ("one-row forward, same adapter (ms)", f"{r['forward_same_adapter_ms']:.2f}", ""),
        ("one-row forward, adapter switched (ms)", f"{r['forward_alternating_adapter_ms']:.2f}", ""),
        ("hot-swap overhead (ms)", f"{r['hot_swap_ms']:.2f}", "<= 5 ms"),
        ("reload adapter from disk (ms)", f"{r['reload_from_disk_ms']:.2f}", ""),
        *((f"one-row forward, adapter {where} (ms)", f"{r['first_request_ms'][tier]:.2f}", "")
          for tier, where in (("hot", "in the model"), ("cpu", "in the CPU tier"), ("disk", "on disk"))),
    ]
    print(f"model {r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} threads), SAEs {r['saes']}; {r['clients']} clients, "
          f"{r['requests']} requests x {r['tokens_per_request']} tokens, {r['batches']} batches "
          f"(mean {r['mean_batch_rows']} rows)")
    width = max(len(a) for a, _, _ in rows)
    print(f"{'metric':<{width}}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--sae", action="append", help="SAE spec (repeat; default: the default SAE)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="default: 8 per client (4 with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per request (default 128; 32 quick)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--swap-reps", type=int, default=None, help="reps of the swap timings (40; 20 quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 on a busy CPU avoids oversubscription)")
    p.add_argument("--quick", action="store_true", help="short run (tiny models, smoke checks)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.requests = args.requests or args.clients * (4 if args.quick else 8)
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.swap_reps = args.swap_reps or (20 if args.quick else 40)
    result = run(args)
    print_table(result)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
