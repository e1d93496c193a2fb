"""Integration: a site runs only the ClientApp it installed, whatever bundle a run submits.

One TLS deployment on loopback (a coordinator and two sites, one of whose CSV lives at a path
with a double quote, a space and a backslash). Someone holding the coordinator's kit submits,
with `flwr run APP fedvault-coordinator`, (i) a bundle with a ClientApp of its own that reads
the site's CSV and key, and (ii) a bundle naming fedvault's own components that ships modules
shadowing fedvault's. Each bundle's ServerApp (it runs at the coordinator: the attacker's
side) records every reply it got. Then an honest `fedvault run` of one round still trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk

from fedvault.client.launcher import REFUSALS_LOG
from fedvault.common.data import load_dataset
from fedvault.common.errors import POLICY_REFUSAL_CODE
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.ledger import KIT_LEDGER
from fedvault.runtime.processes import QUIET_ENV, write_app_dir
from fedvault.server.runs import fedvault_version
from tests.deployment import (
    fedvault_env,
    fedvault_process,
    provision,
    wait_for,
    write_site_csvs,
)

pytestmark = pytest.mark.integration

SITES = ["hospital-a", "hospital-b"]
#: hospital-a's data lives here: a naive `key="value"` node config would break on it.
ODD_FOLDER = 'odd "dir" \\ x'
ODD_NAME = 'site "a" \\ data.csv'

#: A ServerApp that sends one train message to every site and records what came back.
RECORDER = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    nodes = []
    while time.monotonic() < deadline and len(nodes) < {sites}:
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=180):
        entry = {{"node": reply.metadata.src_node_id, "error": reply.has_error()}}
        if reply.has_error():
            entry["code"] = reply.error.code
            entry["reason"] = reply.error.reason
        else:
            entry["content"] = repr(reply.content)
        replies.append(entry)
    Path({record!r}).write_text(json.dumps(replies))
"""

#: A ClientApp of the attacker's own: it reads the site's data and key and sends them back.
FOREIGN_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(msg: Message, context: Context) -> Message:
    node = context.node_config
    kit = Path(str(node["ledger-path"])).parent.parent
    Path({markers!r}).mkdir(parents=True, exist_ok=True)
    (Path({markers!r}) / ("foreign-" + str(node["site-name"]))).write_text("ran")
    loot = {{
        "csv": Path(str(node["data-path"])).read_text(),
        "key": (kit / "site.key").read_text(),
        "node-config": repr(dict(node)),
    }}
    return Message(RecordDict({{"loot": ConfigRecord(loot)}}), reply_to=msg)
"""

#: Shadows a fedvault module: it writes a marker, named after the process, when imported.
SHADOW = """\
import sys
from pathlib import Path

from flwr.clientapp import ClientApp

Path({markers!r}).mkdir(parents=True, exist_ok=True)
(Path({markers!r}) / ("shadow-" + {module!r} + "-" + Path(sys.argv[0]).name)).write_text("ran")
app = ClientApp()
"""
#: `flwr run` itself imports the bundle's ClientApp to validate it: on the submitter's side.
SUBMITTER = "-flwr"


@dataclass
class Submission:
    """One bundle submitted with `flwr run`: its hash, Flower's run id and what came back."""

    fab_sha256: str
    run_id: str
    output: str
    replies: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Deployment:
    tmp: Path
    markers: Path
    kits: dict[str, Path]
    csvs: dict[str, Path]
    server_kit: Path
    site_logs: dict[str, Path]
    submissions: dict[str, Submission]
    honest: subprocess.CompletedProcess[str]
    honest_dir: Path


def _foreign_app(folder: Path, markers: Path, record: Path) -> Path:
    """Bundle (i): its own ServerApp and ClientApp."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "helpful-stats"\nversion = "1.0.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "mallory"\n'
        '[tool.flwr.app.components]\nserverapp = "recorder:app"\nclientapp = "steal:app"\n'
    )
    (folder / "recorder.py").write_text(RECORDER.format(sites=len(SITES), record=str(record)))
    (folder / "steal.py").write_text(FOREIGN_CLIENT.format(markers=str(markers)))
    return folder


def _shadow_app(folder: Path, markers: Path, record: Path) -> Path:
    """Bundle (ii): fedvault's own pyproject, plus modules shadowing fedvault's."""
    write_app_dir(folder, fedvault_version())
    for module in ("fedvault/common/__init__.py", "fedvault/common/site_privacy.py",
                   "fedvault/client/__init__.py", "fedvault/client/app.py"):  # fmt: skip
        path = folder / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SHADOW.format(markers=str(markers), module=module.replace("/", ".")))
    # at the coordinator (the attacker's own side) fedvault's ServerApp is replaced too; the
    # package itself is empty there, so only the submitter's `flwr run` writes markers
    (folder / "fedvault" / "__init__.py").write_text("")
    (folder / "fedvault" / "server").mkdir()
    (folder / "fedvault" / "server" / "__init__.py").write_text("")
    (folder / "fedvault" / "server" / "app.py").write_text(
        RECORDER.format(sites=len(SITES), record=str(record))
    )
    return folder


def _submit(app: Path, server_kit: Path, record: Path) -> Submission:
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(server_kit / "state" / "flwr-home")}
    flwr = Path(sys.executable).parent / "flwr"
    result = subprocess.run(
        [str(flwr), "run", str(app), "fedvault-coordinator", "--stream"],
        capture_output=True, text=True, timeout=400, env=env, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    found = re.findall(r"Successfully started run (\d+)", output)
    assert found, output[-3000:]
    replies = json.loads(record.read_text()) if record.exists() else []
    return Submission(
        fab_sha256=hashlib.sha256(build_fab_from_disk(app)).hexdigest(),  # as `flwr run` does
        run_id=found[-1],
        output=output,
        replies=replies,
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    tmp = tmp_path_factory.mktemp("foreign")
    markers = tmp / "markers"
    federation, port = provision(tmp, SITES)
    written = write_site_csvs(tmp, len(SITES))
    odd = tmp / ODD_FOLDER / ODD_NAME
    odd.parent.mkdir()
    written[0].rename(odd)
    csvs = {SITES[0]: odd, SITES[1]: written[1]}
    kits = {site: federation / "sites" / site for site in SITES}
    server_kit = federation / "server"
    with contextlib.ExitStack() as stack:
        server_log = tmp / "server.log"
        server = stack.enter_context(
            fedvault_process(
                ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"],
                server_log,
            )
        )
        wait_for(server_log, r"^ready:", server, timeout=120)
        procs = {}
        for site in SITES:
            args = ["client", "start", "--kit", str(kits[site]), "--data", str(csvs[site]),
                    "--label-column", "diagnosis", "--device", "cpu", "--threads", "1"]  # fmt: skip
            procs[site] = stack.enter_context(fedvault_process(args, tmp / f"{site}.log"))
        for site in SITES:
            wait_for(tmp / f"{site}.log", r"fedvault client site", procs[site], timeout=180)
        submissions = {
            "foreign": _submit(
                _foreign_app(tmp / "foreign-app", markers, tmp / "foreign.json"),
                server_kit,
                tmp / "foreign.json",
            ),
            "shadow": _submit(
                _shadow_app(tmp / "shadow-app", markers, tmp / "shadow.json"),
                server_kit,
                tmp / "shadow.json",
            ),
        }
        honest_dir = tmp / "honest-run"
        honest = subprocess.run(
            [sys.executable, "-m", "fedvault", "run", "--kit", str(server_kit), "--rounds", "1",
             "--out", str(honest_dir)],
            capture_output=True, text=True, timeout=600, env=fedvault_env(), check=False,
        )  # fmt: skip
    return Deployment(
        tmp=tmp,
        markers=markers,
        kits=kits,
        csvs=csvs,
        server_kit=server_kit,
        site_logs={site: kits[site] / "state" / "supernode.log" for site in SITES},
        submissions=submissions,
        honest=honest,
        honest_dir=honest_dir,
    )


@pytest.mark.parametrize("bundle", ["foreign", "shadow"])
def test_every_site_refuses_the_bundle(deployment: Deployment, bundle: str) -> None:
    sub = deployment.submissions[bundle]
    assert len(sub.replies) == len(SITES), sub.output[-3000:]
    for reply in sub.replies:
        assert reply["error"] and reply["code"] == POLICY_REFUSAL_CODE, reply
        expected = rf"site ({'|'.join(SITES)}) refused bundle {sub.fab_sha256[:12]}: "
        assert re.match(expected, reply["reason"]), reply
    assert {r["reason"].split()[1] for r in sub.replies} == set(SITES)


@pytest.mark.parametrize("bundle", ["foreign", "shadow"])
def test_each_site_logs_the_refused_bundles_hash(deployment: Deployment, bundle: str) -> None:
    sub = deployment.submissions[bundle]
    for site in SITES:
        log = deployment.kits[site] / "state" / REFUSALS_LOG
        records = [json.loads(line) for line in log.read_text().splitlines()]
        mine = [r for r in records if r["bundle_sha256"] == sub.fab_sha256]
        assert len(mine) == 1 and str(mine[0]["run_id"]) == sub.run_id, records
        assert mine[0]["site"] == site
        assert f"refused bundle {sub.fab_sha256[:12]}" in deployment.site_logs[site].read_text()
        assert sub.fab_sha256 in deployment.site_logs[site].read_text()


def test_nothing_the_bundles_would_write_exists(deployment: Deployment) -> None:
    # (only `flwr run`, on the submitter's own machine, imports the bundle's modules)
    written = sorted(p.name for p in deployment.markers.glob("*"))
    assert not [name for name in written if not name.endswith(SUBMITTER)], written
    assert any(name.endswith(SUBMITTER) for name in written)  # the markers do get written
    # nothing of either bundle was unpacked at a site
    for site in SITES:
        state = deployment.kits[site] / "state"
        assert not list(state.rglob("steal.py")) and not list(state.rglob("site_privacy.py"))


def test_no_row_or_key_reaches_the_coordinator(deployment: Deployment) -> None:
    # Prepare: a data row of each site and a line of each site's private key
    secrets = []
    for site in SITES:
        secrets.append(deployment.csvs[site].read_text().splitlines()[1])
        secrets.append((deployment.kits[site] / "site.key").read_text().splitlines()[1])

    # Execute: everything the coordinator side received or logged
    seen = [sub.output + json.dumps(sub.replies) for sub in deployment.submissions.values()]
    for path in (deployment.server_kit / "state").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".txt"):
            seen.append(path.read_text(errors="replace"))
    text = "\n".join(seen)

    # Assert
    assert all(secret not in text for secret in secrets)
    assert all("loot" not in json.dumps(sub.replies) for sub in deployment.submissions.values())


def test_an_honest_run_still_trains_on_the_exact_odd_path(deployment: Deployment) -> None:
    assert deployment.honest.returncode == 0, deployment.honest.stdout[-3000:]
    for site in SITES:
        data = load_dataset(f"csv:{deployment.csvs[site]}", label_column="diagnosis")
        fingerprint = dataset_fingerprint(data.features, data.labels)
        with contextlib.closing(
            sqlite3.connect(f"file:{deployment.kits[site] / KIT_LEDGER}?mode=ro", uri=True)
        ) as conn:
            rows = conn.execute("SELECT dataset, round FROM entries").fetchall()
        assert (fingerprint, 1) in rows, (site, rows)
    node_config = tomllib.loads(
        (deployment.kits[SITES[0]] / "state" / "node-config.toml").read_text()
    )
    assert node_config["data-path"] == str(deployment.csvs[SITES[0]].resolve())
