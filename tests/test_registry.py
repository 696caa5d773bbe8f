"""The registry commands (``runs``, ``show``, ``compare``, ``models``, ``promote``) read what
two real pipeline runs wrote, and the promoted champion reproduces its recorded test error."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from tracking import model_registry, queries

from cli import registry as registry_cli
from config.overrides import resolve_config

EXPERIMENT, MODEL = "reg", "reg-classifier"
SEEDS = (3, 4)
TINY = ["data.n_train=1000", "data.n_valid=2000", "model.hidden_sizes=[32,16]",
        "pretrain.epochs=1", "finetune.max_epochs=1"]
STAGES = ["load-data", "pretrain-layer-1", "pretrain-layer-2", "finetune-pretrained",
          "finetune-random", "evaluate"]


@pytest.fixture(scope="module")
def store(shared_data_dir, prefect_harness, tmp_path_factory):
    """Two tiny pipeline runs (seeds 3 and 4, same data) into a temporary SQLite store; both
    register a version of ``reg-classifier``."""
    from flows.pipeline import run_pipeline

    home = tmp_path_factory.mktemp("registry")
    mp = pytest.MonkeyPatch()
    mp.setenv("LAYERWISE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{home}/mlflow.db"
    results = []
    for seed in SEEDS:
        config = resolve_config("quick", data_dir=shared_data_dir, sets=TINY, seed=seed)
        results.append(run_pipeline(config, preset="quick", tracking_uri=uri,
                                    experiment=EXPERIMENT, registered_model_name=MODEL))
    yield {"home": home, "uri": uri, "config": config, "results": results}
    mp.undo()


@pytest.fixture(scope="module")
def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store["uri"])


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer(add_completion=False)
    registry_cli.register(app)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.stdout


def _metrics(client, run_id):
    return client.get_run(run_id).data.metrics


# ----------------------------------------------------------------------------------- runs


def test_runs_lists_parents_with_their_test_errors_in_csv_json_and_table(store, client, cli):
    import pandas as pd

    uri, results = store["uri"], store["results"]
    ids = [r.run_id for r in results]
    expected = {i: _metrics(client, i) for i in ids}

    df = pd.read_csv(io.StringIO(_ok(cli("runs", "--experiment", EXPERIMENT, "--tracking-uri",
                                         uri, "--format", "csv"))),
                     float_precision="round_trip", dtype={"runtime.seed": str})
    assert df["run_id"].tolist() == ids[::-1]  # newest first; the stage runs are not listed
    for _, row in df.iterrows():
        m = expected[row["run_id"]]
        assert row["test_error_pretrained"] == m["test/error_pretrained"]
        assert row["test_error_random"] == m["test/error_random"]
        assert row["test_error_diff"] == m["test/error_diff"]
        assert row["kind"] == "pipeline" and row["preset"] == "quick"
        assert row["status"] == "FINISHED" and row["duration_s"] > 0
        assert row["model.hidden_sizes"] == "[32, 16]"
        assert row["pretrain.corruption_levels"] == "[0.1, 0.2]"
    assert df.set_index("run_id")["runtime.seed"].to_dict() == {
        i: str(s) for i, s in zip(ids, SEEDS)}
    assert set(df["data_digest"]) == {results[0].data["digest"]}

    rows = json.loads(_ok(cli("runs", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                              "--format", "json")))
    assert [r["run_id"] for r in rows] == ids[::-1]
    for r in rows:
        assert r["test_error_pretrained"] == expected[r["run_id"]]["test/error_pretrained"]
        assert r["test_error_random"] == expected[r["run_id"]]["test/error_random"]

    table = _ok(cli("runs", "--experiment", EXPERIMENT, "--tracking-uri", uri))
    for i in ids:
        line = next(ln for ln in table.splitlines() if ln.startswith(i))
        assert f"{100 * expected[i]['test/error_pretrained']:.2f}" in line
        assert f"{100 * expected[i]['test/error_diff']:+.2f}" in line


def test_runs_filter_kind_and_limit(store, cli):
    uri, (first, second) = store["uri"], store["results"]

    def ids(*extra):
        out = _ok(cli("runs", "--experiment", EXPERIMENT, "--tracking-uri", uri,
                      "--format", "json", *extra))
        return [r["run_id"] for r in json.loads(out)]

    assert ids("--filter", f"params.runtime.seed = '{SEEDS[0]}'") == [first.run_id]
    assert ids("--filter", "params.`model.hidden_sizes` = '[32, 16]'", "--kind", "pipeline"
               ) == [second.run_id, first.run_id]
    assert ids("--kind", "ablation") == []
    # metric keys with '/' work unquoted, as the help shows
    errors = {r.run_id: r.test_error_pretrained for r in (first, second)}
    best = min(errors, key=errors.get)
    assert ids("--filter", f"metrics.test/error_pretrained <= {errors[best]!r}") == [
        r for r in (second.run_id, first.run_id) if errors[r] <= errors[best]]
    assert ids("--filter", "metrics.`test/error_diff` < 2") == [second.run_id, first.run_id]
    assert ids("--limit", "1") == [second.run_id]
    bad = cli("runs", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--filter", "params.x =")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: bad --filter")


def test_runs_reads_the_default_store_under_layerwise_home(store, cli, monkeypatch):
    monkeypatch.setenv("LAYERWISE_HOME", str(store["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = _ok(cli("runs", "--experiment", EXPERIMENT, "--format", "json"))
    assert {r["run_id"] for r in json.loads(out)} == {r.run_id for r in store["results"]}


# ------------------------------------------------------------------------------ show/compare


def test_show_prints_config_metrics_stages_and_artifacts(store, client, cli):
    run = store["results"][0]
    out = _ok(cli("show", run.run_id, "--tracking-uri", store["uri"]))
    assert re.search(r"^\s+model\.hidden_sizes\s+\[32, 16\]$", out, re.M)
    assert re.search(rf"^\s+runtime\.seed\s+{SEEDS[0]}$", out, re.M)
    m = _metrics(client, run.run_id)["test/error_pretrained"]
    assert re.search(rf"^\s+test/error_pretrained\s+{m:.6g}$", out, re.M)
    for stage in STAGES:
        assert re.search(rf"^\s*{stage}\s+[0-9a-f]{{32}}\s+FINISHED\s+\d+\.\d\s", out, re.M)
    for path in ("data/summary.json", "figures/filters_layer_1.png",
                 "figures/reconstruction_layer_2.png", "weights/dae.safetensors",
                 "weights/classifier_random.safetensors", "evaluation/confusion_random.csv",
                 "evaluation/summary.json"):
        assert path in out
    assert re.search(r"models:/m-[0-9a-f]+/MLmodel", out)  # the logged model's files

    evaluate = next(s.mlflow_run_id for s in run.stages if s.name == "evaluate")
    out = _ok(cli("show", evaluate, "--tracking-uri", store["uri"]))  # a stage run
    for path in ("evaluation/summary.json", "evaluation/confusion_pretrained.png"):
        assert re.search(rf"^\s*evaluate\s+{re.escape(path)}\s+\d+", out, re.M), out
    # no empty config section: it says where the config is
    assert f"the config is on its parent run, `layerwise show {run.run_id}`" in out

    rec = queries.show_run(client, run.run_id[:10])  # a unique prefix is enough
    assert rec["stages"]["stage"].tolist() == STAGES
    assert (rec["stages"]["duration_s"] > 0).all()
    assert dict(zip(rec["stages"]["stage"], rec["stages"]["run_id"])) == {
        s.name: s.mlflow_run_id for s in run.stages}


def test_compare_shows_differing_params_and_metric_deltas(store, client, cli):
    a, b = (r.run_id for r in store["results"])
    out = _ok(cli("compare", a, b, "--tracking-uri", store["uri"]))
    assert re.search(rf"^runtime\.seed\s+{SEEDS[0]}\s+{SEEDS[1]}$", out, re.M)
    assert not re.search(r"^model\.hidden_sizes", out, re.M)  # equal params are not shown
    ma, mb = _metrics(client, a), _metrics(client, b)
    delta = mb["test/error_pretrained"] - ma["test/error_pretrained"]
    assert re.search(rf"^test/error_pretrained\s+{ma['test/error_pretrained']:.6g}\s+"
                     rf"{mb['test/error_pretrained']:.6g}\s+{delta:.6g}$", out, re.M)

    rec = queries.compare_runs(client, [a, b])
    assert rec["params"].loc["runtime.seed"].tolist() == [str(s) for s in SEEDS]
    for name in ("test/error_pretrained", "test/error_random", "test/error_diff"):
        assert rec["deltas"].loc[name, b] == mb[name] - ma[name]
    # stage metrics come along, e.g. the fine-tuned arms' best validation errors: each arm's
    # run logs finetune/best_val_error; compare keeps the arms apart
    kids = {r.data.tags["layerwise.stage"]: r for r in queries.children(client, client.get_run(b))}
    for arm in ("pretrained", "random"):
        assert rec["metrics"].loc[f"finetune/{arm}/best_val_error", b] == \
            kids[f"finetune-{arm}"].data.metrics["finetune/best_val_error"]
    assert not any(m.startswith("finetune/best") for m in rec["metrics"].index)


def test_runs_follow_mlflow_conventions(store, client):
    """System tags, datasets, descriptions, names that tell runs apart (the same in Prefect),
    and one key per quantity in both arms' runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from tracking.conventions import _git

    first = store["results"][0]
    parent = client.get_run(first.run_id)
    tags = parent.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] == "flows/pipeline.py"
    assert tags["mlflow.source.git.commit"] == _git("rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert re.fullmatch(rf"quick-s{SEEDS[0]}-\d{{4}}-\d{{6}}", parent.info.run_name)
    assert "preset 'quick', seed 3" in tags["mlflow.note.content"]
    # the registered version and both arms' comparison view, linked from the parent
    version = first.model_version
    assert tags["layerwise.registered_model"] == f"{MODEL}/{version}"
    assert f"(#/models/{MODEL}/versions/{version})" in tags["mlflow.note.content"]
    arm_ids = [s.mlflow_run_id for s in first.stages if s.name.startswith("finetune-")]
    assert len(arm_ids) == 2 and all(i in tags["mlflow.note.content"] for i in arm_ids)
    assert "[32, 16]" not in tags["mlflow.note.content"]
    with get_client(sync_client=True) as prefect:
        (flow_run,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[parent.info.run_name])))
    assert flow_run.parameters["preset"] == "quick"

    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-valid", "mnist-test"}
    for name, rows in (("mnist-train", 1000), ("mnist-valid", 2000), ("mnist-test", 10000)):
        dataset = inputs[name].dataset
        assert dataset.digest == first.data["digest"][:36]
        assert json.loads(dataset.source) == {
            "uri": str(store["config"].data.data_dir / "MNIST" / "raw")}
        assert json.loads(dataset.profile) == {
            "num_rows": rows, "num_features": 784, "normalization": "unit",
            "data_digest": first.data["digest"]}
    assert {t.value for d in inputs.values() for t in d.tags} == {"training", "validation",
                                                                   "test"}
    experiment = client.get_experiment(parent.info.experiment_id)
    assert "test/error_pretrained" in experiment.tags["mlflow.note.content"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    kids = {k.data.tags["layerwise.stage"]: k for k in queries.children(client, parent)}
    assert all(k.data.tags["mlflow.note.content"] for k in kids.values())
    arms = [kids["finetune-pretrained"], kids["finetune-random"]]
    assert [k.data.tags["layerwise.arm"] for k in arms] == ["pretrained", "random"]
    keys = [{m for m in k.data.metrics if m.startswith("finetune/")} for k in arms]
    assert keys[0] == keys[1] and "finetune/val_error" in keys[0]
    assert len(client.get_metric_history(arms[1].info.run_id, "finetune/val_error")) == 1


# --------------------------------------------------------------------------- models/promote


def test_models_lists_versions_with_test_errors_and_digests(store, client, cli):
    out = _ok(cli("models", "--name", MODEL, "--tracking-uri", store["uri"], "--format", "json"))
    rows = {r["version"]: r for r in json.loads(out)}
    results = store["results"]
    assert set(rows) == {int(r.model_version) for r in results}
    for r in results:
        row = rows[int(r.model_version)]
        assert row["run_id"] == r.run_id
        assert row["test_error"] == _metrics(client, r.run_id)["test/error_pretrained"]
        assert row["test_error_source"] == "tag"
        assert row["data_digest"] == r.data["digest"]


def test_models_falls_back_to_the_parent_run_metric(store, client):
    """A version without tags: test error and digest come from its run's pipeline parent."""
    first = store["results"][0]
    mv = client.get_model_version(MODEL, first.model_version)
    name = "reg-untagged"
    client.create_registered_model(name)
    client.create_model_version(name, mv.source, run_id=mv.run_id)
    row = model_registry.list_models(client, name).iloc[0]
    assert row["test_error"] == _metrics(client, first.run_id)["test/error_pretrained"]
    assert row["test_error_source"] == "parent"
    assert row["run_id"] == first.run_id and row["data_digest"] == first.data["digest"]


def test_promote_picks_the_lowest_validation_error_on_the_same_data(store, client, cli):
    results = store["results"]
    val = {r.model_version: _metrics(client, r.run_id)["valid/error_pretrained"]
           for r in results}
    test = {r.model_version: _metrics(client, r.run_id)["test/error_pretrained"]
            for r in results}
    best = min(val, key=lambda v: (val[v], -int(v)))
    out = _ok(cli("promote", "--name", MODEL, "--tracking-uri", store["uri"]))
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == best
    assert f"{MODEL} v{best} " in out
    assert re.search(rf"^  val error   {val[best]:.6g}  \(chooses\)$", out, re.M), out
    assert re.search(rf"^  test error  {test[best]:.6g}  \(reported only\)$", out, re.M), out
    assert results[0].data["digest"] in out
    row = model_registry.list_models(client, MODEL).set_index("version").loc[int(best)]
    assert row["val_error"] == val[best] and row["val_error_source"] == "tag"

    other = next(v for v in val if v != best)
    out = _ok(cli("promote", "--name", MODEL, "--version", other, "--tracking-uri",
                  store["uri"]))
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == other
    assert f"v{other} is now champion (was v{best})" in out
    missing = cli("promote", "--name", MODEL, "--version", "99", "--tracking-uri", store["uri"])
    assert missing.exit_code == 1 and "no version 99" in missing.stderr


def test_promote_ignores_test_error(store, client, cli):
    """Same data: v1 has the better validation error (0.10 < 0.20) and the worse test
    error (0.30 > 0.05). Selecting on validation, v1 must win; a choice that looked at the
    test error would take v2. v3 has a test error and no validation error: left out."""
    name, uri = "reg-val-vs-test", store["uri"]
    client.create_registered_model(name)
    for tags in ({"val_error": "0.1", "test_error": "0.3"},
                 {"val_error": "0.2", "test_error": "0.05"},
                 {"test_error": "0.01"}):  # no run: nothing to fall back on
        client.create_model_version(name, f"file://{store['home']}/no-model",
                                    tags={"data.digest": "c" * 64, **tags})
    table = model_registry.list_models(client, name).set_index("version")
    assert table.loc[3, "val_error"] != table.loc[3, "val_error"]  # NaN: nothing recorded
    out = _ok(cli("promote", "--name", name, "--tracking-uri", uri))
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert "val error   0.1" in out and "test error  0.3" in out and "left out v3" in out
    res = model_registry.promote(client, name)
    assert (res["version"], res["val_error"], res["test_error"]) == (1, 0.1, 0.3)


def test_promote_refuses_to_compare_across_data_digests(store, client, cli):
    """Hand-made versions with known digests and validation errors: v1 (A, 0.30), v2 (B,
    0.10), v3 (A, 0.20). Without a champion the newest digest (A) decides: v3. Over a
    champion on B it refuses, unless --force, which picks the best of all: v2."""
    mv = client.get_model_version(MODEL, store["results"][0].model_version)
    name, uri = "reg-mixed", store["uri"]
    client.create_registered_model(name)
    for digest, error in (("a" * 64, "0.3"), ("b" * 64, "0.1"), ("a" * 64, "0.2")):
        client.create_model_version(name, mv.source, run_id=mv.run_id,
                                    tags={"data.digest": digest, "val_error": error,
                                          "test_error": "0.5"})

    def champion():
        return str(client.get_model_version_by_alias(name, "champion").version)

    out = _ok(cli("promote", "--name", name, "--tracking-uri", uri))
    assert champion() == "3" and "left out v2" in out
    _ok(cli("promote", "--name", name, "--version", "2", "--tracking-uri", uri))
    refused = cli("promote", "--name", name, "--tracking-uri", uri)
    assert refused.exit_code == 1 and champion() == "2"
    assert refused.stderr.startswith("error: champion") and "--force" in refused.stderr
    assert "bbbbbbbbbbbb" in refused.stderr and "aaaaaaaaaaaa" in refused.stderr
    out = _ok(cli("promote", "--name", name, "--force", "--tracking-uri", uri))
    assert champion() == "2" and "was already champion" in out


def test_champion_reproduces_its_recorded_test_error_from_raw_pixels(store, client, cli):
    """The registered model takes MNIST as a user has it (784 pixels in 0-255), applies the
    run's normalisation itself and returns probabilities: its argmax over the raw test set
    reproduces the logged test error exactly; its signature and description say so."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from torchvision.datasets import MNIST

    _ok(cli("promote", "--name", MODEL, "--tracking-uri", store["uri"]))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    test = MNIST(root=store["config"].data.data_dir, train=False, download=False)
    raw = test.data.reshape(len(test.data), 784).numpy().astype(np.float32)  # 0-255
    probs = model.predict(raw)
    assert probs.shape == (10000, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    error = int((probs.argmax(axis=1) != test.targets.numpy()).sum()) / 10000
    assert error == float(champion.tags["test_error"])
    assert error == _metrics(client, champion.tags["layerwise.run_id"])["test/error_pretrained"]

    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.shape == (-1, 784) and str(inputs.type) == "float32"
    assert "0-255" in champion.description and "'unit' normalisation" in champion.description
    assert "probabilities" in champion.description
    assert "'champion'" in client.get_registered_model(MODEL).description


def _post(url: str, rows) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    body = json.dumps({"inputs": rows}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _documented_serve_command(model: str, port: int) -> str:
    """docs/service.md's ``mlflow models serve`` line, for ``model`` on ``port``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    (line,) = [ln for b in blocks for ln in b.splitlines() if "mlflow models serve" in ln]
    assert "models:/layerwise-classifier@champion" in line and "--port 5001" in line
    return (line.replace("layerwise-classifier", model).replace("--port 5001", f"--port {port}"))


@pytest.mark.slow
def test_mlflow_scoring_server_serves_the_champion_as_documented(store, client, cli, tmp_path):
    """docs/service.md's command, in a shell whose PATH has no virtualenv, serves the
    champion on loopback: all 10,000 raw test images reproduce the logged test error; images
    scaled to [0, 1] and rows of the wrong length get a 400 that says what is expected."""
    import urllib.request

    import numpy as np
    from torchvision.datasets import MNIST

    _ok(cli("promote", "--name", MODEL, "--tracking-uri", store["uri"]))
    champion = client.get_model_version_by_alias(MODEL, "champion")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": store["uri"]}  # a fresh shell: no venv on PATH
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(["bash", "-c", _documented_serve_command(MODEL, port)],
                              cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no /ping after 180 s"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        test = MNIST(root=store["config"].data.data_dir, train=False, download=False)
        raw = test.data.reshape(-1, 784).numpy().astype(np.float32)  # (10000, 784) in 0-255
        labels = []
        for start in range(0, len(raw), 2500):
            status, body = _post(f"{url}/invocations", raw[start:start + 2500].tolist())
            assert status == 200, body
            labels.append(np.asarray(body["predictions"]).argmax(axis=1))
        error = int((np.concatenate(labels) != test.targets.numpy()).sum()) / len(raw)
        assert error == float(champion.tags["test_error"])

        status, body = _post(f"{url}/invocations", (raw[:50] / 255).tolist())
        assert status == 400 and "expects raw pixels" in body["stack_trace"], body
        assert "0-255" in body["stack_trace"]
        status, body = _post(f"{url}/invocations", raw[:2, :783].tolist())
        assert status == 400 and "784" in body["message"], body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
        log.close()


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, named", [
    (("show", "0123456789abcdef0123456789abcdef"), "0123456789abcdef0123456789abcdef"),
    (("compare", "PLACEHOLDER", "ffffffffffff"), "ffffffffffff"),
    (("runs", "--experiment", "no-such-experiment"), "no-such-experiment"),
    (("models", "--name", "no-such-model"), "no-such-model"),
    (("promote", "--name", "no-such-model"), "no-such-model"),
])
def test_unknown_names_give_one_clear_line(store, cli, args, named):
    args = [store["results"][0].run_id if a == "PLACEHOLDER" else a for a in args]
    result = cli(*args, "--tracking-uri", store["uri"])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert "layerwise runs" in lines[0] and "Traceback" not in result.output


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path, cli):
    path = tmp_path / "nothing" / "mlflow.db"
    result = cli("runs", "--tracking-uri", f"sqlite:///{path}")
    assert result.exit_code == 1 and str(path) in result.stderr
    assert not path.exists()


# ------------------------------------------------------------------------------------ stale


def test_stale_lists_runs_whose_process_is_gone_and_marks_them_failed(store, client, cli):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    here, uri = socket.gethostname(), store["uri"]
    exp = client.create_experiment("stale")

    def running(name, pid=None, host=None, parent=None, start_time=None):
        tags = {"layerwise.kind": "pipeline"} if parent is None else {
            "layerwise.stage": "evaluate", "mlflow.parentRunId": parent}
        if pid is not None:
            tags.update({"layerwise.pid": str(pid), "layerwise.host": host})
        return client.create_run(exp, run_name=name, tags=tags,
                                 start_time=start_time).info.run_id

    two_days_ago = int((time.time() - 48 * 3600) * 1000)
    dead = running("dead", proc.pid, here)
    dead_child = running("dead-child", proc.pid, here, parent=dead)
    live = running("live", os.getpid(), here)
    elsewhere = running("elsewhere", proc.pid, "another-host")
    untagged_old = running("untagged-old", start_time=two_days_ago)
    untagged_new = running("untagged-new")

    def stale(*extra):
        out = _ok(cli("runs", "--stale", "--experiment", "stale", "--tracking-uri", uri,
                      "--format", "json", *extra))
        return {r["run_id"] for r in json.loads(out)}

    assert stale() == {dead, dead_child, untagged_old}
    assert stale("--older-than", "0") == {dead, dead_child, untagged_old, elsewhere,
                                          untagged_new}
    result = cli("runs", "--stale", "--mark-failed", "--experiment", "stale", "--tracking-uri",
                 uri)
    assert result.exit_code == 0 and "marked 3 run(s) FAILED" in result.stdout
    status = {r: client.get_run(r).info.status
              for r in (dead, dead_child, untagged_old, live, elsewhere, untagged_new)}
    assert status == {dead: "FAILED", dead_child: "FAILED", untagged_old: "FAILED",
                      live: "RUNNING", elsewhere: "RUNNING", untagged_new: "RUNNING"}
    assert stale() == set()


# ------------------------------------------------------------------------------ fast --help


def test_cli_module_imports_neither_mlflow_nor_pandas():
    code = ("import sys, cli.registry; "
            "print(sorted(m for m in ('mlflow', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------- rerun


def test_a_cached_rerun_reuses_the_version_and_uploads_nothing(store, client, cli):
    """Rerunning seed 3 (every trained stage from cache; same weights, same data) registers
    no new version and writes no artifact file: each stage points at the first run's, and
    the run says what it reused. Runs last: it adds a run to the experiment."""
    from flows.pipeline import run_pipeline

    first = store["results"][0]
    files = sorted(p for p in (store["home"] / "artifacts").rglob("*") if p.is_file())
    versions = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    config = resolve_config("quick", data_dir=store["config"].data.data_dir, sets=TINY,
                            seed=SEEDS[0])
    again = run_pipeline(config, preset="quick", tracking_uri=store["uri"],
                         experiment=EXPERIMENT, registered_model_name=MODEL)

    assert again.model_version == first.model_version and again.model_reused
    assert {v.version for v in client.search_model_versions(f"name = '{MODEL}'")} == versions
    assert sorted(p for p in (store["home"] / "artifacts").rglob("*") if p.is_file()) == files
    earlier = {s.name: s.mlflow_run_id for s in first.stages}
    assert {s.name: s.artifacts_from for s in again.stages} == earlier
    assert [s.name for s in again.stages if s.cached] == STAGES[1:5]  # data, evaluate: never
    assert again.test_error_pretrained == first.test_error_pretrained
    for stage in again.stages:
        assert client.list_artifacts(stage.mlflow_run_id) == []
        assert client.get_run(stage.mlflow_run_id).data.tags[
            "layerwise.artifacts_from"] == earlier[stage.name]
    note = client.get_run(again.run_id).data.tags["layerwise.reused"]
    assert f"model {MODEL} v{first.model_version} (same weights and data)" in note
    assert "the artifacts of " + ", ".join(STAGES) in note

    rec = queries.show_run(client, again.run_id)
    art = rec["artifacts"].set_index("path")
    assert art.loc["weights/classifier_random.safetensors", "from_run"] == \
        earlier["finetune-random"]
    assert art.loc["evaluation/summary.json", "stage"] == "evaluate"
