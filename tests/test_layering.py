"""``torchstep.objectives``, ``torchstep.peft`` and ``torchstep.distributed`` depend on torch (and at most
``torchstep.ops`` / ``partition``);
``optim`` never imports them."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "torchstep"


def _torchstep_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = path.parent.relative_to(ROOT).parts[: len(path.parent.relative_to(ROOT).parts) - node.level + 1]
            out.add(".".join((*base, *(node.module or "").split("."))).strip("."))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out |= {n.split(".", 1)[1] for n in names if n.startswith("torchstep.")}
    return out


def test_objectives_import_only_ops_and_partition_and_optim_never_imports_them():
    for f in (ROOT / "objectives").glob("*.py"):
        bad = {m for m in _torchstep_imports(f) if not m.startswith(("objectives", "ops", "partition"))}
        assert not bad, (f.name, bad)
    for f in (ROOT / "optim").glob("*.py"):
        assert not {m for m in _torchstep_imports(f) if m.startswith("objectives")}, f.name


def test_peft_imports_only_ops_and_partition_and_optim_never_imports_it():
    for f in (ROOT / "peft").glob("*.py"):
        bad = {m for m in _torchstep_imports(f) if not m.startswith(("peft", "ops", "partition"))}
        assert not bad, (f.name, bad)
    for f in (ROOT / "optim").glob("*.py"):
        assert not {m for m in _torchstep_imports(f) if m.startswith("peft")}, f.name


def test_distributed_imports_only_ops_and_partition_and_optim_never_imports_it():
    for f in (ROOT / "distributed").glob("*.py"):
        bad = {m for m in _torchstep_imports(f) if not m.startswith(("distributed", "ops", "partition"))}
        assert not bad, (f.name, bad)
    for f in (ROOT / "optim").glob("*.py"):
        assert not {m for m in _torchstep_imports(f) if m.startswith("distributed")}, f.name
