"""MLflow tracking end to end against real `mlflow server` processes: the run layout, metric histories, artifacts,
the dataset input, the registered model (served by `mlflow models serve`), the sampler on the trained run, a server
killed mid-run (training finishes, replay logs the rest), and the failure paths at start. One training run in this
process is shared by the module."""
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from fwray import config, sample
from fwray.core import checkpoint, tokens
from fwray.core.model import generate_text
from fwray.tracking import __main__ as tracking_command
from fwray.tracking import live, records as outbox, store as tracking, tags
from fwray.tracking.tracker import Tracker
from pipeline import sqlite_store

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
# both runs here: the smoke experiment as the README runs it, a quarter of its steps (the loss has fallen by > 2 by
# then), evaluated and logged as often for that length
SHARED_STEPS = 20
SHORT = [f"train.max_iters={SHARED_STEPS}", "train.eval_interval=10", "train.eval_iters=2", "train.log_interval=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `mlflow server` on 127.0.0.1: sqlite backend and proxied artifacts under `folder`, in its own session."""

    WHAT, READY_PATH, READY_S = "mlflow server", "/health", 120

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = None
        self.port = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict]:
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", sqlite_store(self.folder / "mlflow.db"),
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        return cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def start(self) -> "Server":
        self.port = free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command()
        self.log = open(self.folder / f"{type(self).__name__.lower()}-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self, timeout: float | None = None) -> "Server":
        """Until READY_PATH answers 200 (a model server: once the model is loaded)."""
        timeout = timeout or self.READY_S
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.WHAT} exited: {self.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.uri}{self.READY_PATH}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{self.WHAT} on port {self.port} not ready after {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return Path(self.log.name).read_text()[-3000:]

    def kill(self, sig=signal.SIGKILL) -> None:
        """The server and the workers it started (its own process group), by that group's id."""
        if self.proc is None or self.proc.poll() is not None and sig == signal.SIGTERM:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.log.close()


class ModelServer(Server):
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1, reading the registry at `tracking_uri`."""

    WHAT, READY_PATH, READY_S = "mlflow models serve", "/ping", 180

    def __init__(self, folder: Path, model_uri: str, tracking_uri: str):
        super().__init__(folder)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri

    def command(self) -> tuple[list[str], dict]:
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(self.port)]
        return cmd, {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri}


class Tee(io.StringIO):
    """Keeps what is printed and prints it too."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def write(self, text: str) -> int:
        self.out.write(text)
        return super().write(text)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers started together (their ~20 s start-ups overlap): `main` for the shared run, `victim` to kill."""
    base = tmp_path_factory.mktemp("mlflow")
    started = {"main": Server(base / "main").start(), "victim": Server(base / "victim").start()}
    yield started
    for s in started.values():
        s.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def outage(servers, tmp_path_factory, ray_session, cache):
    """`python -m fwray.run` against the victim server, killed once the first train metrics appear; started before
    the shared in-process run so the two overlap. A new server on the same database starts right after the kill.
    Both runs read the session's token cache, prepared here first (usually found there) so that they do not both
    tokenize the sample at once."""
    from fwray.data.prepare import prepare

    prepare(config.load(SMOKE, [f"data.cache_dir={cache}"]), progress=False)
    victim = servers["victim"].wait()
    folder = tmp_path_factory.mktemp("outage")
    # a relative tokenizer cache, as the README sets it: Ray's workers run elsewhere and must still find it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "TIKTOKEN_CACHE_DIR": os.path.relpath(os.environ["TIKTOKEN_CACHE_DIR"], folder)}
    cmd = [sys.executable, "-m", "fwray.run", str(SMOKE), f"tracking.uri={victim.uri}",
           f"resources.storage_path={folder / 'runs'}", f"data.cache_dir={cache}", *SHORT]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder)
    state = {"proc": proc, "lines": [], "killed": threading.Event(), "again": Server(victim.folder),
             "runs": folder / "runs"}

    def read():
        for line in proc.stdout:
            state["lines"].append(line)
            if not state["killed"].is_set() and re.search(r"step\s+\d+/20 \| loss", line):  # the first train metrics
                victim.kill()
                state["killed"].set()
                state["again"].start()

    state["reader"] = threading.Thread(target=read, daemon=True)
    state["reader"].start()
    yield state
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    state["again"].kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def trained(servers, outage, tmp_path_factory, ray_session, cache):
    """The smoke experiment, shortened, trained in this process against the main server: the one end-to-end run
    whose MLflow records (layout, params, metrics, artifacts, the model) the tests below read. Its registered model
    is served from then on (`mlflow models serve` takes ~20 s to answer: it starts while the tests below run)."""
    from fwray import run

    server = servers["main"].wait()
    runs = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(Tee(sys.stdout)) as out:
        rc = run.main([str(SMOKE), f"tracking.uri={server.uri}", f"resources.storage_path={runs}",
                       f"data.cache_dir={cache}", *SHORT])
    assert rc == 0
    served = ModelServer(tmp_path_factory.mktemp("serve"), "models:/smoke/1", server.uri).start()
    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("smoke")
    parents = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'smoke-%'")
    assert len(parents) == 1
    yield {"uri": server.uri, "client": client, "experiment": exp, "run": parents[0], "runs": runs,
           "stdout": out.getvalue(), "served": served}
    served.kill(signal.SIGTERM)


def artifact_paths(client, run_id, path=None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


# ---------------------------------------------------------------- against a server


def test_layout_experiment_parent_and_nested_prepare_run(trained):
    client, run = trained["client"], trained["run"]
    assert trained["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    import fwray

    assert tags["fwray.version"] == fwray.__version__ and tags["fwray.device"] == "cpu"
    assert {"torch_version", "ray_version", "mlflow_version"} <= set(tags)
    assert re.fullmatch(r"[0-9a-f]{40}", tags["fwray.git_commit"])  # the tests run from a checkout
    params = run.data.params
    assert params["model.n_layer"] == "2" and params["train.batch_size"] == "16"
    assert params["train.max_iters"] == str(SHARED_STEPS) and params["plan.tokens_per_step"] == "1024"
    assert int(params["plan.params"]) == 3_322_176  # 2 x 64 wide, vocab 50304, block 64
    assert float(tags["fwray.outcome.measured_tokens_per_s"]) > 0  # after the run: the measured speed
    children = client.search_runs([trained["experiment"].experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.info.run_name for c in children] == ["prepare"]
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.params["data.val_fraction"] == "0.05"
    m = child.data.metrics
    assert m["train_documents"] + m["val_documents"] == 218 and m["train_tokens"] > 1e6 and m["seconds"] > 0
    assert artifact_paths(client, child.info.run_id) == {"manifest.json", "data_report.txt"}


def test_metric_histories_are_complete_and_the_loss_falls(trained):
    client, run_id = trained["client"], trained["run"].info.run_id
    history = {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
               for name in ("train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens_seen", "epoch")}
    steps = {name: [s for s, _ in points] for name, points in history.items()}
    assert steps["val_loss"] == steps["val_bpb"] == [0, 10, 20]
    for name in ("train_loss", "lr", "tokens_per_s", "epoch"):
        assert steps[name] == [5, 10, 15, 20], name
    assert steps["tokens_seen"] == [0, 5, 10, 10, 15, 20, 20]  # logged with the train and the eval metrics
    assert set(trained["run"].data.metrics) <= set(live.METRICS)  # every name is documented
    assert all(v > 0 for _, v in history["tokens_per_s"])
    assert 3e-4 <= history["lr"][-1][1] < 4e-4  # the last step's rate: decayed from 3e-3 to near the min_lr, 3e-4
    first, last = history["val_loss"][0][1], history["val_loss"][-1][1]
    assert last <= first - 2.0, history["val_loss"]


def test_artifacts_listed_and_downloadable(trained, tmp_path):
    client, run_id = trained["client"], trained["run"].info.run_id
    assert artifact_paths(client, run_id) == {
        "config.yaml", "plan.txt", "data/manifest.json", "data/data_report.txt", "loss_curve.png",
        "samples/step_000010.txt", "samples/step_000020.txt", "model/model.pt", "model/model_config.json"}
    import mlflow

    got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="loss_curve.png",
                                                   tracking_uri=trained["uri"], dst_path=str(tmp_path)))
    assert got.read_bytes().startswith(b"\x89PNG")
    text = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples/step_000020.txt",
                                                    tracking_uri=trained["uri"], dst_path=str(tmp_path))).read_text()
    assert text.startswith("step 20:") and text.count("--- prompt") == 3
    # the logged config is the resolved experiment: it loads back
    resolved = config.from_dict(yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config.yaml", tracking_uri=trained["uri"], dst_path=str(tmp_path))).read_text()))
    assert resolved.train.max_iters == SHARED_STEPS and resolved.model == config.load(SMOKE).model
    manifest = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="data/manifest.json", tracking_uri=trained["uri"], dst_path=str(tmp_path))
    ).read_text())
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 0
    # the final model loads from its artifacts, and its validation loss is the run's last
    model, meta = checkpoint.load_model(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="model", tracking_uri=trained["uri"], dst_path=str(tmp_path)))
    assert meta["n_layer"] == 2 and meta["n_embd"] == 64 and meta["step"] == SHARED_STEPS
    assert model.num_params() == 3_322_176
    last_val = max(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step).value
    assert meta["val_loss"] == pytest.approx(last_val)


def test_sampler_prints_text_from_the_trained_run(trained, capsys):
    rc = sample.main(["--run-id", trained["run"].info.run_id, "--tracking-uri", trained["uri"], "--prompt",
                      "The module", "--max-new-tokens", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("The module") and len(out) > len("The module") + 5


def test_eval_of_the_trained_run_is_its_last_validation_and_logs_to_it(trained, tmp_path, capsys):
    """fwray.eval on the run by id (its cache from the run's tag) and on its run folder (the cache its config.yaml
    maps to): both read the training's evaluation windows, so both give the run's last val_loss and val_bpb."""
    from fwray import eval as fw_eval

    client, run = trained["client"], trained["run"]
    last = {name: max(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step).value
            for name in ("val_loss", "val_bpb")}
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"ctx": "The module", "endings": ["imports os.", "a", "b", "c"], "label": 0}) + "\n")
    rc = fw_eval.main(["--run-id", run.info.run_id, "--tracking-uri", trained["uri"], "--hellaswag", str(hs),
                       "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval_val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert logged["eval_val_bpb"] == pytest.approx(last["val_bpb"], rel=1e-5)
    assert logged["hellaswag_acc"] in (0.0, 1.0) and set(logged) <= set(live.METRICS)
    capsys.readouterr()
    rc = fw_eval.main(["--checkpoint", str(trained["runs"] / run.info.run_name), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and f"loss {last['val_loss']:.4f} | bpb {last['val_bpb']:.4f}" in out


def test_the_data_is_the_runs_training_dataset(trained):
    """The runs table's Dataset column and the run page show the parquet the run trained on (search_runs is what
    the table reads): named after the file, sourced at it, digest = the token cache's fingerprint."""
    (given,) = trained["run"].inputs.dataset_inputs
    assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}
    ds = given.dataset
    cache_entry = Path(trained["run"].data.tags["fwray.cache"])
    manifest = json.loads((cache_entry / "manifest.json").read_text())
    assert ds.name == "smoke-sample" and ds.digest == manifest["fingerprint"][:16] == cache_entry.name
    assert ds.source_type == "local"
    assert json.loads(ds.source) == {"uri": str((SMOKE.parent / "smoke-sample.parquet").resolve())}
    assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == ["text", "id"]
    profile = json.loads(ds.profile)
    assert profile["documents"] == 218 and profile["files"] == 1
    assert profile["tokens"] == profile["train_tokens"] + profile["val_tokens"] == sum(
        s["tokens"] for s in manifest["splits"].values())


def test_the_model_is_registered_one_version_per_run(trained, tmp_path, monkeypatch):
    """The run's model is an MLflow model under the run (its page's logged models) and version 1 of `smoke`; a
    second run of the experiment makes version 2, through the same Tracker call, here from a run folder without the
    model (rank 0 on another node): it is fetched from the run's model/ artifacts. A local sqlite store has a
    registry too."""
    client, run_id = trained["client"], trained["run"].info.run_id
    v1 = client.get_model_version("smoke", "1")
    assert v1.run_id == run_id and v1.status == "READY"
    logged = client.get_logged_model(v1.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.experiment_id == trained["experiment"].experiment_id
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    last_val = max(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    assert {(m.key, m.step, m.value) for m in logged.metrics} >= {("val_loss", SHARED_STEPS, last_val.value)}

    second = Tracker(config.load(SMOKE, [f"tracking.uri={trained['uri']}"]))
    second.start("smoke-second", tmp_path, "cpu")
    client.log_artifacts(second.run_id, str(next(trained["runs"].glob("smoke-*/model"))), "model")  # rank 0's
    assert second.log_model() == "models:/smoke/2"
    assert second.finish(True)
    assert client.get_model_version("smoke", "2").run_id == second.run_id
    assert checkpoint.is_model(tmp_path / "model")

    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to ./mlruns
    local = Tracker(config.load(SMOKE, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]))
    local.start("smoke-local", tmp_path, "cpu")  # tmp_path/model is there now
    assert local.log_model() == "models:/smoke/1"
    assert local.client.get_model_version("smoke", "1").run_id == local.run_id


def test_run_ends_with_the_addresses_of_its_page_and_the_runs_table(trained):
    uri, exp_id, run_id = trained["uri"], trained["experiment"].experiment_id, trained["run"].info.run_id
    out = trained["stdout"]
    assert f"\nrun page:    {uri}/#/experiments/{exp_id}/runs/{run_id}\n" in out
    assert f"\nruns table:  {uri}/#/experiments/{exp_id}/runs\n" in out
    assert "registered as models:/smoke/1" in out and (
        f"\nserve it:    MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/smoke/1 --env-manager local" in out)
    # routes of the installed UI, a hash router: the addresses break if an MLflow upgrade renames them
    import mlflow

    bundle = next((Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js")).read_text()
    assert "createHashRouter" in bundle
    assert '"/experiments/:experimentId/runs/:runUuid"' in bundle and '"/experiments/:experimentId/runs"' in bundle
    with urllib.request.urlopen(f"{uri}/", timeout=10) as r:  # the server serves that UI at its address
        assert r.status == 200 and b"<html" in r.read().lower()
    # a local store's addresses are those of `mlflow ui` on its default port
    assert tracking.run_page("sqlite:///x.db", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"


def test_server_killed_mid_run_training_finishes_and_replay_logs_the_rest(outage):
    proc = outage["proc"]
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    outage["reader"].join(timeout=60)  # it kills the server and starts the next one: slow on a busy machine
    out = "".join(outage["lines"])
    assert outage["killed"].is_set(), out[-3000:]
    assert rc == 0, out[-3000:]
    # a quiet end: warnings, never a traceback (Ray Train's placement group cleaner printed one though nothing failed)
    assert "Traceback" not in out, out[out.find("Traceback") - 200:][:3000]
    assert out.count("stopped answering") == 1, out[-3000:]  # one warning (the worker's; the driver's never tried)
    assert "did not take the run's final status" in out and "done: validation loss" in out
    assert out.count("did not take the trained model as an MLflow model") == 1, out[-3000:]
    run_dir = next(outage["runs"].glob("smoke-*"))
    jsonl = run_dir / outbox.FALLBACK_FILE
    assert jsonl.is_file() and '"metrics"' in jsonl.read_text()

    # the new server on the same database and artifact folder, then replay
    again = outage["again"].wait()
    run_id = json.loads((outage["runs"] / "smoke.latest.json").read_text())["mlflow_run_id"]
    assert tracking_command.main(["replay", str(jsonl), "--uri", again.uri]) == 0
    assert not jsonl.exists() and jsonl.with_name(jsonl.name + ".replayed").is_file()
    client = MlflowClient(tracking_uri=again.uri)
    steps = {n: sorted(m.step for m in client.get_metric_history(run_id, n)) for n in ("train_loss", "val_loss")}
    assert steps == {"train_loss": [5, 10, 15, 20], "val_loss": [0, 10, 20]}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert float(client.get_run(run_id).data.tags["fwray.outcome.measured_tokens_per_s"]) > 0  # kept, then replayed
    paths = artifact_paths(client, run_id)
    assert {"model/model.pt", "loss_curve.png", "samples/step_000020.txt"} <= paths
    assert sample.main(["--run-id", run_id, "--tracking-uri", again.uri, "--max-new-tokens", "4",
                        "--device", "cpu"]) == 0
    assert client.get_model_version("smoke", "1").run_id == run_id  # the model waited for replay too
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1  # logged live, before the kill


def test_the_registered_model_serves_generated_text(trained):
    """`mlflow models serve -m models:/smoke/1 --env-manager local` (started by `trained`) answers a generation
    request with the text fwray's own sampler makes from the run's model folder: same prompt, params and seed."""
    served = trained["served"].wait()
    params = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 200, "seed": 7}
    request = json.dumps({"inputs": ["The module"], "params": params}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{served.uri}/invocations", data=request,
                                                       headers={"Content-Type": "application/json"}), timeout=60) as r:
        answer = json.loads(r.read())
    (text,) = answer["predictions"]
    model, meta = checkpoint.load_model(next(trained["runs"].glob("smoke-*/model")))
    assert text == generate_text(model, tokens.get_tokenizer(), "The module", **params)
    assert text.startswith("The module") and len(text) > len("The module")


# ---------------------------------------------------------------- failures at start, without a server


def test_unreachable_server_at_start_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    uri = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([sys.executable, "-m", "fwray.run", str(SMOKE), f"tracking.uri={uri}",
                        f"resources.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("fwray: error: MLflow tracking store") and uri in errors[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # no work was done


def test_not_required_falls_back_to_the_local_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = config.load(SMOKE, [f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.required=false"])
    client = tracking.connect(exp)
    assert client.tracking_uri == f"sqlite:///{tmp_path / '.fwray' / 'mlflow.db'}"
    assert "tracked in sqlite:///" in capsys.readouterr().err
    required = config.load(SMOKE, [f"tracking.uri=http://127.0.0.1:{free_port()}"])
    with pytest.raises(tracking.TrackingUnavailable, match="unreachable"):
        tracking.connect(required)


def test_logger_outage_keeps_everything_and_replay_logs_it(tmp_path, capsys):
    """A logger whose store is gone: one warning, all records kept; replay into the real store, once."""
    store = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=store)
    exp_id = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    client.log_batch(run_id, metrics=[Metric("train_loss", 11.0, 0, 1)])
    (tmp_path / "curve.txt").write_text("x")

    log = live.RunLogger(f"http://127.0.0.1:{free_port()}", run_id, tmp_path / "run")
    log.metrics(2, {"train_loss": 10.0, "lr": 1e-3})
    log.metrics(3, {"train_loss": 9.0, "lr": 2e-3})
    log.tags({"fwray.resumed_from_step": 2})
    log.artifact(tmp_path / "curve.txt")
    log.artifact(tmp_path / "curve.txt")  # refreshed: uploaded once on replay
    assert log.finish(True) is False  # after its outage: kept behind the records before it, no second warning
    driver = live.RunLogger(log.uri, run_id, tmp_path / "driver")  # a logger that has not failed yet: one warning
    assert driver.finish(True) is False and (tmp_path / "driver" / outbox.FALLBACK_FILE).is_file()
    err = capsys.readouterr().err
    assert err.count("stopped answering") == 1 and err.count("did not take the run's final status") == 1

    history = live.metric_history(store, run_id, fallback=log.fallback, max_step=2)
    assert history["train_loss"] == {1: 11.0, 2: 10.0}  # MLflow's and the kept records, up to the checkpoint

    assert tracking_command.main(["replay", str(log.fallback), "--uri", store]) == 0
    assert "4 metric values, 0 params, 1 tags, 1 artifacts, 1 status" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    assert run.info.status == "FINISHED" and run.data.tags["fwray.resumed_from_step"] == "2"
    assert [a.path for a in client.list_artifacts(run_id)] == ["curve.txt"]
    assert tracking_command.main(["replay", str(log.fallback), "--uri", store]) == 2  # renamed: nothing to log twice


def test_mlflow_batches_and_cuts_what_fwray_hands_it(tmp_path):
    """fwray neither chunks nor truncates: MlflowClient.log_batch splits the requests and the store cuts a param value
    over 6000 characters. Here more params than one request holds, one of them too long, in one logger call."""
    store = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    log = live.RunLogger(store, run_id, tmp_path / "run")
    log.params({**{f"p{i}": i for i in range(150)}, "long": "x" * 7000})
    log.metrics(1, {f"m{i}": float(i) for i in range(1200)})
    assert not log.failed
    run = client.get_run(run_id)
    assert len(run.data.params) == 151 and run.data.params["long"] == "x" * 6000
    assert len(run.data.metrics) == 1200


def test_every_run_is_a_child_of_the_tracker_nested_or_top_level(tmp_path, monkeypatch, capsys, cache):
    """One Tracker hands out every run, against a real local store: under fwray.run's parent run the prepare and probe
    runs nest (the probe's trials under the probe's run); the probe's and the plan's commands run alone start theirs at
    the top level. A store that will not start a child (its experiment deleted) is one warning for it: no crash, and
    none for the trials of a probe run that did not start."""
    from fwray.data import prepare
    from fwray.plan import __main__ as plan_cli
    from fwray.probe import sweep, verdict as verdicts

    monkeypatch.chdir(tmp_path)  # the plan writes its files under .fwray/plan
    store = sqlite_store(tmp_path / "mlflow.db")
    exp = config.load(SMOKE, [f"tracking.uri={store}", f"data.cache_dir={cache}"])
    cache_dir, manifest = prepare.prepare(exp)
    rows = [{"batch_size": b, "activation_checkpointing": False, "compile": None, "status": "ok", "reason": "",
             "peak_gb": peak, "tokens_per_s": None, "method": "cpu-estimate"} for b, peak in ((8, 1.0), (16, 9.0))]
    verdict = {**verdicts.decide(exp, rows, 4.0, "cpu-estimate"), "device": "cpu"}
    plan_argv = [str(SMOKE), "--hours", "12", "--gpu", "RTX 4070", "--train-tokens", "7e8", "--depths", "11",
                 f"tracking.uri={store}"]
    run_dir = tmp_path / "run"
    for folder in (run_dir / "probe", tmp_path / "alone"):  # what the probe saves before it logs
        folder.mkdir(parents=True)
        (folder / "verdict.json").write_text(json.dumps(verdict))

    tracker = Tracker(exp)  # as fwray.run: the parent run, then the prepare and probe runs through it
    parent = tracker.start("smoke-parent", run_dir, "cpu")
    prepare_id = tracker.log_prepare(cache_dir, manifest, 1.5)
    sweep.track_verdict(tracker, exp, verdict, run_dir / "probe")
    sweep.track_verdict(Tracker(exp), exp, verdict, tmp_path / "alone")  # as `python -m fwray.probe`
    assert plan_cli.main(plan_argv) == 0  # `python -m fwray.plan`
    assert "fwray: warning" not in capsys.readouterr().err

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    (plan_run,) = [r for r in runs if r.data.tags.get("fwray.kind") == "plan"]
    assert plan_run.info.run_name.startswith("plan-smoke-")
    assert sorted(r.info.run_name for r in runs) == sorted(["smoke-parent", "prepare", "probe-probe", "probe-alone",
                                                            plan_run.info.run_name, *["bs8", "bs16"] * 2])
    named = {r.info.run_name: r for r in runs}  # a trial's name: either probe's, used below for neither
    assert parent_of[prepare_id] == parent_of[named["probe-probe"].info.run_id] == parent
    assert {parent_of[r] for r in (parent, named["probe-alone"].info.run_id, plan_run.info.run_id)} == {None}
    trials = sorted(parent_of[r.info.run_id] for r in runs if r.info.run_name in ("bs8", "bs16"))
    assert trials == sorted([named["probe-probe"].info.run_id, named["probe-alone"].info.run_id] * 2)
    # the records themselves, as fwray logged them before the Tracker handed out these runs
    prep = named["prepare"]
    assert prep.info.status == "FINISHED" and prep.data.params["data.val_fraction"] == "0.05"
    assert prep.data.metrics["wall_seconds"] == 1.5 and prep.data.tags["fwray.cache"] == str(cache_dir)
    assert artifact_paths(client, prepare_id) == {"manifest.json", "data_report.txt"}
    nested = named["probe-probe"]
    assert nested.info.status == "FINISHED" and nested.data.metrics["chosen_batch_size"] == 8
    assert nested.data.params["probe.margin"] == str(exp.probe.margin) and nested.data.tags["fwray.kind"] == "probe"
    assert artifact_paths(client, nested.info.run_id) == {"verdict.json"}
    assert all(r.info.status == "FINISHED" for r in runs if r.info.run_name in ("bs8", "bs16"))
    assert plan_run.info.status == "FINISHED" and plan_run.data.params["gpu"] == "RTX 4070"
    assert artifact_paths(client, plan_run.info.run_id) == {"plan_table.txt", "plan.json"}

    # MLflow refuses every new run now: each child is one warning, and the work goes on
    client.delete_experiment(client.get_experiment_by_name("smoke").experiment_id)
    assert tracker.log_prepare(cache_dir, manifest, 1.5) is None
    sweep.track_verdict(tracker, exp, verdict, run_dir / "probe")
    sweep.track_verdict(Tracker(exp), exp, verdict, tmp_path / "alone")
    assert plan_cli.main(plan_argv) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("fwray:")]
    assert len(warnings) == 4 and all("did not start the run" in w for w in warnings), err
    assert [w.split("the run ")[1].split()[0] for w in warnings[:3]] == ["'prepare'", "'probe-probe'", "'probe-alone'"]
    assert "Traceback" not in err and "recommended: depth 11" in out and "MLflow run" not in out


def test_git_commit_only_in_a_checkout(tmp_path):
    assert tags.git_commit(tmp_path) is None
    found = tags.git_commit()
    assert found is None or re.fullmatch(r"[0-9a-f]{40}", found[0])
