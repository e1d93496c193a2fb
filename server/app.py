"""fedvault ServerApp: ask sites for their data schema, run the strategy, write the run directory.

The same ServerApp serves `fedvault simulate` (Flower's Simulation Engine) and `fedvault run`
(a real SuperLink): both hand it the validated configuration as the ``scenario-toml`` run
config value and the run directory as ``out-dir``.
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedvault.common.checkpoint import (
    Checkpoint,
    config_digest,
    drop_rows_after,
    load_checkpoint,
    save_checkpoint,
)
from fedvault.common.config import FedvaultConfig, parse_toml_text
from fedvault.common.errors import ConfigError, FederationError, FedvaultError
from fedvault.common.models import build_model, default_model_for
from fedvault.common.progress import append_event
from fedvault.common.report import (
    CONFIG_FILE,
    ERROR_FILE,
    METRICS_FILE,
    REPORT_BY_COMMAND,
    REPORT_WRITER,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RunDirectory,
    classification_section,
    format_progress,
    privacy_section,
    read_jsonl,
    round_row,
    site_rows,
)
from fedvault.common.report_html import write_report
from fedvault.common.training import SECURE_RNG_NOTE
from fedvault.server.grid import PromptGrid
from fedvault.server.ledger_watch import LedgerWatch
from fedvault.server.resume import (
    load_report_state,
    load_strategy_state,
    report_state,
    strategy_state,
)
from fedvault.server.rounds import Rounds
from fedvault.server.strategy import (
    ReportingStrategy,
    build_strategy,
    central_dp_report,
    required_sites,
)
from fedvault.server.update_validation import UpdateValidation

app = ServerApp()

SCHEMA_QUERY = f"{MessageType.QUERY}.schema"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def wait_for_sites(
    grid: Grid, sites: int, timeout: float, expected: Sequence[str] = ()
) -> list[int]:
    """Node ids of the first ``sites`` SuperNodes, waiting at most ``timeout`` seconds.

    On timeout, the error names the ``expected`` sites that did not connect (the connected
    ones are asked for their names).
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites:
            return nodes[:sites]
        if time.monotonic() > deadline:
            missing = ""
            if expected:
                try:
                    here = {str(s["site"]) for s in query_schemas(grid, nodes, 30.0).values()}
                except FederationError:
                    here = set()
                absent = [name for name in expected if name not in here]
                missing = f"; not connected: {', '.join(absent)}" if absent else ""
            raise FederationError(
                f"only {len(nodes)} of {sites} sites connected within {timeout:g} s{missing}",
                hint="Check that every partner site ran `fedvault client start` and can reach "
                "the coordinator (federation.connect-timeout sets how long to wait).",
            )
        time.sleep(0.5)


def site_nodes(run_config: Mapping[str, object]) -> dict[int, str]:
    """The authenticated site of each node id (`fedvault run`'s ``site-nodes``); {} in a
    simulation, where sites are named by their own schema reply."""
    text = str(run_config.get("site-nodes", "") or "")
    if not text:
        return {}
    try:
        return {int(node): str(site) for node, site in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError) as err:
        raise ConfigError(f"site-nodes is not a JSON object of node ids: {text[:80]!r}") from err


def query_schemas(
    grid: Grid,
    nodes: list[int],
    timeout: float,
    authenticated: Mapping[int, str] | None = None,
) -> dict[int, dict[str, Any]]:
    """Each site's data schema (shape, classes, row counts), checked to agree across sites.

    With ``authenticated`` (a deployment), each schema's ``site`` is the name the node
    authenticated as, whatever name the reply carries.
    """
    messages = [Message(RecordDict(), dst_node_id=n, message_type=SCHEMA_QUERY) for n in nodes]
    schemas: dict[int, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        who = authenticated.get(node, f"node {node}") if authenticated else f"on node {node}"
        if reply.has_error():
            raise FederationError(
                f"site {who} could not answer the schema query: {reply.error.reason}",
                hint="Fix the site's data file or settings; `fedvault simulate` checks files "
                "the same way.",
            )
        record = reply.content["schema"]
        schemas[node] = {k: record[k] for k in record}
        if authenticated:
            claimed = str(schemas[node].get("site", ""))
            schemas[node]["site"] = authenticated.get(node, f"node-{node}")
            if claimed != schemas[node]["site"]:
                log(
                    WARNING,
                    "fedvault: node %d authenticated as %s claims to be %r; filed under %s",
                    node,
                    schemas[node]["site"],
                    claimed,
                    schemas[node]["site"],
                )
    missing = set(nodes) - set(schemas)
    if missing:
        raise FederationError(f"{len(missing)} site(s) did not answer the schema query in time")
    names = [s["site"] for s in schemas.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two sites use the same name: {sorted(names)}")
    first = next(iter(schemas.values()))
    for schema in schemas.values():
        for key in ("feature-shape", "num-classes", "kind"):
            if schema[key] != first[key]:
                raise FederationError(
                    f"sites disagree on {key}: {first['site']} has {first[key]}, "
                    f"{schema['site']} has {schema[key]}",
                    hint="Every site must use the same feature columns and label classes.",
                )
    return schemas


def default_run_dir(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / "runs" / f"{name}-{stamp}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's Grid and Context."""
    text = str(context.run_config.get("scenario-toml", ""))
    out = str(context.run_config.get("out-dir", ""))
    cfg = parse_toml_text(text)
    run_dir = RunDirectory(Path(out) if out else default_run_dir(cfg.name))
    if not run_dir.file(CONFIG_FILE).exists():
        run_dir.write_text(CONFIG_FILE, cfg.to_toml())
    resume = str(context.run_config.get("resume", "false")).lower() == "true"
    record = str(context.run_config.get("ledger-record", "") or "")
    # The coordinator's own progress file (`fedvault server start` prints its events)
    progress = str(context.run_config.get("progress-record", "") or "") or None
    run_id = str(context.run_config.get("run-id", "") or run_dir.path.name)
    authenticated = site_nodes(context.run_config)
    draw_report = str(context.run_config.get(REPORT_WRITER, "") or "") != REPORT_BY_COMMAND
    append_event(progress, event="start", run=run_id, rounds=cfg.federation.rounds,
                 sites=sorted(set((authenticated or {}).values())))  # fmt: skip
    try:
        _federate(
            PromptGrid(grid),
            cfg,
            run_dir,
            resume=resume,
            authenticated=authenticated,
            ledger_watch=LedgerWatch(Path(record) if record else None),
            run_id=run_id,
            progress=progress,
            draw_report=draw_report,
        )
    except FedvaultError as err:
        append_event(progress, event="end", run=run_id, outcome=f"failed: {err}")
        log(ERROR, "fedvault: %s", err)
        run_dir.write_json(
            ERROR_FILE,
            {
                "error": type(err).__name__,
                "message": str(err),
                "hint": err.hint,
                "exit_code": err.exit_code,
            },
        )
        raise
    summary = json.loads(run_dir.file(SUMMARY_FILE).read_text(encoding="utf-8"))
    append_event(
        progress, event="end", run=run_id, outcome="finished",
        epsilon=summary.get("epsilon"), accuracy=summary.get("final_accuracy"),
    )  # fmt: skip


def _checkpoint_to_resume(cfg: FedvaultConfig, run_dir: RunDirectory) -> Checkpoint:
    """The run directory's checkpoint, checked to belong to this configuration."""
    checkpoint = load_checkpoint(run_dir.path)
    if checkpoint.config_sha256 != config_digest(cfg.to_toml()):
        raise ConfigError(
            f"the checkpoint in {run_dir.path} was written by another configuration",
            hint="Resume with the run directory's own config.toml (fedvault ... --resume DIR).",
        )
    if checkpoint.total_rounds != cfg.federation.rounds:
        raise ConfigError(
            f"the checkpoint is for {checkpoint.total_rounds} rounds, this run has "
            f"{cfg.federation.rounds}"
        )
    drop_rows_after(run_dir, checkpoint.round)  # a round the checkpoint misses runs again
    log(INFO, "fedvault: resuming after round %d of %d", checkpoint.round, checkpoint.total_rounds)
    return checkpoint


def _federate(
    grid: PromptGrid,
    cfg: FedvaultConfig,
    run_dir: RunDirectory,
    *,
    resume: bool,
    authenticated: Mapping[int, str] | None = None,
    ledger_watch: LedgerWatch | None = None,
    run_id: str = "",
    progress: str | None = None,
    draw_report: bool = True,
) -> None:
    checkpoint = _checkpoint_to_resume(cfg, run_dir) if resume else None
    started = datetime.now(UTC)
    t_start = time.monotonic()
    timeout = cfg.federation.round_timeout
    if cfg.privacy.enabled:
        log(WARNING, "fedvault: %s", SECURE_RNG_NOTE)
    else:
        log(
            WARNING,
            "fedvault: sample-level DP-SGD is OFF at the sites for this run%s",
            " (central DP only)" if cfg.privacy.central else " (non-private baseline)",
        )
    if cfg.privacy.central:
        log(
            INFO,
            "fedvault: central DP on (site-level): σ = %g, clipping norm %g",
            cfg.privacy.central_noise_multiplier,
            cfg.privacy.central_clipping_norm,
        )

    nodes = wait_for_sites(
        grid,
        cfg.federation.sites,
        cfg.federation.connect_timeout,
        expected=cfg.federation.site_names,
    )
    schemas = query_schemas(grid, nodes, timeout, authenticated)
    names = {node: str(s["site"]) for node, s in schemas.items()}
    if authenticated:  # a site that joins later is named by its key too, never by its word
        names = {**authenticated, **names}
    first = next(iter(schemas.values()))
    model_name = cfg.model.name if cfg.model.name != "auto" else default_model_for(first["kind"])
    model = build_model(
        model_name, tuple(first["feature-shape"]), int(first["num-classes"]), seed=cfg.seed
    )
    log(
        INFO,
        "fedvault: %d sites (%s), model %s, %s",
        len(nodes),
        ", ".join(sorted(names.values())),
        model_name,
        cfg.federation.strategy,
    )

    validation = UpdateValidation.from_config(cfg)
    # The update bounds need a calibration per site size: computed while the sites train.
    rows = [min(int(s["train-rows"]), cfg.validation.max_site_rows) for s in schemas.values()]
    threading.Thread(target=validation.warm_up, args=(rows,), daemon=True).start()
    strategy = ReportingStrategy(
        build_strategy(cfg),
        names,
        min_sites=cfg.federation.min_sites,
        validation=validation,
        required_sites=required_sites(cfg),
        round_timeout=timeout,
        trust_reported_names=not authenticated,
        schema_rows={str(s["site"]): int(s["train-rows"]) for s in schemas.values()},
        max_site_rows=cfg.validation.max_site_rows,
        ledger_watch=ledger_watch if cfg.privacy.enabled else None,
        run_id=run_id,
    )
    done = checkpoint.round if checkpoint else 0
    initial_arrays = ArrayRecord(model.state_dict())
    if checkpoint is not None:
        initial_arrays = ArrayRecord(checkpoint.model)
        load_strategy_state(strategy.inner, checkpoint.strategy_arrays, checkpoint.strategy_json)
        load_report_state(strategy, checkpoint.report)
    digest = config_digest(cfg.to_toml())
    last = {"t": time.monotonic()}

    def on_round(server_round: int, arrays: ArrayRecord) -> None:
        """Write an evaluated round: its rows, the model, the checkpoint, the progress line."""
        rows = site_rows(
            server_round,
            strategy.train_metrics.get(server_round, {}),
            strategy.eval_metrics.get(server_round, {}),
        )
        now = time.monotonic()
        failed = sorted(strategy.failures.get(server_round, {}))
        row = round_row(
            server_round,
            rows,
            round_seconds=now - last["t"],
            elapsed_seconds=now - t_start,
            failed_sites=failed,
            refused_sites=sorted(strategy.refusals.get(server_round, {})),
            rejected_sites=strategy.rejections.get(server_round, {}),
            ledger_alerts=strategy.ledger_alerts.get(server_round, {}),
            evals=strategy.eval_metrics.get(server_round, {}),
        )
        last["t"] = now
        run_dir.append_rows(METRICS_FILE, rows)
        run_dir.append_rows(ROUNDS_FILE, [row])
        run_dir.save_model(arrays.to_torch_state_dict())
        strategy_arrays, strategy_json = strategy_state(strategy.inner)
        save_checkpoint(
            run_dir,
            Checkpoint(
                round=server_round,
                total_rounds=cfg.federation.rounds,
                config_sha256=digest,
                model=dict(arrays.to_torch_state_dict()),
                strategy_arrays=strategy_arrays,
                strategy_json=strategy_json,
                report=report_state(strategy),
            ),
        )
        log(INFO, "fedvault: %s", format_progress(row, cfg.federation.rounds))
        append_event(progress, event="round", run=run_id, round=server_round,
                     line=format_progress(row, cfg.federation.rounds))  # fmt: skip

    try:
        if done >= cfg.federation.rounds:
            final_arrays = initial_arrays  # the run had finished; only its report is missing
        else:
            # A deployment's sites take one message at a time: each round's evaluation
            # goes out with the next round's training (server/rounds.py).
            rounds = Rounds(strategy, grid, timeout=timeout, report=on_round,
                            pipelined=bool(authenticated))  # fmt: skip
            final_arrays = rounds.run(initial_arrays, first=done + 1, last=cfg.federation.rounds,
                                      evaluate_first=checkpoint is None)  # fmt: skip
    except FederationError as err:  # too few sites left: keep what was done, say why
        _finish(cfg, run_dir, strategy, model_name, started, time.monotonic() - t_start,
                ended_early=str(err), draw_report=draw_report)  # fmt: skip
        raise
    run_dir.save_model(final_arrays.to_torch_state_dict())
    _finish(cfg, run_dir, strategy, model_name, started, time.monotonic() - t_start,
            draw_report=draw_report)  # fmt: skip


def _finish(cfg: FedvaultConfig, run_dir: RunDirectory, strategy: ReportingStrategy,
            model_name: str, started: datetime, seconds: float,
            ended_early: str | None = None, draw_report: bool = True) -> None:  # fmt: skip
    rounds = read_jsonl(run_dir.file(ROUNDS_FILE))
    metrics = read_jsonl(run_dir.file(METRICS_FILE))
    trained = [r for r in rounds if r["round"] > 0]
    if ended_early is None and (not trained or trained[-1]["accuracy"] is None):
        raise FederationError("the run finished without any evaluated round")
    final = trained[-1] if trained else rounds[-1] if rounds else {"accuracy": None, "loss": None}
    site_eps: dict[str, float] = {}
    site_sigma: dict[str, float] = {}
    for row in metrics:
        if row["round"] > 0:
            site_eps[row["site"]] = max(site_eps.get(row["site"], 0.0), row["epsilon"])
            site_sigma[row["site"]] = row["noise_multiplier"]
    failures = {site: reason for per in strategy.failures.values() for site, reason in per.items()}
    refused: dict[str, str] = {}
    for per_site in strategy.refusals.values():
        for site, reason in per_site.items():
            refused.setdefault(site, reason)  # the first refusal says why
    rejected: dict[str, list[str]] = {}  # updates that failed validation, round by round
    for rnd, per_site in sorted(strategy.rejections.items()):
        for site, reason in sorted(per_site.items()):
            rejected.setdefault(site, []).append(f"round {rnd}: {reason}")
    ledger_alerts: dict[str, list[str]] = {}
    for rnd, per_site in sorted(strategy.ledger_alerts.items()):
        for site, reason in sorted(per_site.items()):
            ledger_alerts.setdefault(site, []).append(f"round {rnd}: {reason}")
    summary = {
        "name": cfg.name,
        "rounds": len(trained),
        "sites": cfg.federation.sites,
        "site_names": sorted(site_eps),
        "dataset": cfg.data.dataset,
        "model": model_name,
        "strategy": cfg.federation.strategy,
        "final_accuracy": final["accuracy"],
        "final_loss": final["loss"],
        "initial_accuracy": rounds[0]["accuracy"] if rounds and rounds[0]["round"] == 0 else None,
        "initial_loss": rounds[0]["loss"] if rounds and rounds[0]["round"] == 0 else None,
        "dp": cfg.privacy.enabled,
        "epsilon": max(site_eps.values(), default=0.0),
        "site_epsilon": site_eps,
        "target_epsilon": cfg.privacy.target_epsilon,
        "noise_multiplier": site_sigma,
        "delta": cfg.privacy.target_delta if cfg.privacy.enabled else 0.0,
        "accountant": cfg.privacy.accountant,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "central_dp": central_dp_report(strategy.inner),
        "failed_sites": failures,
        "refused_sites": refused,
        "rejected_updates": rejected,
        "ledger_alerts": ledger_alerts,
        "ended_early": ended_early,
        "classification": classification_section(rounds, metrics),
        "privacy": privacy_section(
            metrics,
            strategy.refusals,
            enabled=cfg.privacy.enabled,
            accountant=cfg.privacy.accountant,
            delta=cfg.privacy.target_delta,
        ),
        "started_at": started.isoformat(timespec="seconds"),
        "wall_seconds": round(seconds, 2),
        "versions": {
            "fedvault": _version("fedvault"),
            "flwr": _version("flwr"),
            "opacus": _version("opacus"),
            "torch": _version("torch"),
        },
    }
    run_dir.write_json(SUMMARY_FILE, summary)
    if draw_report:  # else the command draws them from the files (REPORT_BY_COMMAND)
        run_dir.plot(rounds)
        try:  # the results are all written: a report that fails must not fail the run
            write_report(run_dir)
        except Exception as err:
            log(ERROR, "fedvault: report.html could not be written: %r", err)
    if ended_early is None:
        log(
            INFO,
            "fedvault: finished %d rounds: accuracy %.3f, max epsilon %.3f (delta %g)",
            len(trained),
            final["accuracy"],
            summary["epsilon"],
            summary["delta"],
        )
    for site, alerts in sorted(ledger_alerts.items()):
        log(WARNING, "fedvault: LEDGER ALERT for site %s: %s", site, "; ".join(alerts))
    for site, reason in sorted(refused.items()):
        log(WARNING, "fedvault: site %s refused to train: %s", site, reason)
