"""The shape of the code: imports between the project's modules point one way (imports inside functions
included), lines are at most 100 characters and functions at most 80 lines in the core files."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))

# bottom to top; a module may import only modules on lower rows (README: "How the files fit")
LAYERS = [["kernels", "data", "reward", "fsdp"], ["model"], ["rollout", "trainer", "checkpoint"],
          ["settings"], ["eval"], ["curriculum"], ["grpo"]]


def project_imports(name: str) -> set[str]:
    """Every project module `name` imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(CORE) - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle (first repeated at the end), or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return path[path.index(d):] + [m, d] if d in path else [m, d]
            if d not in state:
                c = visit(d, path + [m])
                if c:
                    return c
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m, [])
            if c:
                return c
    return None


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_point_one_way():
    graph = {m: project_imports(m) for m in CORE}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert sorted(m for row in LAYERS for m in row) == CORE, "a module is missing from LAYERS"
    level = {m: i for i, row in enumerate(LAYERS) for m in row}
    upward = [f"{m} imports {d}" for m, ds in graph.items() for d in ds if level[d] >= level[m]]
    assert not upward, upward


def test_lines_and_functions_stay_short():
    long_lines, long_funcs = [], []
    for m in CORE:
        text = open(os.path.join(ROOT, m + ".py")).read()
        long_lines += [f"{m}.py:{i}" for i, line in enumerate(text.splitlines(), 1) if len(line) > 100]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long_funcs.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_lines, long_lines
    assert not long_funcs, long_funcs
