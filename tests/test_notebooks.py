"""The example notebooks (examples/*.ipynb, issue #18) run top to bottom.

Each is executed with nbclient on a ``python3`` kernel of this venv (ipykernel) against a real
``lorasae serve`` process; the notebook reads the server URL, the adapter folder and the rest from
its kernel's environment, as a reader's would. Fast suite: the tiny world (``ServerProcess`` with
synthetic dashboards and a drift report of adapter a1), every notebook given ``LORASAE_URL``, and
latents.ipynb once more starting its own server from ``LORASAE_*`` settings. Slow (``make test``):
quickstart.ipynb starting its own server on the embedded default model, with a random adapter made
for it. And every committed notebook is stripped (no outputs, no execution counts).

``LORASAE_NOTEBOOKS_OUT=DIR`` keeps the executed notebooks (with their outputs) in DIR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from dashboard_fixtures import write_dashboard
from drift_fixtures import write_drift_report
from service_fixtures import REPO, ServerProcess, world  # noqa: F401 - the fixture

EXAMPLES = REPO / "examples"
NOTEBOOKS = ("quickstart", "latents", "steering")
CELL_TIMEOUT_S = 600  # generous: a shared 2-core machine; the whole notebook takes seconds on the tiny world
ADAPTER = "a1"  # the tiny world's adapter the notebooks upload (the drift report is made for it)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kernel_env(**values: str) -> dict[str, str]:
    """The test's environment for the kernel, without server settings a reader's shell might have
    (the notebooks and the servers they start read ``LORASAE_*``), plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASAE_") or k == "LORASAE_HOME"}
    env.update(PYDEVD_DISABLE_FILE_VALIDATION="1", JUPYTER_PLATFORM_DIRS="1")  # quiet kernel start
    env.update(values)
    return env


def run_notebook(name: str, env: dict[str, str], cwd: Path) -> nbformat.NotebookNode:
    """Execute examples/``name``.ipynb top to bottom in ``cwd``; a failing cell fails the test with
    the cell's source and the error. Returns the executed notebook."""
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    started = time.monotonic()
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        pytest.fail(f"{name}.ipynb: a cell failed\n{_failed_cell(nb, exc)}", pytrace=False)
    except (CellTimeoutError, DeadKernelError) as exc:
        pytest.fail(f"{name}.ipynb: {type(exc).__name__}: {str(exc)[-2000:]}", pytrace=False)
    finally:
        out = os.environ.get("LORASAE_NOTEBOOKS_OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out) / f"{name}.ipynb")
    print(f"{name}.ipynb ran in {time.monotonic() - started:.1f} s")
    return nb


def _failed_cell(nb: nbformat.NotebookNode, exc: CellExecutionError) -> str:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                frames = ANSI.sub("", "\n".join(output.traceback)).splitlines()
                return (f"--- cell ---\n{cell.source}\n--- error ---\n{output.ename}: {output.evalue}\n"
                        + "\n".join(frames[-15:]))
    return ANSI.sub("", str(exc))[-3000:]


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    """Every output of the executed notebook carrying ``kind`` (a MIME type) or ``stream`` text."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if kind == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif kind in output.get("data", {}):
                found.append(output.data[kind])
    return found


# ------------------------------------------------------------------ committed notebooks are stripped


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_stripped(name):
    """No outputs and no execution counts, so a notebook's diff shows only what its author changed."""
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [], f"{name}.ipynb has outputs: {cell.source[:80]!r}"
        assert cell.execution_count is None, f"{name}.ipynb has execution counts: {cell.source[:80]!r}"
    for cell in nb.cells:
        assert "execution" not in cell.metadata and not cell.get("attachments"), cell.source[:80]


def test_every_example_notebook_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.ipynb")) == sorted(NOTEBOOKS)


# ------------------------------------------------------------------ the tiny world, a real server


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):  # noqa: F811 - the imported fixture
    """(server, dashboards folder, drift folder): ``lorasae serve`` on the tiny world with synthetic
    dashboards of both SAEs and a drift report of adapter a1, shared by the notebook tests."""
    from lorasae.service.engine import Engine

    workdir = tmp_path_factory.mktemp("notebook-server")
    engine = Engine.from_settings(world.settings(workdir))
    try:
        dashboards = write_dashboard(workdir / "dashboards", engine)
        drift = write_drift_report(workdir / "drift", engine, world.adapters / ADAPTER)
    finally:
        engine.close()
    with ServerProcess(world, workdir, args=["--dashboards", dashboards, "--drift", drift]) as server:
        yield server, dashboards, drift


def test_quickstart(served, world, tmp_path):  # noqa: F811
    server, _, _ = served
    env = kernel_env(LORASAE_URL=server.url, LORASAE_ADAPTER_DIR=str(world.adapters / ADAPTER))
    nb = run_notebook("quickstart", env, tmp_path)
    assert outputs(nb, "image/png"), "no plot"
    assert any("loss_adapter" in html for html in outputs(nb, "text/html"))
    registered = {row[0]: row[2] for row in server.db_rows()}
    assert registered.get("demo") == "upload"
    assert server.unexpected_errors() == 0


def test_latents(served, world, tmp_path):  # noqa: F811
    server, _, _ = served
    env = kernel_env(LORASAE_URL=server.url, LORASAE_ADAPTER_DIR=str(world.adapters / ADAPTER),
                     LORASAE_ADAPTER_NAME="for-latents")
    nb = run_notebook("latents", env, tmp_path)
    assert outputs(nb, "image/png"), "no plot"
    assert any("live latents drifted" in text for text in outputs(nb, "stream"))
    assert server.unexpected_errors() == 0


def test_steering(served, world, tmp_path):  # noqa: F811
    server, _, _ = served
    env = kernel_env(LORASAE_URL=server.url, LORASAE_ADAPTER_DIR=str(world.adapters / ADAPTER),
                     LORASAE_MAX_NEW_TOKENS="8")
    nb = run_notebook("steering", env, tmp_path)
    assert any("steered" in html and "unsteered" in html for html in outputs(nb, "text/html"))
    assert server.unexpected_errors() == 0


def test_latents_starts_its_own_server(served, world, tmp_path):  # noqa: F811
    """Without LORASAE_URL the notebook starts `lorasae serve` itself, configured by LORASAE_* variables
    (model, SAEs, dashboards and drift as JSON lists), and stops it at the end."""
    _, dashboards, drift = served
    env = kernel_env(
        LORASAE_ADAPTER_DIR=str(world.adapters / ADAPTER),
        LORASAE_MODEL=str(world.model),
        LORASAE_SAES=json.dumps([str(p) for p in world.saes.values()]),
        LORASAE_DASHBOARDS=json.dumps([str(dashboards)]),
        LORASAE_DRIFT=json.dumps([str(drift)]),
        LORASAE_DEVICE="cpu",
    )
    nb = run_notebook("latents", env, tmp_path)
    started = [t for t in outputs(nb, "stream") if "started lorasae serve at" in t]
    assert started, "the notebook did not start a server"
    url = re.search(r"http://127\.0\.0\.1:\d+", started[0]).group(0)
    import httpx

    with pytest.raises(httpx.TransportError):  # stopped by the notebook's last cell
        httpx.get(f"{url}/healthz", timeout=5)


# ------------------------------------------------------------------ the embedded default model


def _bench_serve():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def default_adapter(tmp_path) -> Path:
    """A random LoRA adapter for the default model and SAE (bench/serve.py's ``make_random_adapter``);
    the default SAE is made first if it is not cached, so the notebook's server starts quickly."""
    import gc
    from types import SimpleNamespace

    from lorasae.models import load_model, model_fingerprint
    from lorasae.saes import load_sae
    from lorasae.training.train_sae import ensure_default_sae

    lm = load_model()
    sae = load_sae(str(ensure_default_sae(lm)), model=lm.model)
    engine = SimpleNamespace(base=lm.model, saes=[sae], model_id=lm.model_id,
                             model_fingerprint=model_fingerprint(lm.model))
    out = _bench_serve().make_random_adapter(engine, tmp_path / "random-adapter", seed=0, rank=8)
    del engine, lm, sae
    gc.collect()
    return out


@pytest.mark.slow
def test_quickstart_on_the_default_model(default_adapter, tmp_path):
    """quickstart.ipynb with no LORASAE_URL: it starts `lorasae serve` on the embedded default model
    itself (the cached default SAE), uploads the adapter, and stops the server at the end."""
    nb = run_notebook("quickstart", kernel_env(LORASAE_ADAPTER_DIR=str(default_adapter)), tmp_path)
    assert any("started lorasae serve at" in t for t in outputs(nb, "stream"))
    assert outputs(nb, "image/png"), "no plot"
