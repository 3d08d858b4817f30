"""fwray's layering, read from its source by folder, and the pure core run without ray or mlflow.

- The core (fwray/core/) imports only itself, fwray.config and fwray.errors, and never ray or mlflow: GPU benchmarks
  run it on a machine with torch alone. So does fwray/storage/ (local paths and object storage through pyarrow.fs),
  which the driver, the tokenizer tasks and the training workers all use.
- Nothing imports a command (a module on top of the package other than the shared ones, or a __main__.py).
- No import cycle between modules, nor between the stage folders; imports inside functions count.
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("config", "errors")  # what every stage, the core included, may import
SHARED_ON_TOP = (*SHARED, "ray_session", "__init__")  # the modules on top that are not commands
OUTSIDE_THE_CORE = ("ray", "mlflow")
BASE_FOLDERS = ("core", "storage")  # folders held to the core's rule
# modules outside the core that must import without ray or mlflow too: bench/gpu_check.py runs the probe's trial on
# a torch-only GPU machine, and the commands below read saved models without Ray
ALSO_PURE = ["probe.trial", "probe.verdict", "plan.figures", "plan.scaling", "plan.family", "plan.planner",
             "data.report", "data.size", "sample", "eval", "export", "storage.uri", "storage.check",
             "storage.node_cache"]


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: the package's modules it imports}, {module: the outside packages it imports}) for every .py under
    `package`, from every import statement, those inside functions included."""
    name = package.name
    files = {_module(path, package): path for path in package.rglob("*.py")}
    inside, outside = {}, {}
    for module, path in files.items():
        here = module.rpartition(".")[0]
        inside[module], outside[module] = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
                targets = [f"{base}.{a.name}" if _known(f"{base}.{a.name}", files) else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != name:
                    outside[module].add(target.split(".")[0])
                    continue
                while not _known(target, files):  # `from fwray.core.model import GPT`: the module
                    target = target.rpartition(".")[0]
                target = target if target in files else f"{target}.__init__"
                if target != module:
                    inside[module].add(target)
    return inside, outside


def _module(path: Path, package: Path) -> str:
    """fwray/core/model.py -> fwray.core.model; fwray/core/__init__.py -> fwray.core.__init__."""
    return ".".join((package.name, *path.relative_to(package).with_suffix("").parts))


def _known(name: str, files: dict) -> bool:
    return name in files or f"{name}.__init__" in files


def folder(module: str) -> str | None:
    """The stage folder a module sits in (fwray.core.engine -> core); None for the modules on top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def is_command(module: str) -> bool:
    parts = module.split(".")
    return parts[-1] == "__main__" or (len(parts) == 2 and parts[1] not in SHARED_ON_TOP)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layering_problems(package: Path) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    name = package.name
    inside, outside = import_graph(package)
    problems = []
    allowed = {f"{name}.{m}" for m in SHARED}
    for module in sorted(inside):
        here = folder(module)
        if here in BASE_FOLDERS:
            for target in sorted(inside[module]):
                if folder(target) != here and target not in allowed:
                    problems.append(f"{module} ({here}) imports {target}")
            for target in sorted(outside[module] & set(OUTSIDE_THE_CORE)):
                problems.append(f"{module} ({here}) imports {target}")
        for target in sorted(inside[module]):
            if is_command(target):
                problems.append(f"{module} imports the command {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(inside)]
    folders = {}
    for module, targets in inside.items():
        for target in targets:
            if folder(module) and folder(target) and folder(module) != folder(target):
                folders.setdefault(folder(module), set()).add(folder(target))
    problems += [f"the folders import each other: {' -> '.join(c)}" for c in cycles(folders)]
    return problems


def test_layering_by_folder():
    assert layering_problems(ROOT / "fwray") == []


def test_layering_check_sees_each_broken_rule(tmp_path):
    """The check reads what it claims to: a core module reaching a stage and ray (inside a function), a module
    importing a command, a cycle through a function-level import, storage reaching the core and mlflow, two folders
    importing each other."""
    pkg = tmp_path / "fwray"
    files = {
        "__init__.py": "", "config.py": "", "errors.py": "", "run.py": "",
        "core/__init__.py": "", "core/model.py": "from ..errors import E\nfrom . import layers\n",
        "core/layers.py": "def f():\n    import ray\n    from ..data import prep\n",
        "data/__init__.py": "", "data/prep.py": "from .. import run\nfrom ..track import store\n",
        "track/__init__.py": "", "track/store.py": "def g():\n    from ..data.prep import x\n",
        "probe/__init__.py": "", "probe/__main__.py": "", "probe/sweep.py": "from . import __main__\n",
        "storage/__init__.py": "", "storage/uri.py": "from ..config import X\nfrom ..core import model\nimport mlflow\n",
    }
    for path, text in files.items():
        (pkg / path).parent.mkdir(parents=True, exist_ok=True)
        (pkg / path).write_text(text)
    assert layering_problems(pkg) == [
        "fwray.core.layers (core) imports fwray.data.prep",
        "fwray.core.layers (core) imports ray",
        "fwray.data.prep imports the command fwray.run",
        "fwray.probe.sweep imports the command fwray.probe.__main__",
        "fwray.storage.uri (storage) imports fwray.core.model",
        "fwray.storage.uri (storage) imports mlflow",
        "import cycle: fwray.data.prep -> fwray.track.store",
        "the folders import each other: data -> track",
    ]


SCRIPT = textwrap.dedent("""
    import importlib, sys, tempfile
    from pathlib import Path
    # None in sys.modules: every `import ray...` raises ImportError. psutil and nvidia-ml-py (pynvml) are fwray
    # dependencies that a machine with torch alone lacks too
    for name in ("ray", "mlflow", "psutil", "pynvml"):
        sys.modules[name] = None
    try:
        import ray  # noqa: F401
        raise SystemExit("the guard does not work: ray imported")
    except ImportError:
        pass

    modules = %(modules)r
    for m in modules:
        importlib.import_module("fwray." + m)

    import numpy as np
    import torch
    from fwray import config
    from fwray.core.engine import train
    from fwray.core.loader import Batches

    model = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    train_config = config.TrainConfig(batch_size=2, max_iters=3, eval_interval=3, eval_iters=1, log_interval=1,
                                      compile=False)
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 2_000, dtype=np.uint16).tofile(folder / f"{split}.bin")
    batches = Batches.from_files([folder / "train.bin"], [folder / "val.bin"], 16, batch_size=2, seed=0)
    seen = []
    summary = train(model, train_config, batches, lambda step, metrics, state: seen.append(step),
                    device=torch.device("cpu"))
    assert seen == [0, 1, 2, 3, 3], seen
    assert summary["steps"] == 3 and summary["final_val_loss"] > 0
    from fwray.core.health import HealthSampler
    assert HealthSampler(torch.device("cpu")).sample() == {}  # no psutil: no figures, and no error
    loaded = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in ("ray", "mlflow"))
    assert not loaded, loaded
    print("PURE-OK", " ".join(modules))
""")


def test_pure_core_without_ray_or_mlflow():
    core = sorted(m.removeprefix("fwray.").removesuffix(".__init__") for m in import_graph(ROOT / "fwray")[0]
                  if folder(m) == "core")
    modules = [*SHARED, *core, *ALSO_PURE]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"modules": modules}], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PURE-OK" in proc.stdout


def test_boundary_modules_do_need_ray():
    """The guard is real: a boundary module fails to import under it (so the pure test can fail)."""
    script = "import sys\nsys.modules['ray'] = None\nimport fwray.train.trainer\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr
