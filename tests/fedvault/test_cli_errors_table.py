"""Bad input at every command: one error line naming the cause in the user's words, a hint, an
exit code, no traceback, and nothing started or written.

Each case runs `fedvault ARGS` in this process through fedvault.cli.app.main (the console script's
own entry point); starting a simulation, a SuperLink or a SuperNode fails the test, so every
case is refused before anything starts. tests/fedvault/test_cli_imports.py runs the real
program once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedvault.common.data import DATASETS, load_dataset
from fedvault.common.errors import (
    EXIT_USAGE,
    ConfigError,
    DataError,
    FederationError,
    FedvaultError,
    ProvisioningError,
)
from fedvault.server.provision import provision_federation

from .conftest import CliResult

pytestmark = pytest.mark.unit

GOOD_ROWS = 40
SITES = ("clinic-a", "clinic-b")


def good_csv_text() -> str:
    """A small valid table: two numeric features, a two-class label, GOOD_ROWS rows."""
    rows = [f"{30 + i},{18.5 + (i % 7) * 1.5},{i % 2}" for i in range(GOOD_ROWS)]
    return "age,bmi,outcome\n" + "\n".join(rows) + "\n"


def write_inputs(folder: Path) -> None:
    """The files the bad-input cases point at, most derived from the same good table."""
    good = good_csv_text()
    (folder / "good.csv").write_text(good, encoding="utf-8")
    lines = good.splitlines()
    age, _bmi, outcome = lines[5].split(",")  # data row 5 is file line 6
    lines[5] = f"{age},abc,{outcome}"
    (folder / "non_numeric.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "semicolon.csv").write_text(good.replace(",", ";"), encoding="utf-8")
    (folder / "tab.csv").write_text(good.replace(",", "\t"), encoding="utf-8")
    (folder / "ragged.csv").write_text(good + "1,2,3,4\n", encoding="utf-8")
    (folder / "one_class.csv").write_text(good.replace(",1\n", ",0\n"), encoding="utf-8")
    (folder / "dup_header.csv").write_text(good.replace("bmi", "age", 1), encoding="utf-8")
    (folder / "tiny.csv").write_text("age,outcome\n1,0\n2,1\n3,0\n", encoding="utf-8")
    (folder / "latin1.csv").write_bytes("âge,outcome\n1,0\n2,1\n".encode("latin-1"))
    many = good.splitlines()
    for row, (col, bad) in {5: (1, "abc"), 7: (1, "n/a"), 9: (0, ""), 11: (1, "inf")}.items():
        cells = many[row].split(",")
        cells[col] = bad
        many[row] = ",".join(cells)
    many[13] += ",4"
    (folder / "many_problems.csv").write_text("\n".join(many) + "\n", encoding="utf-8")
    (folder / "bad_header.csv").write_text("age,age,,outcome\n1,2,3,0\n", encoding="utf-8")
    (folder / "csv_dir").mkdir()
    (folder / "csv_dir" / "a.csv").write_text(good, encoding="utf-8")
    (folder / "csv_dir" / "b.csv").write_text(good, encoding="utf-8")
    (folder / "empty.csv").write_bytes(b"")
    (folder / "header_only.csv").write_text("age,bmi,outcome\n", encoding="utf-8")
    (folder / "broken.toml").write_text('name = "broken\n[federation\nsites = 3\n')
    (folder / "unknown_key.toml").write_text("[federation]\nsitez = 3\n")
    (folder / "unknown_top.toml").write_text("rounds = 3\n")
    (folder / "bad_delta.toml").write_text("[privacy]\ntarget-delta = 2.0\n")
    (folder / "wrong_type.toml").write_text('[federation]\nrounds = "five"\n')
    (folder / "two_bad.toml").write_text(
        "[federation]\nrounds = 0\n[privacy]\ntarget-delta = 2.0\n"
    )
    (folder / "a_file").write_text("not a folder\n")
    (folder / "a_dir").mkdir()
    (folder / "a_dir.toml").mkdir()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioned federation (CA, server kit, two site kits), shared by the cases."""
    return provision_federation(
        name="table",
        server_address="127.0.0.1:9092",
        sites=SITES,
        out=tmp_path_factory.mktemp("federation") / "fed",
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a simulation, a coordinator or a site fails the test."""

    def started(*_: Any, **__: Any) -> None:
        raise AssertionError("a bad-input case got as far as starting processes")

    monkeypatch.setattr("fedvault.simulations.runner.simulate", started)
    monkeypatch.setattr("fedvault.server.deploy.start_coordinator", started)
    monkeypatch.setattr("fedvault.client.deploy.start_site", started)


# Each case: the command line ({tmp}: the test's folder, {fed}: a provisioned federation,
# {port}: a busy port), the error class whose exit code is expected, the facts the error line
# must state, and a fact the hint must state.
C, D, F, P = ConfigError, DataError, FederationError, ProvisioningError
SIM = ("simulate", "--out", "{tmp}/run")
CLIENT = ("client", "start", "--kit", "{fed}/sites/clinic-a", "--data", "{tmp}/good.csv")
ADD = ("provision", "add-site", "--out")
PROVISION = ("provision", "--name", "demo", "--server-address", "127.0.0.1:9092")
CASES = [
    # --- simulate: data ------------------------------------------------------------------
    ("unknown-dataset", [*SIM, "--dataset", "imagenet"], D,
     ["'imagenet'", *DATASETS, "csv:PATH"], "hint:"),
    ("missing-file", [*SIM, "--dataset", "csv:{tmp}/absent.csv", "--label-column", "outcome"],
     D, ["not found", "{tmp}/absent.csv"], "Check the path (a relative path starts from"),
    ("missing-file-near-a-real-one",
     [*SIM, "--dataset", "csv:{tmp}/god.csv", "--label-column", "outcome"], D,
     ["data file not found: {tmp}/god.csv"], "Did you mean {tmp}/good.csv?"),
    ("csv-without-label-column", [*SIM, "--dataset", "csv:{tmp}/good.csv"], C,
     ["csv:{tmp}/good.csv", "needs a label column"], "--label-column"),
    ("missing-label-column",
     [*SIM, "--dataset", "csv:{tmp}/good.csv", "--label-column", "diagnosis"], D,
     ["'diagnosis'", "not found", "available columns: age, bmi, outcome"],
     "Pass --label-column with the column that holds each row's class: one of age, bmi, "
     "outcome."),
    ("label-column-in-the-wrong-case",
     [*SIM, "--dataset", "csv:{tmp}/good.csv", "--label-column", "Outcome"], D,
     ["label column 'Outcome' not found"], "Did you mean --label-column outcome?"),
    ("non-numeric-feature",
     [*SIM, "--dataset", "csv:{tmp}/non_numeric.csv", "--label-column", "outcome"], D,
     ["{tmp}/non_numeric.csv, line 6: column 'bmi' has non-numeric value 'abc'"],
     "Feature columns must hold numbers"),
    ("every-row-problem-at-once",
     [*SIM, "--dataset", "csv:{tmp}/many_problems.csv", "--label-column", "outcome"], D,
     ["{tmp}/many_problems.csv has 5 problems",
      "column 'bmi' has non-numeric values on 2 lines (line 6 'abc', line 8 'n/a')",
      "line 10: column 'age' is empty (missing value)",
      "line 12: column 'bmi' has non-finite value 'inf'",
      "line 14: expected 3 values (one per header column), got 4"],
     "Feature columns must hold numbers"),
    ("header-problems-at-once",
     [*SIM, "--dataset", "csv:{tmp}/bad_header.csv", "--label-column", "diagnosis"], D,
     ["header column 3 has no name", "header repeats column names: age",
      "label column 'diagnosis' not found"], "Give every column a name"),
    ("empty-csv", [*SIM, "--dataset", "csv:{tmp}/empty.csv", "--label-column", "outcome"], D,
     ["{tmp}/empty.csv", "no data rows (it is empty)"], "Export the table again"),
    ("header-only-csv",
     [*SIM, "--dataset", "csv:{tmp}/header_only.csv", "--label-column", "outcome"], D,
     ["{tmp}/header_only.csv", "no data rows (only a header)"],
     "Add the data rows below the header"),
    ("semicolon-csv",
     [*SIM, "--dataset", "csv:{tmp}/semicolon.csv", "--label-column", "outcome"], D,
     ["{tmp}/semicolon.csv", "delimiter looks like ';'", "comma-separated"], "comma-separated"),
    ("tab-csv", [*SIM, "--dataset", "csv:{tmp}/tab.csv", "--label-column", "outcome"], D,
     ["delimiter looks like tab"], "comma-separated"),
    ("ragged-csv", [*SIM, "--dataset", "csv:{tmp}/ragged.csv", "--label-column", "outcome"], D,
     ["{tmp}/ragged.csv", f"line {GOOD_ROWS + 2}", "expected 3 values", "got 4"],
     "quote a value that holds a comma"),
    ("one-class-csv",
     [*SIM, "--dataset", "csv:{tmp}/one_class.csv", "--label-column", "outcome"], D,
     ["'outcome'", "only one class"], "names the class column (the others are: age, bmi)"),
    ("duplicate-header",
     [*SIM, "--dataset", "csv:{tmp}/dup_header.csv", "--label-column", "outcome"], D,
     ["repeats column names: age"], "Rename the repeated columns"),
    ("not-utf8", [*SIM, "--dataset", "csv:{tmp}/latin1.csv", "--label-column", "outcome"], D,
     ["{tmp}/latin1.csv", "not UTF-8"], "Save the file as UTF-8"),
    ("csv-is-a-directory",
     [*SIM, "--dataset", "csv:{tmp}/a_dir", "--label-column", "outcome"], D,
     ["is a directory", "{tmp}/a_dir"], "this folder holds no .csv file"),
    ("csv-is-a-directory-of-csvs",
     [*SIM, "--dataset", "csv:{tmp}/csv_dir", "--label-column", "outcome"], D,
     ["is a directory", "{tmp}/csv_dir"], "Give one CSV file inside it (it holds a.csv, b.csv)"),
    ("delta-too-large-for-the-sites-rows",
     [*SIM, "--dataset", "csv:{tmp}/good.csv", "--label-column", "outcome", "--sites", "2",
      "--delta", "0.1"], D,
     ["δ = 0.1 is too large for the training rows of 2 sites (site-1: 16, site-2: 16)",
      "it must be below 1/16 = 0.0625"], "use a smaller --delta"),
    ("too-few-rows-for-one-site",
     [*SIM, "--dataset", "csv:{tmp}/tiny.csv", "--label-column", "outcome", "--sites", "1"], D,
     ["3 rows", "too small for even one site"], "at least 10 rows per site"),
    ("more-sites-than-rows", [*SIM, "--dataset", "breast-cancer", "--sites", "100"], D,
     ["cannot split", "569 rows", "100 sites"], "Use at most 56 sites (--sites) for 569 rows"),
    # --- simulate: settings ------------------------------------------------------------------
    ("epsilon-zero", [*SIM, "--epsilon", "0"], C, ["--epsilon must be > 0, got 0"],
     "Give --epsilon a value > 0 (default 1)."),
    ("epsilon-negative", [*SIM, "--epsilon", "-1"], C, ["--epsilon must be > 0, got -1"],
     "Give --epsilon a value > 0"),
    ("epsilon-meaningless", [*SIM, "--epsilon", "1000"], C,
     ["must be <= 50", "got 1000", "--epsilon"], "--no-dp"),
    ("delta-flag-out-of-range", [*SIM, "--delta", "2"], C,
     ["--delta must be in (0, 1), got 2"], "Give --delta a value in (0, 1) (default 1e-05)."),
    ("delta-toml-out-of-range", ["simulate", "{tmp}/bad_delta.toml", "--out", "{tmp}/run"], C,
     ["[privacy] target-delta must be in (0, 1), got 2"],
     "Set target-delta in the [privacy] table of the scenario file to a value in (0, 1)"),
    ("noise-negative", [*SIM, "--noise-multiplier", "-1"], C,
     ["--noise-multiplier must be > 0, got -1"], "Give --noise-multiplier a value > 0"),
    ("epsilon-with-no-dp", [*SIM, "--epsilon", "1", "--no-dp"], C,
     ["only one of --epsilon, --noise-multiplier, --no-dp", "--epsilon and --no-dp"], "hint:"),
    ("epsilon-with-noise", [*SIM, "--epsilon", "1", "--noise-multiplier", "1"], C,
     ["--epsilon and --noise-multiplier"], "hint:"),
    ("central-dp-both-ways", [*SIM, "--central-dp", "--no-central-dp"], C,
     ["only one of --central-dp and --no-central-dp"], "Drop one"),
    ("zero-sites", [*SIM, "--sites", "0"], C, ["--sites must be >= 1, got 0"],
     "Give --sites a value >= 1 (default 3)."),
    ("zero-rounds", [*SIM, "--rounds", "0"], C, ["--rounds must be >= 1, got 0"],
     "Give --rounds a value >= 1"),
    ("min-sites-above-sites", [*SIM, "--min-sites", "9"], C,
     ["--min-sites must be <= the number of sites (3), got 9"], "at most 3 here"),
    ("unknown-strategy", [*SIM, "--strategy", "fedbest"], C,
     ["unknown --strategy 'fedbest'; choose one of: fedavg", "krum"],
     "Give --strategy a value among fedavg"),
    ("misspelt-strategy", [*SIM, "--strategy", "fedavgg"], C, ["unknown --strategy 'fedavgg'"],
     "Did you mean 'fedavg'?"),
    ("unknown-partition", [*SIM, "--partition", "random"], C,
     ["unknown --partition 'random'; choose one of: iid, dirichlet"], "Give --partition"),
    ("unknown-model", [*SIM, "--model", "transformer"], C,
     ["unknown --model 'transformer'; choose one of: auto, logistic, mlp, cnn"],
     "Give --model a value among"),
    ("alpha-negative", [*SIM, "--partition", "dirichlet", "--alpha", "-1"], C,
     ["--alpha must be > 0, got -1"], "Give --alpha a value > 0 (default 0.5)."),
    ("site-max-epsilon-not-a-number", [*SIM, "--site-max-epsilon", "lots"], C,
     ["--site-max-epsilon must be > 0, got 'lots'"], "--site-max-epsilon 3"),
    ("site-max-epsilon-unknown-site", [*SIM, "--site-max-epsilon", "nowhere=1"], C,
     ["--site-max-epsilon names site 'nowhere'"], "hospital-a"),
    # --- simulate: files and folders ---------------------------------------------------------
    ("unknown-scenario", ["simulate", "atlantis", "--out", "{tmp}/run"], C,
     ["unknown scenario 'atlantis'", "hospitals", "banks", "fashion-mnist"], "hint:"),
    ("malformed-scenario", ["simulate", "{tmp}/broken.toml", "--out", "{tmp}/run"], C,
     ["{tmp}/broken.toml", "not valid TOML", "(at line 1, column 15)"],
     "Fix the TOML at the line and column shown"),
    ("missing-scenario", ["simulate", "{tmp}/absent.toml", "--out", "{tmp}/run"], C,
     ["scenario file not found", "{tmp}/absent.toml"], "hint:"),
    ("scenario-is-a-directory", ["simulate", "{tmp}/a_dir", "--out", "{tmp}/run"], C,
     ["{tmp}/a_dir is a directory"], ".toml"),
    ("toml-scenario-is-a-directory", ["simulate", "{tmp}/a_dir.toml", "--out", "{tmp}/run"], C,
     ["{tmp}/a_dir.toml is a directory"], ".toml"),
    ("unknown-key-names-its-section", ["simulate", "{tmp}/unknown_key.toml", "--out", "{tmp}/run"],
     C, ["unknown setting 'sitez' in [federation]", "known: sites"], "Did you mean 'sites'?"),
    ("unknown-top-level-key", ["simulate", "{tmp}/unknown_top.toml", "--out", "{tmp}/run"], C,
     ["unknown setting 'rounds' in the top level"], "rounds goes in the [federation] table"),
    ("wrong-type-in-toml", ["simulate", "{tmp}/wrong_type.toml", "--out", "{tmp}/run"], C,
     ["[federation] rounds must be an integer, got 'five'"],
     "Set rounds in the [federation] table of the scenario file"),
    ("every-bad-setting-at-once",
     ["simulate", "{tmp}/two_bad.toml", "--sites", "0", "--out", "{tmp}/run"], C,
     ["3 settings are invalid: --sites must be >= 1, got 0; [federation] rounds must be >= 1, "
      "got 0; [privacy] target-delta must be in (0, 1), got 2"],
     "Give --sites a value >= 1 (default 3). Set rounds in the [federation] table"),
    ("out-is-a-file", ["simulate", "--out", "{tmp}/a_file"], C,
     ["--out {tmp}/a_file is a file, not a folder"], "--out"),
    ("out-inside-a-file", ["simulate", "--out", "{tmp}/a_file/run"], C,
     ["--out {tmp}/a_file/run: {tmp}/a_file is a file"], "--out"),
    ("out-not-empty", ["simulate", "--out", "{tmp}"], C,
     ["run directory {tmp} already exists and is not empty"], "another --out"),
    ("ledger-dir-is-a-file", [*SIM, "--ledger-dir", "{tmp}/a_file"], C,
     ["--ledger-dir {tmp}/a_file is a file, not a folder"], "--ledger-dir"),
    ("resume-not-a-run", ["simulate", "--resume", "{tmp}/a_dir"], C,
     ["{tmp}/a_dir is not a fedvault run directory"], "--out"),
    ("resume-with-settings", ["simulate", "--resume", "{tmp}/a_dir", "--rounds", "3"], C,
     ["--resume continues"], "Drop them"),
    # --- client start ----------------------------------------------------------------------
    ("client-max-epsilon-negative", [*CLIENT, "--max-epsilon", "-1"], C,
     ["--max-epsilon must be > 0, got -1"], "fedvault client start --help"),
    ("client-delta-zero", [*CLIENT, "--delta", "0"], C,
     ["--delta must be in (0, 1), got 0"], "fedvault client start --help"),
    ("client-delta-one", [*CLIENT, "--delta", "1"], C,
     ["--delta must be in (0, 1), got 1"], "fedvault client start --help"),
    ("client-threads-negative", [*CLIENT, "--threads", "-2"], C,
     ["--threads must be >= 0, got -2"], "fedvault client start --help"),
    ("client-rounds-cap-zero", [*CLIENT, "--max-rounds-per-run", "0"], C,
     ["--max-rounds-per-run must be >= 1, got 0"], "fedvault client start --help"),
    ("client-evaluations-cap-zero", [*CLIENT, "--max-evaluations-per-run", "0"], C,
     ["--max-evaluations-per-run must be > 0, got 0"], "fedvault client start --help"),
    ("client-unknown-accountant", [*CLIENT, "--accountant", "gdp"], C,
     ["--accountant must be prv or rdp, got 'gdp'"], "fedvault client start --help"),
    ("client-kit-missing",
     ["client", "start", "--kit", "{tmp}/no-kit", "--data", "{tmp}/good.csv"], P,
     ["{tmp}/no-kit"], "hint:"),
    ("client-given-the-server-kit",
     ["client", "start", "--kit", "{fed}/server", "--data", "{tmp}/good.csv"], P,
     ["{fed}/server"], "hint:"),
    # --- client budget ---------------------------------------------------------------------
    ("budget-kit-and-ledger", ["client", "budget", "--kit", "{tmp}", "--ledger", "{tmp}/l"], C,
     ["give exactly one of --kit and --ledger, got both"], "hint:"),
    ("budget-neither", ["client", "budget"], C,
     ["give exactly one of --kit and --ledger, got neither"], "hint:"),
    ("budget-data-without-verify", ["client", "budget", "--data", "{tmp}/good.csv"], C,
     ["--data and --label-column go with --verify"], "--verify"),
    # --- server start and run ----------------------------------------------------------------
    ("server-port-in-use",
     ["server", "start", "--kit", "{fed}/server", "--listen", "127.0.0.1:{port}"], F,
     ["port {port} on 127.0.0.1 is in use by another program"], "--listen"),
    ("server-kit-missing", ["server", "start", "--kit", "{tmp}/no-kit"], P, ["{tmp}/no-kit"],
     "hint:"),
    ("server-given-a-site-kit", ["server", "start", "--kit", "{fed}/sites/clinic-a"], P,
     ["{fed}/sites/clinic-a"], "hint:"),
    ("server-listen-malformed", ["server", "start", "--kit", "{fed}/server", "--listen", "x"],
     P, ["'x'"], "--listen"),
    ("run-kit-missing", ["run", "--kit", "{tmp}/no-kit"], P, ["{tmp}/no-kit"], "hint:"),
    ("run-more-sites-than-provisioned", ["run", "--kit", "{fed}/server", "--sites", "3"], C,
     ["--sites must be in [1, 2] (the provisioned sites), got 3"], "from 1 to 2"),
    ("run-bad-flag-named-before-the-coordinator-is-asked",
     ["run", "--kit", "{fed}/server", "--epsilon", "0"], C, ["--epsilon must be > 0, got 0"],
     "Give --epsilon a value > 0"),
    ("run-scenario-bad-delta", ["run", "--kit", "{fed}/server", "{tmp}/bad_delta.toml"], C,
     ["[privacy] target-delta must be in (0, 1), got 2"],
     "Set target-delta in the [privacy] table of the scenario file"),
    ("run-without-coordinator", ["run", "--kit", "{fed}/server"], F,
     ["no running coordinator for the kit at {fed}/server"], "hint:"),
    # --- provision ---------------------------------------------------------------------------
    ("provision-bad-name",
     ["provision", "--name", "bad name!", "--server-address", "127.0.0.1:9092", "--sites", "a",
      "--out", "{tmp}/fed"], P, ["'bad name!'"], "hint:"),
    ("provision-bad-address",
     ["provision", "--name", "demo", "--server-address", "nowhere", "--sites", "a", "--out",
      "{tmp}/fed"], P, ["'nowhere'"], "hint:"),
    ("provision-duplicate-sites", [*PROVISION, "--sites", "a,a", "--out", "{tmp}/fed"], P,
     ["'a'"], "hint:"),
    ("provision-validity-zero",
     [*PROVISION, "--sites", "a", "--out", "{tmp}/fed", "--validity-days", "0"], P,
     ["validity days must be between 1 and 3650, got 0"], "hint:"),
    ("provision-existing-federation", [*PROVISION, "--sites", "a", "--out", "{fed}"], P,
     ["{fed}"], "--force"),
    ("add-site-no-federation", [*ADD, "{tmp}/a_dir", "--site", "new"], P, ["{tmp}/a_dir"],
     "hint:"),
    ("add-site-existing", [*ADD, "{fed}", "--site", "clinic-a"], P, ["'clinic-a'"], "hint:"),
    ("revoke-unknown-site", ["provision", "revoke-site", "--out", "{fed}", "--site", "nobody"],
     P, ["'nobody'"], "hint:"),
]  # fmt: skip


def fill(text: str, tmp: Path, fed: Path, port: int) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{fed}", str(fed)).replace("{port}", str(port))


def test_the_table_has_at_least_fifty_cases_across_commands() -> None:
    commands = {" ".join(w for w in args[:2] if not w.startswith("-")) for _, args, *_ in CASES}
    assert len(CASES) >= 50
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)
    assert {"simulate", "client start", "client budget", "server start", "run"} <= {
        c if c.split()[0] != "simulate" else "simulate" for c in commands
    }


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize(("args", "error", "facts", "hint"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_gets_one_line_naming_the_cause_a_hint_and_its_exit_code(
    tmp_path: Path,
    federation: Path,
    busy_port: int,
    fedvault_cli: Callable[..., CliResult],
    args: list[str],
    error: type[FedvaultError],
    facts: list[str],
    hint: str,
) -> None:
    # Prepare
    write_inputs(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    fed_before = sorted(federation.rglob("*"))

    # Execute
    result = fedvault_cli(*(fill(arg, tmp_path, federation, busy_port) for arg in args))

    # Assert
    assert result.code == error.exit_code, result.err
    assert len(result.err_lines) == 2, f"expected an error line and a hint, got:\n{result.err}"
    error_line, hint_line = result.err_lines
    assert error_line.startswith("error: ")
    for fact in facts:
        assert fill(fact, tmp_path, federation, busy_port) in error_line
    assert hint_line.startswith("hint: ") and len(hint_line) > len("hint: ")
    assert fill(hint, tmp_path, federation, busy_port) in hint_line
    assert "Traceback" not in result.out + result.err
    assert "internal error" not in result.err
    assert result.out == ""  # a banner is printed only once input is accepted
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert sorted(federation.rglob("*")) == fed_before


def test_good_csv_the_bad_cases_derive_from_is_accepted(tmp_path: Path) -> None:
    # Prepare
    write_inputs(tmp_path)

    # Execute
    dataset = load_dataset(f"csv:{tmp_path / 'good.csv'}", label_column="outcome")

    # Assert
    assert len(dataset) == GOOD_ROWS
    assert dataset.feature_shape == (2,)
    assert dataset.num_classes == 2


@pytest.mark.parametrize(
    "flags",
    [["--dataset", "breast-cancer", "--sites", "100"], ["--dataset", "imagenet"]],
    ids=["more-sites-than-rows", "unknown-dataset"],
)
@pytest.mark.usefixtures("nothing_starts")
def test_hint_does_not_send_user_to_a_data_file_they_did_not_give(
    tmp_path: Path, fedvault_cli: Callable[..., CliResult], flags: list[str]
) -> None:
    # Execute
    result = fedvault_cli("simulate", *flags, "--out", str(tmp_path / "run"))

    # Assert
    assert result.code == DataError.exit_code
    assert result.err_lines[-1].startswith("hint:")
    assert "data file" not in result.err_lines[-1]


USAGE_CASES = [
    ("not-a-number", ["simulate", "--sites", "notanumber"], ["--sites", "notanumber"]),
    ("unknown-option", ["simulate", "--epsilonn", "1"], ["--epsilonn"]),
    ("unknown-command", ["simulat"], ["simulat"]),
    ("server-start-without-kit", ["server", "start"], ["--kit"]),
    ("client-start-without-data", ["client", "start", "--kit", "k"], ["--data"]),
    ("provision-missing-options", ["provision", "--name", "demo"], ["--server-address"]),
]


@pytest.mark.usefixtures("nothing_starts")
@pytest.mark.parametrize(("args", "facts"), [c[1:] for c in USAGE_CASES],
                         ids=[c[0] for c in USAGE_CASES])  # fmt: skip
def test_bad_command_line_exits_2_naming_the_option(
    tmp_path: Path, fedvault_cli: Callable[..., CliResult], args: list[str], facts: list[str]
) -> None:
    # Execute
    result = fedvault_cli(*args)

    # Assert
    assert result.code == EXIT_USAGE, result.err
    for fact in facts:
        assert fact in result.err
    assert "Traceback" not in result.out + result.err
    assert list(tmp_path.iterdir()) == []
