"""The CLI: commands parse, call and print; user errors are one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd.cli import run
from mlsd.data.schema import EVENTS_FILE, QUARANTINE_FILE, DatasetInfo, read_info
from mlsd.data.validate import write_dataset

T0 = 1_600_000_000


def _mlsd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as a user would."""
    exe = Path(sys.executable).with_name("mlsd")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def _dataset(directory: Path) -> Path:
    events = pd.DataFrame(
        {"user_id": [1, 2, 3], "item_id": [7, 8, 7], "ts": [T0, T0 + 1, T0 + 2], "value": 1.0}
    )
    write_dataset(
        directory,
        events=events,
        users=None,
        items=None,
        info=DatasetInfo(name="t", source="test", licence="none"),
    )
    return directory


def test_help_lists_the_data_group() -> None:
    result = _mlsd("--help")
    assert result.returncode == 0
    assert "data" in result.stdout
    data_help = _mlsd("data", "--help")
    for command in ("import", "synth", "validate", "split", "check-leakage"):
        assert command in data_help.stdout


def test_help_keeps_the_config_references_in_brackets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rich markup would read "[service_log]" as a style tag and print ".dir under ..."."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per option: no wrapping inside the text
    for args, text in (
        (["feed", "logs", "--help"], "(default: [service_log].dir under --base-dir)"),
        (["feed", "features", "apply", "--help"], "(default: [feature_store].repo_dir)"),
        (["feed", "serve", "--help"], "Run this [experiments] entry"),
        (["data", "import", "csv", "--help"], "(user, item, timestamp[, value, event])"),
    ):
        assert run(args) == 0
        assert text in capsys.readouterr().out, args


def test_validate_with_bad_rows_exits_zero_and_quarantines(tmp_path: Path) -> None:
    directory = _dataset(tmp_path / "ds")
    table = pq.read_table(directory / EVENTS_FILE).to_pandas()
    polluted = table.iloc[[0, 1, 2, 0]].reset_index(drop=True)
    polluted.loc[3, "value"] = float("nan")
    pq.write_table(pa.Table.from_pandas(polluted, preserve_index=False), directory / EVENTS_FILE)

    code = run(["data", "validate", str(directory)])

    assert code == 0
    quarantine = pq.read_table(directory / QUARANTINE_FILE).to_pandas()
    assert quarantine["reason"].tolist() == ["bad_value"]
    assert read_info(directory).n_events == 3


def test_import_csv_prints_where_the_quarantined_rows_were(tmp_path: Path) -> None:
    events = tmp_path / "clicks.csv"
    events.write_text(f"u,i,t\n1,2,{T0}\n\n3,4,later\n")

    result = _mlsd(
        "data", "import", "csv", "--events", str(events), "--user-col", "u", "--item-col", "i",
        "--ts-col", "t", "--out", str(tmp_path / "out"),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "out" / QUARANTINE_FILE) in result.stdout.replace("\n", "")
    assert "clicks.csv, line 4: bad_ts" in result.stdout


def test_unreadable_file_is_one_line_and_nonzero(tmp_path: Path) -> None:
    directory = _dataset(tmp_path / "ds")
    (directory / EVENTS_FILE).write_bytes(b"\x00garbage")

    result = _mlsd("data", "validate", str(directory))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "events.parquet" in lines[0]
    assert "cannot be read as Parquet" in lines[0]


def test_missing_directory_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["data", "validate", str(tmp_path / "nope")])
    assert code == 1
    assert "events.parquet: not found" in capsys.readouterr().err


def test_an_error_keeps_its_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Error text is printed as text: a config error's ``[section]`` is not a Rich style tag."""
    config = tmp_path / "feed.toml"
    config.write_text("[retrieval]\nbogus = 1\n")
    code = run(["feed", "retrieve-eval", "--dataset", str(tmp_path), "--config", str(config)])
    assert code == 1
    assert "[retrieval] has unknown key(s) bogus" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "import", "csv", "--bogus"], "No such option: --bogus"),
        (["data", "import", "csv", "--out", "x"], "Missing option '--events'"),
        (["feed", "serve", "--dataset", ".", "--port", "many"], "Invalid value for '--port'"),
    ],
)
def test_a_usage_mistake_gets_the_usage_and_exit_2_not_an_internal_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Usage: mlsd" in err
    assert "internal error" not in err


FEAST_IN_THE_COMMAND = """
import sys
import mlsd.cli
import mlsd.systems.feed.registry_commands as commands
opened = commands.existing_registry
def importing_feast(*args):
    import feast.feature_view
    return opened(*args)
commands.existing_registry = importing_feast
sys.exit(mlsd.cli.run(sys.argv[1:]))
"""


@pytest.mark.slow  # two CLI processes importing Feast and MLflow
def test_mlflows_noload_deprecation_is_not_printed_even_after_feast_is_imported(
    tmp_path: Path,
) -> None:
    """Feast shows every DeprecationWarning once when imported (train and serve import it);
    MLflow's SQL store then warns about SQLAlchemy's ``noload`` on import."""
    from mlsd.serving.registry import ModelRegistry, RegistryConfig

    ModelRegistry(RegistryConfig(), tmp_path).versions()  # an empty registry to read
    for code in (
        "import feast.feature_view\nfrom mlsd.cli import main\nmain()",  # feast before the CLI
        # feast imported by the command, after the CLI started and before the registry opens
        FEAST_IN_THE_COMMAND,
    ):
        done = subprocess.run(
            [sys.executable, "-c", code, "feed", "versions", "--base-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "no versions of 'mlsd-feed'" in done.stdout
        assert "noload" not in done.stderr
        assert "Warning" not in done.stderr


def test_only_that_warning_is_filtered() -> None:
    import warnings

    from mlsd.serving.registry import quiet_mlflow_warnings

    noload = "The ``noload`` loader strategy is deprecated and will be removed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("once", DeprecationWarning)  # what importing Feast does
        quiet_mlflow_warnings()
        for message, module in (
            (noload, "mlflow.store.tracking.sqlalchemy_store"),  # hidden
            ("another deprecation", "mlflow.store.tracking.sqlalchemy_store"),
            (noload, "ours"),
        ):
            warnings.warn_explicit(message, DeprecationWarning, "f.py", 1, module=module)
        warnings.warn_explicit(noload, UserWarning, "f.py", 2, module="mlflow.store.x")
    assert [(str(w.message)[:19], w.category) for w in caught] == [
        ("another deprecation", DeprecationWarning),
        ("The ``noload`` load", DeprecationWarning),
        ("The ``noload`` load", UserWarning),
    ]
