"""The package's import graph, read from the source with `ast`: no import circles, and networks that a
pipeline loads do not import the reward stack.

Edges: every `import` / `from ... import` of a `mapo_jax` module anywhere in a file (function-level imports
included: a circle through a lazy import is still a circle). `from mapo_jax.pkg import name` is an edge to
`mapo_jax.pkg.name` when that is a module, else to the package. Importing a submodule is not counted as an
import of its parent package's `__init__` (Python runs it first, but a package that lists its own modules
would otherwise form a circle with each of them). Tests and benches are not part of the graph.
"""
import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mapo_jax"


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      graph[name].update(t for t in targets if t in modules and t != name)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
  index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
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
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_known_edges():
  graph = import_graph()
  assert "mapo_jax.training.train_step" in graph["mapo_jax.training.build"]
  assert "mapo_jax.data.sources" in graph["mapo_jax.data.unpaired"]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
  found = cycles(import_graph())
  assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_models_do_not_import_rewards_or_training():
  """models/ holds the networks pipelines load; reward networks live in rewards/, and no network knows
  about training."""
  graph = import_graph()
  for name, targets in graph.items():
    if name.startswith("mapo_jax.models"):
      bad = sorted(t for t in targets if t.startswith(("mapo_jax.rewards", "mapo_jax.training", "mapo_jax.run",
                                                        "mapo_jax.toy")))
      assert not bad, f"{name} imports {bad}"


def test_the_trainer_starts_without_importing_torch():
  """Every trainer process pays its imports at start-up. The package reads torch's file formats without torch
  (mapo_jax/convert/torch_pickle.py), and tensorboardX would import torch only to accept torch tensors: with
  torch installed that took 2-5 s of each start (run/metrics.py)."""
  import subprocess
  import sys
  probe = "import sys, mapo_jax.train, mapo_jax.generate, mapo_jax.export; print('torch' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "False"
