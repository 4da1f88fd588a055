"""Fixtures for the service and client tests: a tiny on-disk world, built once per session.

The world: a BPE tokenizer trained on a made-up corpus (``tokenizers``), a tiny random Llama saved
with ``save_pretrained``, two TopK SAEs in sae-lens format (layers 1 and 2), and trained-looking
LoRA adapters (peft files with random non-zero B matrices + a ``lorasae.json`` manifest that
matches the model and SAEs), plus broken ones (wrong fingerprint, truncated weights, wrong shapes).
Each test gets its own adapter root (a copy) and registry database, in process or behind a real
``lorasae serve`` process (``ServerProcess``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the a of and to in is was for on that with as by at from it his an were are which "
         "this be or had not cat dog sat mat").split()
SAE_LAYERS = (1, 2)
TEXTS = ["the cat sat on the mat", "a dog was in the house of his", "it is not that"]


@dataclass
class World:
    root: Path
    model: Path
    saes: dict[int, Path]   # layer -> sae-lens folder
    adapters: Path          # folder of adapter folders (copied into each test's adapter root)

    def adapter_root(self, tmp: Path) -> Path:
        """``tmp/adapter-root``: a copy of the adapters, made on first use."""
        root = tmp / "adapter-root"
        if not root.exists():
            shutil.copytree(self.adapters, root)
        return root

    def settings(self, tmp: Path, **overrides):
        from lorasae.service.settings import Settings

        values = dict(model=str(self.model), saes=[str(p) for p in self.saes.values()],
                      adapter_root=self.adapter_root(tmp), db_path=tmp / "registry.sqlite3",
                      device="cpu", max_wait_ms=2.0)
        values.update(overrides)
        return Settings(**values)


def _tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = __import__("tokenizers").decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=160,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_adapter(model_dir: Path, out: Path, sae_dirs: list[Path], *, seed: int, rank: int = 4,
                 targets=("q_proj", "v_proj"), layers=(2, 3), fingerprint: str | None = None,
                 fan_in_fan_out: bool = False) -> Path:
    """A peft LoRA adapter with random non-zero B (so it changes the model) + a matching manifest
    (``fan_in_fan_out`` for GPT-2-style Conv1D layers, whose weight is ``[in, out]``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorasae.manifest import AdapterManifest, SaeEntry
    from lorasae.models import model_fingerprint
    from lorasae.saes import load_sae

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    saes = [load_sae(str(d), model=model) for d in sae_dirs]
    base_fp = model_fingerprint(model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=list(targets),
                                                  layers_to_transform=list(layers),
                                                  fan_in_fan_out=fan_in_fan_out))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    AdapterManifest(base_model=str(model_dir), base_model_fingerprint=fingerprint or base_fp,
                    saes=[SaeEntry.of(s) for s in saes],
                    lora={"rank": rank, "alpha": 2 * rank, "target_modules": list(targets),
                          "layers_to_transform": list(layers)},
                    created_at="2025-01-01T00:00:00+00:00").save(out)
    return out


def build_world(root: Path) -> World:
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    corpus = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200,), generator=gen))
              for _ in range(40)]
    tokenizer = _tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.1)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    saes = {}
    for layer in SAE_LAYERS:
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8,
                                    metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        saes[layer] = root / f"sae{layer}"
        sae.save_model(saes[layer])
    adapters = root / "adapters"
    make_adapter(model_dir, adapters / "a1", [saes[1]], seed=1)
    make_adapter(model_dir, adapters / "a2", [saes[1]], seed=2, rank=8, targets=("q_proj", "down_proj"))
    make_adapter(model_dir, adapters / "a12", [saes[1], saes[2]], seed=3, layers=(3,))
    make_adapter(model_dir, adapters / "mismatch", [saes[1]], seed=4, fingerprint="0123456789abcdef")
    corrupt = make_adapter(model_dir, adapters / "corrupt", [saes[1]], seed=5)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # right fingerprints, wrong LoRA shapes: rank-4 A matrices replaced by ones of width 16
    shapes = make_adapter(model_dir, adapters / "badshape", [saes[1]], seed=6)
    from safetensors.torch import load_file, save_file
    state = load_file(shapes / "adapter_model.safetensors")
    state = {k: (torch.zeros(v.shape[0], 16) if "lora_A" in k else v) for k, v in state.items()}
    save_file(state, shapes / "adapter_model.safetensors")
    (adapters / "not-an-adapter").mkdir()
    return World(root=root, model=model_dir, saes=saes, adapters=adapters)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("service-world"))


@pytest.fixture
def settings(world, tmp_path):
    return world.settings(tmp_path)


@pytest.fixture
def engine(settings):
    from lorasae.service.engine import Engine

    eng = Engine.from_settings(settings)
    yield eng
    eng.close()


@pytest.fixture
def client(settings, engine):
    """A FastAPI TestClient (lifespan run) on a fresh app over the tiny world."""
    from fastapi.testclient import TestClient

    from lorasae.service.app import create_app

    with TestClient(create_app(settings, engine), base_url="http://localhost") as test_client:
        yield test_client


def register(client, name: str, path: str | None = None, headers: dict | None = None):
    return client.post("/v1/adapters", json={"name": name, "path": path or name}, headers=headers)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` only after a generous ``timeout``
    (seconds), so a slow, shared machine never fails a test that waits for an event."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------ a real server process

SERVER_KEY_ENV = "LORASAE_TEST_SERVER_KEY"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``lorasae serve`` (uvicorn) in a subprocess on 127.0.0.1 over the tiny world (both SAEs, CPU),
    with its registry database and adapter root (a copy of the world's adapters) in ``workdir``.

    ``start()`` waits until ``/readyz`` answers 200 and fails with the tail of the server's log;
    ``stop()`` terminates it, then kills it after a timeout; ``start()`` again after ``kill9()``
    restarts it on the same port, database and adapter root (each start logs to its own
    ``server-N.log``). As a context manager: started on entry, stopped on exit. ``api_key`` is
    handed over in an environment variable (``--api-key-env``); ``env`` adds to the server's
    environment. ``registry`` (a ``postgresql://`` URL, with ``registry_poll_s``) makes it one of
    several servers sharing that registry; ``adapter_root`` then names the root they share (by
    default each server has its own copy in ``workdir``). ``args``: more `lorasae serve` flags
    (e.g. ``["--dashboards", DIR, "--drift", DIR]``).
    """

    def __init__(self, world: World, workdir: Path, *, api_key: str | None = None,
                 registry: str | None = None, registry_poll_s: float | None = None,
                 adapter_root: Path | None = None, args: Sequence[str] = (), **env: str) -> None:
        self.workdir = workdir
        self.adapter_root = adapter_root if adapter_root is not None else world.adapter_root(workdir)
        self.registry = registry
        self.db = workdir / "registry.sqlite3"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "lorasae.cli", "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--model", str(world.model),
                    *[arg for path in world.saes.values() for arg in ("--sae", str(path))],
                    "--adapter-root", str(self.adapter_root), "--db", str(self.db), "--device", "cpu"]
        if registry is not None:
            self.cmd += ["--registry", registry]
        if registry_poll_s is not None:
            self.cmd += ["--registry-poll-s", str(registry_poll_s)]
        self.cmd += [str(arg) for arg in args]
        self.env = {**os.environ, **env}
        if api_key is not None:
            self.cmd += ["--api-key-env", SERVER_KEY_ENV]
            self.env[SERVER_KEY_ENV] = api_key
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        self.starts += 1
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""

    def log_text(self) -> str:
        """Everything the server logged, over all its starts."""
        return "".join(self.workdir.joinpath(f"server-{n}.log").read_text()
                       for n in range(1, self.starts + 1))

    def unexpected_errors(self) -> int:
        """Tracebacks the app logged for requests ("unexpected error" = a 500)."""
        return self.log_text().count("unexpected error")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")

    def db_rows(self) -> list[tuple]:
        if self.registry is not None:
            import psycopg

            with psycopg.connect(self.registry, connect_timeout=10) as db:
                return db.execute("SELECT name, path, source, info, created_at FROM adapters "
                                  "ORDER BY name").fetchall()
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return db.execute("SELECT name, path, source, info, created_at FROM adapters "
                              "ORDER BY name").fetchall()


@pytest.fixture
def server_factory(world, tmp_path):
    """``make(name, api_key=None, **env)``: a ``ServerProcess`` (not started yet) in
    ``tmp_path / name``; every one made is stopped after the test."""
    servers: list[ServerProcess] = []

    def make(name: str, **kwargs) -> ServerProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        servers.append(ServerProcess(world, workdir, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
