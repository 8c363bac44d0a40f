"""CLI and documentation claims that must follow the registry."""
import pathlib
import subprocess
import sys

import torch

from torchstep import cli
from torchstep.registry import SPECS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_optimizer_table_is_the_cli_output():
    table = cli.markdown_table(cli.LIST_HEADER, cli.list_rows())
    assert table in (ROOT / "README.md").read_text()


def test_list_command_names_every_optimizer(capsys):
    cli.main(["list"])
    out = capsys.readouterr().out
    for spec in SPECS.values():
        assert spec.name in out and spec.arxiv in out


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(["awk", '/^Run the whole test suite:/{found=1} found && /^python3 -m venv/{print; exit}',
                          str(ROOT / "README.md")], capture_output=True, text=True).stdout.strip()
    assert out.endswith("python -m pytest -n 2 --dist loadgroup") and "torch==2.13.0" in out
    assert "eval \"$cmd\"" in (ROOT / ".ci" / "run").read_text()


def test_speed_benchmark_runs_and_reports_ratios():
    from torchstep.bench import speed
    times = speed.measure(["lion"], rounds=1, steps=1)
    assert {"torch AdamW (for-loop)", "torch AdamW (fused)", "torchstep lion"} <= set(times)
    rows = {r[0]: r for r in speed.table(times)}
    assert float(rows["torch AdamW (for-loop)"][2]) == 1.0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "torchstep.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout


def test_every_public_optimizer_class_documents_each_argument():
    import inspect

    import torchstep.optim as optim
    missing = {}
    for name in optim.__all__:
        cls = getattr(optim, name)
        doc = inspect.getdoc(cls) or ""
        if "Args:" not in doc:
            missing[name] = ["(no Args section)"]
            continue
        args = doc.split("Args:", 1)[1]
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        undocumented = [p.name for p in params if p.name not in args]
        if undocumented:
            missing[name] = undocumented
    assert not missing, missing


def test_fixtures_and_benchmark_settings_cover_exactly_the_registry():
    from fixtures import FIXTURES

    from torchstep.bench.arms import ARMS, BENCH
    assert set(FIXTURES) == set(SPECS)
    assert set(BENCH) == set(SPECS) and set(SPECS) <= set(ARMS)


def test_compiled_speed_table_ratios_and_traffic_floor():
    """The compiled table's arithmetic on given times (no compile): ratios to fused AdamW from the same run,
    the traffic floor (+1 pass for the checked policies), the peer ratio on equal semantics, the payoff."""
    from torchstep.bench import speed
    times = {"torch AdamW (fused)": [4.0], "torch AdamW (compiled)": [8.0], "torchstep adamp": [30.0],
             "torchstep adamp (compiled)": [20.0], "torchstep adamp (compiled, nonfinite=ignore)": [16.0],
             "pytorch-optimizer adamp": [32.0]}
    first = {k: 0.5 for k in times} | {"torchstep adamp (compiled)": 10.5}
    rows = {r[0]: dict(zip(speed.COMPILED_HEADERS, r)) for r in speed.compiled_table(times, first)}
    assert rows["adamp"]["compiled × AdamW fused"] == "5.00"
    assert rows["adamp"]["traffic floor × fused"] == f"{11 / 7:.2f}"          # 10 passes + the skip check
    assert rows["adamp, nonfinite=ignore"]["traffic floor × fused"] == f"{10 / 7:.2f}"
    assert rows["adamp"]["compiled speed-up vs pytorch-optimizer"] == "1.60"
    assert rows["adamp, nonfinite=ignore"]["compiled speed-up vs pytorch-optimizer"] == "2.00"
    assert rows["adamp"]["compile pays off after (steps)"] == "1000"          # 10 s / 10 ms saved
    assert set(speed.MIN_PASSES) == set(speed.compiled_names())              # a floor for every method
