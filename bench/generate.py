"""Benchmark of ``POST /v1/generate`` against the issue's bar; prints a table of ratios, then JSON.

    python bench/generate.py                                     # embedded default model + default SAE
    python bench/generate.py --model DIR --sae SAE_DIR --quick   # a tiny model, a short run

Generated tokens/s on one loaded model (same process; the server is real HTTP on 127.0.0.1 through
uvicorn), on the same fixed prompts (BOS + text, tokenised as the server does), greedy, --new-tokens
new tokens each:
- baseline: plain HF ``model.generate`` of the same model (no hooks, no SAE, no adapter), end of
  sequence suppressed (``min_new_tokens``) so every prompt gets exactly --new-tokens tokens;
  batch 1 = one prompt per call, in turn; batch 8 = the 8 prompts left-padded into one call;
- served: the same prompts through ``POST /v1/generate`` with the SAEs spliced and one
  intervention (``add`` --value to latent --latent of the first SAE); batch 1 = one prompt per
  request, in turn; batch 8 = one request with the 8 prompts (one batch of 8 rows). Tokens are
  counted from the answers (the server stops a row at the tokenizer's end of sequence: the JSON
  reports the finish reasons, and only the tokens actually generated count);
- breakdown (no goal; where the time goes): the server's own step loop
  (``lorasae.steering.BatchGeneration``, spliced + the same intervention) run in this thread with
  no HTTP, no engine-thread hop and no per-token events; and the same loop with no SAE and no
  intervention (the loop itself vs HF ``generate``).
Each path is warmed up once, then --rounds rounds run every path (the order rotating between
rounds, to spread machine noise); tokens/s is total tokens over the median round time.
Goal: served / baseline >= 0.8 at batch 1 and at batch 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import _Server  # uvicorn in a background thread, on a free port

GOAL = 0.8
PROMPTS = [
    "The history of the city begins with a small fishing village that",
    "In the morning, the scientists gathered in the laboratory to",
    "My favourite recipe for a rainy afternoon is a warm soup made with",
    "The committee published its report on the economy, which argued that",
    "When the train finally arrived at the station, the passengers",
    "Learning a new programming language is easier when you",
    "The old lighthouse keeper climbed the stairs every evening and",
    "According to the latest survey, most people in the region prefer",
]
PATHS = ("baseline", "served", "loop_spliced", "loop_plain")
BATCHES = (1, 8)


def run(args) -> dict:
    import httpx
    import torch

    from lorasae.service.app import create_app
    from lorasae.service.engine import Engine
    from lorasae.service.settings import Settings
    from lorasae.steering import BatchGeneration, LatentIntervention, RowSpec
    from lorasae.training.train_sae import ensure_default_sae

    n_new = args.new_tokens
    work = Path(tempfile.mkdtemp(prefix="lorasae-bench-"))
    settings = Settings(
        model=args.model,
        saes=args.sae or [],
        device=args.device,
        dtype=args.dtype,
        adapter_root=work / "adapters",
        db_path=work / "registry.sqlite3",
        max_batch=max(16, len(PROMPTS)),
        max_new_tokens=max(256, n_new),
        torch_threads=args.threads,
    )
    print(f"loading {args.model} ...", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.from_settings(settings, ensure_default_sae)  # trains the default SAE if missing
    device = engine.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = engine.base  # the plain HF model: no adapter is registered, hooks only inside a Splice
    prompts = [engine.tokenize(text) for text in PROMPTS]  # BOS + text, as the server tokenises
    sae = engine.saes[0]
    sae_id = engine.names[sae.layer]
    latent = args.latent if args.latent is not None else 0
    if latent >= sae.d_sae:
        raise SystemExit(f"--latent {latent}: SAE {sae_id} has {sae.d_sae} latents")
    intervention = {"sae": sae_id, "latent": latent, "op": "add", "value": args.value}
    steer = (LatentIntervention(sae.layer, latent, "add", args.value),)
    eos = engine.lm.tokenizer.eos_token_id

    # --- baseline: plain HF generate (batch 8 left-padded with the server's pad id)
    def hf_inputs(batch: list[list[int]]) -> dict:
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), engine.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, row in enumerate(batch):
            ids[b, width - len(row) :] = torch.tensor(row)
            mask[b, width - len(row) :] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def baseline(batch: list[list[int]]) -> int:
        with torch.inference_mode():
            out = model.generate(
                **hf_inputs(batch),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=engine.pad,
                eos_token_id=eos,
            )
        sync()
        return (out.shape[1] - max(len(ids) for ids in batch)) * len(batch)

    # --- the server's step loop, in this thread (no HTTP, no engine thread, no events)
    def loop(batch: list[list[int]], spliced: bool) -> int:
        gen = BatchGeneration(
            model,
            engine.saes if spliced else [],
            [RowSpec(list(ids), interventions=steer if spliced else ()) for ids in batch],
            max_new_tokens=n_new,
            pad_id=engine.pad,
            eos_ids=[] if eos is None else [eos],
            keep_first=engine.keep_first,
        )
        while not gen.done:
            gen.advance()
        sync()
        return sum(len(g) for g in gen.generated)

    finish: dict[str, dict[str, int]] = {"1": {}, "8": {}}
    with _Server(create_app(settings, engine)) as srv, httpx.Client(base_url=srv.url, timeout=600) as http:
        deadline = time.monotonic() + 600
        while http.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("server not ready after 600 s")
            time.sleep(0.1)
        inside: list[float] = []  # the answers' usage.seconds (time inside the generation), summed

        def served(batch_texts: list[str], key: int) -> int:
            body = {
                "prompt": batch_texts if len(batch_texts) > 1 else batch_texts[0],
                "max_new_tokens": n_new,
                "interventions": [intervention],
            }
            r = http.post("/v1/generate", json=body)
            r.raise_for_status()
            answer = r.json()
            for g in answer["generations"]:
                reason = g["finish_reason"]
                finish[str(key)][reason] = finish[str(key)].get(reason, 0) + 1
            inside.append(answer["usage"]["seconds"])
            return sum(len(g["tokens"]) for g in answer["generations"])

        def one_path(path: str, batch_size: int) -> int:
            if path == "served":
                if batch_size == 1:
                    return sum(served([text], 1) for text in PROMPTS)
                return served(PROMPTS, 8)
            fn = {
                "baseline": baseline,
                "loop_spliced": lambda b: loop(b, True),
                "loop_plain": lambda b: loop(b, False),
            }[path]
            if batch_size == 1:
                return sum(fn([ids]) for ids in prompts)
            return fn(prompts)

        cases = [(p, b) for b in BATCHES for p in PATHS]
        for path, batch_size in cases:  # warm-up: once each
            one_path(path, batch_size)
        for counts in finish.values():
            counts.clear()
        times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
        tokens: dict[tuple[str, int], list[int]] = {c: [] for c in cases}
        server_seconds: dict[int, list[float]] = {b: [] for b in BATCHES}
        for r in range(args.rounds):
            shift = r % len(PATHS)
            for batch_size in BATCHES:
                for path in PATHS[shift:] + PATHS[:shift]:
                    inside.clear()
                    started = time.perf_counter()
                    n = one_path(path, batch_size)
                    times[(path, batch_size)].append(time.perf_counter() - started)
                    tokens[(path, batch_size)].append(n)
                    if path == "served":
                        server_seconds[batch_size].append(sum(inside))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    engine.close()

    results = {}
    for batch_size in BATCHES:
        entry: dict = {}
        for path in PATHS:
            t, n = times[(path, batch_size)], tokens[(path, batch_size)]
            entry[path] = {
                "tokens_per_s": round(statistics.median(n) / statistics.median(t), 2),
                "seconds_median": round(statistics.median(t), 4),
                "seconds_all": [round(x, 4) for x in t],
                "tokens": n,
            }
        base = entry["baseline"]["tokens_per_s"]
        for path in PATHS[1:]:
            entry[path]["vs_baseline"] = round(entry[path]["tokens_per_s"] / base, 3)
            # the same ratio per round (baseline and path ran back to back): how noisy the medians are
            pairs = zip(
                tokens[(path, batch_size)],
                times[(path, batch_size)],
                tokens[("baseline", batch_size)],
                times[("baseline", batch_size)],
            )
            entry[path]["vs_baseline_rounds"] = [round((n / t) / (nb / tb), 3) for n, t, nb, tb in pairs]
        # served time inside the generation (engine steps + events), as the answer's usage reports
        entry["served"]["server_seconds_median"] = round(statistics.median(server_seconds[batch_size]), 4)
        entry["served_vs_baseline"] = entry["served"]["vs_baseline"]
        entry["pass"] = entry["served_vs_baseline"] >= GOAL
        entry["finish_reasons"] = finish[str(batch_size)]
        results[str(batch_size)] = entry
    return {
        "model": engine.model_id,
        "device": str(device),
        "dtype": str(engine.lm.dtype),
        "torch_threads": torch.get_num_threads(),
        "saes": list(engine.names.values()),
        "intervention": intervention,
        "prompts": len(PROMPTS),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": n_new,
        "rounds": args.rounds,
        "goal": GOAL,
        "batches": results,
        "pass": all(results[str(b)]["pass"] for b in BATCHES),
    }


def print_table(r: dict) -> None:
    iv = r["intervention"]
    print(
        f"model {r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} threads), "
        f"SAEs {r['saes']}; "
        f"{r['prompts']} prompts x {r['new_tokens']} new tokens (greedy), {r['rounds']} rounds; "
        f"intervention {iv['op']} {iv['value']} to {iv['sae']} latent {iv['latent']}"
    )
    labels = {
        "served": "served POST /v1/generate (spliced, 1 intervention)",
        "loop_spliced": "  breakdown: step loop in-process, spliced + intervention",
        "loop_plain": "  breakdown: step loop in-process, no SAE",
    }
    head = ("path", "batch", "baseline tok/s", "tok/s", "ratio", "goal", "result")
    rows = []
    for path in PATHS[1:]:
        for b in BATCHES:
            e = r["batches"][str(b)]
            goal = path == "served"
            rows.append(
                (
                    labels[path],
                    str(b),
                    f"{e['baseline']['tokens_per_s']:.1f}",
                    f"{e[path]['tokens_per_s']:.1f}",
                    f"{e[path]['vs_baseline']:.2f}x",
                    f">= {r['goal']}x" if goal else "",
                    ("PASS" if e["pass"] else "FAIL") if goal else "",
                )
            )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for b in BATCHES:
        e = r["batches"][str(b)]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(e["finish_reasons"].items()))
        rounds = ", ".join(f"{x:.2f}x" for x in e["served"]["vs_baseline_rounds"])
        print(
            f"batch {b}: served / baseline per round {rounds}; finish reasons (timed rounds): {reasons}; "
            f"median round "
            f"{e['served']['seconds_median']:.3f} s over HTTP, of which inside the generations "
            f"(usage.seconds) {e['served']['server_seconds_median']:.3f} s"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--sae", action="append", help="SAE spec (repeat; default: the default SAE)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (32; 8 quick)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latent", type=int, default=None, help="latent of the first SAE steered (default 0)")
    p.add_argument("--value", type=float, default=2.0, help="added to the latent")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 on a busy CPU avoids oversubscription)",
    )
    p.add_argument("--quick", action="store_true", help="short run (tiny models, smoke checks)")
    p.add_argument("--out", default="bench-output/generate.json", help="also write the JSON here")
    args = p.parse_args(argv)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    result = run(args)
    print_table(result)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
