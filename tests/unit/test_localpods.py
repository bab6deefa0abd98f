"""Pods as local processes (`localpods`) and the manifest side of `chaos run FILE`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chaos_cli.errors import UserError
from chaos_cli.local import localpods
from chaos_cli.local.churn import ChurnError, ChurnEvent, parse_churn
from chaos_cli.local.reconciled import load_manifest, pod_churn
from chaos_operator.api import CheckpointPolicy
from chaos_operator.pods import ANN_CONFIG, ANN_NEXT_MEMBER, Options
from chaos_operator.reconcile import reconcile
from chaos_worker.config import WorkerConfig

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "chaosjob.yaml"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_reconciled_pod_lays_out_as_its_own_root(tmp_path) -> None:
    job = load_manifest(str(MANIFEST))
    options = Options(pod_host="127.0.0.1", base_port=24000, steps=10)
    pod = reconcile(job, [], now=NOW, options=options).create[1]
    volumes = localpods.lay_out(pod, tmp_path / "digits-w1")
    assert volumes == {
        "snapshots": tmp_path / "digits-w1" / "volumes" / "snapshots",
        "config": tmp_path / "digits-w1" / "volumes" / "config",
    }
    trainer = localpods.find_container(pod, "trainer")
    argv = localpods.command(trainer, volumes, "/venv/bin/chaos")
    assert argv == ["/venv/bin/chaos", "worker", "--config", str(volumes["config"] / "config.json")]
    config = json.loads(Path(argv[3]).read_text())  # projected from the pod's annotation
    assert config["snapshot_dir"] == str(volumes["snapshots"])
    assert config["listen"] == "127.0.0.1:24003" and config["steps"] == 10
    WorkerConfig.model_validate(config)
    replicator = localpods.command(localpods.find_container(pod, "replicator"), volumes, "chaos")
    assert replicator[replicator.index("--dir") + 1] == str(volumes["snapshots"])
    with pytest.raises(KeyError, match="sidecar"):
        localpods.find_container(pod, "sidecar")


def test_a_tls_pod_gets_its_secret_as_files_and_its_paths_mapped(tmp_path) -> None:
    job = load_manifest(str(MANIFEST))
    options = Options(pod_host="127.0.0.1", base_port=24000, steps=10, worker_tls=True)
    pod = reconcile(job, [], now=NOW, options=options).create[0]
    data = {"tls.crt": b"CERT", "tls.key": b"KEY", "ca.crt": b"CA", "admission.json": b"{}"}
    volumes = localpods.lay_out(pod, tmp_path / "digits-w0", {"digits-w0-tls": data})
    tls = volumes["tls"]
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == data
    assert {(p.stat().st_mode & 0o777) for p in tls.iterdir()} == {0o444}
    config = json.loads((volumes["config"] / "config.json").read_text())
    files = {"cert": "tls.crt", "key": "tls.key", "ca": "ca.crt", "admission": "admission.json"}
    assert config["tls"] == {k: str(tls / f) for k, f in files.items()}
    replicator = localpods.command(localpods.find_container(pod, "replicator"), volumes, "chaos")
    assert replicator[replicator.index("--tls-key") + 1] == str(tls / "tls.key")
    # a Secret not given leaves its volume empty (the pod runner waits for it instead)
    empty = localpods.lay_out(pod, tmp_path / "other", {})
    assert not any(empty["tls"].iterdir())


def test_a_claim_is_one_directory_shared_by_the_pods_that_mount_it(tmp_path) -> None:
    job = load_manifest(str(MANIFEST))
    job.spec.checkpoints = CheckpointPolicy(claim_name="ckpt")
    options = Options(pod_host="127.0.0.1", base_port=24000, steps=10)
    writer = reconcile(job, [], now=NOW, options=options).create[0]
    claims = tmp_path / "claims"
    first = localpods.lay_out(writer, tmp_path / "digits-w0", claims=claims)
    again = localpods.lay_out(writer, tmp_path / "digits-w9", claims=claims)
    assert first["checkpoints"] == again["checkpoints"] == claims / "ckpt"
    config = json.loads((first["config"] / "config.json").read_text())
    assert config["checkpoint_dir"] == str(claims / "ckpt")
    # without `claims` a claim is a directory of the pod, like any other volume
    alone = localpods.lay_out(writer, tmp_path / "solo")
    assert alone["checkpoints"] == tmp_path / "solo" / "volumes" / "checkpoints"


def test_only_whole_path_components_are_mapped() -> None:
    where = {"/snapshots": Path("/tmp/p/snap"), "/etc/chaos/": Path("/tmp/p/cfg")}
    assert localpods.map_path("/snapshots", where) == "/tmp/p/snap"
    assert localpods.map_path("/snapshots/slot-0.bin", where) == "/tmp/p/snap/slot-0.bin"
    assert localpods.map_path("/snapshots2", where) == "/snapshots2"
    assert localpods.map_path("/etc/chaos/config.json", where) == "/tmp/p/cfg/config.json"
    assert localpods.map_json({"a": ["/snapshots/x", 3]}, where) == {"a": ["/tmp/p/snap/x", 3]}


def test_a_manifest_is_loaded_as_a_fresh_job(tmp_path) -> None:
    text = MANIFEST.read_text().replace(
        "  name: digits", f"  name: digits\n  annotations:\n    {ANN_NEXT_MEMBER}: '7'"
    )
    path = tmp_path / "job.yaml"
    path.write_text(text + "status:\n  phase: Running\n  currentStep: 99\n")
    job = load_manifest(str(path))
    assert job.status is None
    assert ANN_NEXT_MEMBER not in job.metadata.annotations  # member ids start at w0
    assert reconcile(job, [], now=NOW).create[0]["metadata"]["name"] == "digits-w0"


def test_churn_names_become_pod_names_and_replicas_stay_in_bounds() -> None:
    job = load_manifest(str(MANIFEST))  # replicas 3 within [1, 5]
    events = parse_churn("crash:w1@3,join@5,link-down:w0-w3@6,leave:w4@8", 3, reconciled=True)
    assert pod_churn(job, events) == [
        ChurnEvent("crash", 3, "digits-w1"),
        ChurnEvent("join", 5, "digits-w4"),
        ChurnEvent("link-down", 6, "digits-w0", "digits-w3"),
        ChurnEvent("leave", 8, "digits-w4"),
    ]
    with pytest.raises(UserError, match=r"join:w5@4 would take spec.replicas to 6"):
        pod_churn(job, parse_churn("join@2,join@3,join@4", 3, reconciled=True))
    leaves = [ChurnEvent("leave", step, f"w{step - 2}") for step in (2, 3, 4)]
    with pytest.raises(UserError, match=r"minReplicas \(1\)"):
        pod_churn(job, leaves)
    with pytest.raises(ChurnError, match=r"'leave:w2@4' leaves no worker"):
        parse_churn("leave:w0@2,leave:w1@3,leave:w2@4", 3, reconciled=True)


def test_a_spare_pods_config_is_projected_again_when_its_annotation_changes(tmp_path) -> None:
    job = load_manifest(str(MANIFEST))
    job.spec.spares = 1
    options = Options(pod_host="127.0.0.1", base_port=24000, steps=10)
    spare = reconcile(job, [], now=NOW, options=options).create[-1]
    volumes = localpods.lay_out(spare, tmp_path / "spare")
    path = volumes["config"] / "config.json"
    standby = json.loads(path.read_text())
    assert standby["standby"] is True and standby["standby_file"] == str(path)  # mapped
    ordered = {**json.loads(spare["metadata"]["annotations"][ANN_CONFIG]), "standby": False,
               "join": "127.0.0.1:24000"}  # fmt: skip
    spare["metadata"]["annotations"][ANN_CONFIG] = json.dumps(ordered)
    localpods.project(spare, tmp_path / "spare", volumes)
    again = json.loads(path.read_text())
    assert again == {**standby, "standby": False, "join": "127.0.0.1:24000"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]  # no partial file


def test_chaos_run_file_refuses_spares(tmp_path) -> None:
    text = MANIFEST.read_text().replace("spec:\n", "spec:\n  spares: 1\n", 1)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"spec\.spares: is for the operator"):
        load_manifest(str(path))
