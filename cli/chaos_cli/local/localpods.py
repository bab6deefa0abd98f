"""Pods as local processes: what a kubelet would do with a worker pod, minus the container.

Shared by the local backend of `chaos run FILE` (`chaos_cli.local.reconciled`) and the test
pod runner (`tests/controlplane/podrunner.py`). Pods are plain dicts in the API's JSON shape
(camelCase keys), as `reconcile` builds them and as the API server returns them.

* Every volume becomes a directory `<pod dir>/volumes/<name>` (a `hostPath` is its path
  on this machine, which is the node; a `persistentVolumeClaim` is `<claims>/<claim name>`,
  shared by the pods that mount it and outliving them, when the caller gives `claims`):
  an `emptyDir` stays empty,
  a `downwardAPI` volume gets one file per item whose field reference is
  `metadata.annotations['…']`, `metadata.name` or `metadata.namespace` (`project`, again
  whenever the annotations change), a `secret` volume
  one file per entry of the Secret's data (which the caller reads), with its `defaultMode`.
* Each pod has, in effect, its own root: an absolute path under a container's mount point
  (in its command line, its environment's values, and JSON files a downwardAPI volume
  projects) is rewritten to the directory of that volume.
* A container's `terminationMessagePath` becomes `<pod dir>/<container>.termination-log`.
* `chaos` as a command's first word becomes the given executable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chaos_operator.federation.identity import write_file

FIELD = re.compile(r"^metadata\.annotations\['(?P<key>[^']+)'\]$")


def lay_out(
    pod: Mapping[str, Any],
    directory: Path,
    secrets: Mapping[str, Mapping[str, bytes]] | None = None,
    claims: Path | None = None,
) -> dict[str, Path]:
    """Make the pod's volume directories under `directory` and project its downwardAPI files
    and the data of its Secrets (`secrets`: Secret name -> key -> bytes; a Secret not given
    leaves its volume empty); with `claims`, a claim's volume is `claims/<claim name>`.

    Returns volume name -> directory.
    """
    spec = pod.get("spec") or {}
    volumes: dict[str, Path] = {}
    for volume in spec.get("volumes") or ():
        host = (volume.get("hostPath") or {}).get("path")
        if host:  # this machine is the node: the path itself
            volumes[volume["name"]] = Path(host)
            continue
        path = directory / "volumes" / volume["name"]
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claims is not None and claim:
            path = claims / claim
        path.mkdir(parents=True, exist_ok=True)
        volumes[volume["name"]] = path
    project(pod, directory, volumes)
    for volume in spec.get("volumes") or ():
        source = volume.get("secret")
        if source is not None:
            data = (secrets or {}).get(source.get("secretName", ""), {})
            mode = source.get("defaultMode", 0o644)
            for key, value in data.items():
                write_file(volumes[volume["name"]] / key, value, mode)
    return volumes


def project(pod: Mapping[str, Any], directory: Path, volumes: Mapping[str, Path]) -> None:
    """Write the pod's downwardAPI files from its metadata as it is now: at the start, and
    again when its annotations change (as the kubelet does; each file replaced atomically,
    so a reader never sees half of one)."""
    spec = pod.get("spec") or {}
    for volume in spec.get("volumes") or ():
        if volume.get("downwardAPI") is not None:
            where = _paths_of_readers(spec, volume["name"], volumes, directory)
            _project(pod, volume["downwardAPI"], volumes[volume["name"]], where)


def _paths_of_readers(
    spec: Mapping[str, Any], volume: str, volumes: Mapping[str, Path], directory: Path
) -> dict[str, Path]:
    """Path -> local path, as seen by the containers that mount `volume`: their mount points
    and their termination message paths (each container has its own)."""
    where: dict[str, Path] = {}
    for each in spec.get("containers") or ():
        if not any(m["name"] == volume for m in each.get("volumeMounts") or ()):
            continue
        where.update(mounts(each, volumes))
        if each.get("terminationMessagePath"):
            where[each["terminationMessagePath"]] = termination_log(directory, each["name"])
    return where


def termination_log(directory: Path, container: str) -> Path:
    """Where a container's terminationMessagePath lies in the pod's directory (what the
    kubelet would copy into its status as `terminated.message`)."""
    return directory / f"{container}.termination-log"


def mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """Mount path -> local directory, for one container."""
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or ()}


def command(container: Mapping[str, Any], volumes: Mapping[str, Path], chaos: str) -> list[str]:
    """The container's `command + args` with its mount points mapped and `chaos` replaced."""
    argv = [*(container.get("command") or ()), *(container.get("args") or ())]
    if argv and argv[0] == "chaos":
        argv[0] = chaos
    where = mounts(container, volumes)
    return [map_path(a, where) for a in argv]


def container_env(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, str]:
    """The container's environment variables given by `value` (those `valueFrom` a Secret,
    ConfigMap or field have no local source and are left out), with paths under its mount
    points mapped as in its command line."""
    where = mounts(container, volumes)
    return {
        var["name"]: map_path(str(var["value"]), where)
        for var in container.get("env") or ()
        if var.get("value") is not None
    }


def find_container(pod: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The pod's container `name` (KeyError if it has none)."""
    for c in (pod.get("spec") or {}).get("containers") or ():
        if c.get("name") == name:
            return c
    raise KeyError(f"pod {pod['metadata']['name']} has no container {name!r}")


def map_path(value: str, where: Mapping[str, Path]) -> str:
    """An absolute path under a mount point, rewritten to the pod's directory for it."""
    for mount, path in where.items():
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(path) + value[len(mount.rstrip("/")) :]
    return value


def map_json(value: Any, where: Mapping[str, Path]) -> Any:
    """Every string in a JSON value mapped with `map_path`."""
    if isinstance(value, str):
        return map_path(value, where)
    if isinstance(value, dict):
        return {k: map_json(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [map_json(v, where) for v in value]
    return value


def _project(
    pod: Mapping[str, Any], source: Mapping[str, Any], path: Path, where: Mapping[str, Path]
) -> None:
    meta = pod["metadata"]
    for item in source.get("items") or ():
        ref = (item.get("fieldRef") or {}).get("fieldPath", "")
        if match := FIELD.match(ref):
            value = (meta.get("annotations") or {}).get(match["key"], "")
        elif ref in ("metadata.name", "metadata.namespace"):
            value = meta.get(ref.split(".")[1]) or ""
        else:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            value = json.dumps(map_json(json.loads(value), where))
        target = path / item["path"]
        partial = target.with_name(f".{target.name}.new")
        partial.write_text(value)
        os.replace(partial, target)
