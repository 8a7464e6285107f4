"""The architecture's rules, checked on the code: the catalog builds every path inside a run
folder, each layer imports only the layers below it, no module is long, installing the distribution
claims the name `hspace` only, and every stage command's options are its config section's."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "hcore", "data", "tasks", "flows")
# how a path inside a run folder gets built: joining onto a run's root, or spelling an artifact's name
RUN_PATH = re.compile(
    r"""(\.root\s*/|run_dir\s*/|out\s*/\s*["'](?:samples|eval|figures|directions)|"""
    r"""\.(?:eval|figures|directions|pca|samples|annotations|jacobian|compare|latent_svd|run_json)\s*/|"""
    r"""["'](?:samples\.zarr|annotations\.zarr|pca\.zarr|jacobian\.zarr|run\.json|run\.yaml|report\.html)["']|"""
    r"""\.safetensors["'])"""
)


def package_files():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_only_the_catalog_builds_paths_inside_a_run_folder():
    offenders = []
    for path in package_files():
        if path.parent.name == "data":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if RUN_PATH.search(line) and "noqa: catalog" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "paths inside a run folder built outside data/:\n" + "\n".join(offenders)


def test_the_check_itself_catches_a_path_built_by_hand():
    assert RUN_PATH.search('out = run.root / "eval"') and RUN_PATH.search('Path(run_dir) / "pca.zarr"')
    assert RUN_PATH.search('path = run.figures / "x.png"')
    assert not RUN_PATH.search("out = run.eval")


def test_modules_are_short():
    lengths = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in package_files()}
    assert max(lengths.values()) <= 400, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
def test_wheel_installs_only_the_hspace_namespace(tmp_path):
    """What `pip install .` puts into site-packages: hspace/... and its dist-info, nothing
    named data, tasks or flows at the top level; the shipped model and oracle are in it."""
    src = tmp_path / "src"  # a copy of what git tracks: setuptools writes build/ into the source folder
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    for name in files.stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, src],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("hspace-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hspace", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for expected in (
        "hspace/__init__.py",
        "hspace/_applying.py",
        "hspace/flows/cli.py",
        "hspace/data/toy_model/unet/config.json",
        "hspace/data/oracle/config.json",
        "hspace/data/examples/toy.yaml",
        "hspace/data/toy_sd_model/unet/config.json",
        "hspace/data/toy_sd_model/tokenizer/merges.txt",
        "hspace/data/examples/toy_sd.yaml",
    ):
        assert expected in names
    assert not any("toy_checkpoint" in n or n.endswith(".pt") for n in names)  # no training state in the package
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hspace = hspace.flows.entry:main" in entry


def test_stage_commands_take_their_options_and_defaults_from_the_sections():
    import typer.main

    from hspace.flows.cli import app
    from hspace.tasks.config import section_model as _section
    from hspace.tasks.stages import registry

    group = typer.main.get_command(app)
    checked = 0
    commands = [s for s in registry().values() if s.command]
    assert {s.name for s in commands} <= set(group.commands) and len(commands) >= 9
    for declared in commands:
        command = group.commands[declared.name]
        options = {opt: p for p in command.params if p.param_type_name == "option" for opt in p.opts}
        fields = [
            (name, field, info)
            for name, only in (declared.cli_sections or {declared.name: None}).items()
            for field, info in _section(name).model_fields.items()
            if not (info.json_schema_extra or {}).get("hidden") and (only is None or field in only)
        ]
        for _, field, info in fields:
            option = options[(info.json_schema_extra or {}).get("cli") or "--" + field.replace("_", "-")]
            default = info.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = ",".join(str(x) for x in default)
            assert option.default == default or (default is None and option.required), (declared.name, field)
            assert option.help == info.description
            checked += 1
    assert checked > 40


def test_one_stage_record_and_old_pipeline_records_are_read_into_it(tmp_path):
    """run.json keeps one record per stage under ``stages``; a folder written before that
    (the pipeline's records under ``pipeline``) reads as if it had been written now."""
    import json

    from hspace.data.catalog import RunFolder
    from hspace.data.runs import run_summary

    run = RunFolder(tmp_path / "old")
    run.init({"n": 4}, {"id": "m", "fingerprint": "f"}, {})
    meta = json.loads(run.run_json.read_text())
    meta["stages"] = {"sample": {"state": "done", "recomputed_shards": 1}}
    meta["pipeline"] = {"sample": {"state": "done", "key": "k1"}, "annotate": {"state": "failed", "key": "k2"}}
    meta["pipeline_config"] = {}
    meta["pipeline_stages"] = ["sample", "annotate", "pca"]
    run.run_json.write_text(json.dumps(meta))
    stages = run.read()["stages"]
    assert stages == {
        "sample": {"state": "done", "recomputed_shards": 1, "key": "k1"},
        "annotate": {"state": "failed", "key": "k2"},
    }
    assert "pipeline" not in run.read()
    summary = run_summary(run.root)
    assert summary["stages"] == {"sample": "done", "annotate": "failed", "pca": "pending"}
    assert summary["state"] == "failed"


def test_a_pipeline_stage_stopped_by_bad_input_is_recorded_failed_a_single_command_is_put_back(tmp_path):
    from hspace.data.catalog import RunError, RunFolder

    run = RunFolder(tmp_path / "r")
    run.init({"n": 4}, {"id": "m", "fingerprint": "f"}, {})
    run.set_stage("directions", state="done", key="old")
    for restore, expected in ((True, {"state": "done", "key": "old"}), (False, {"state": "failed", "key": "new"})):
        with pytest.raises(RunError), run.stage("directions", restore_on_refusal=restore, key="new"):
            raise RunError("--top 500: too many")
        record = run.read()["stages"]["directions"]
        assert {k: record[k] for k in ("state", "key")} == expected, record
    assert record["error"] == "--top 500: too many"


def test_section_options_are_validated_with_one_line_naming_the_option():
    from hspace.data.catalog import RunError
    from hspace.flows.options import config_from_options

    for values, needle in (
        ({"evaluate__gamma": "nan"}, "--gamma must be a finite number, got 'nan'"),
        ({"evaluate__gamma": "big"}, "--gamma must be a valid number"),
        ({"directions__attributes": ""}, "--attribute: List should have at least 1 item"),
        ({"annotate__annotators": ","}, "--annotator: List should have at least 1 item"),
        ({"sample__eta": "inf"}, "--eta must be a finite number"),
        ({"pca__components": "0"}, "--components must be greater than 0, got '0' (principal components"),
    ):
        with pytest.raises(RunError, match="^" + re.escape(needle)):
            config_from_options(values, {"device": "cpu"})
    cfg = config_from_options({"directions__attributes": "Smiling, Male", "evaluate__gamma": "auto"}, {})
    assert cfg.directions.attributes == ["Smiling", "Male"] and cfg.evaluate.gamma == "auto"
    assert cfg.directions.held_out_of({"kind": "inversion"}) == 0 and cfg.directions.held_out_of({}) == 64


def hspace_imports(path: Path) -> list[tuple[int, str, str]]:
    """Every ``from hspace.X import name`` in a script, nested ones included: (line, module, name)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hspace"):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, "") for a in node.names if a.name.startswith("hspace")]
    return found


def test_every_benchmark_script_imports_what_exists():
    """The benchmarks are not collected by pytest: a name moved between modules breaks them
    silently (torture_sample.py and bench_pca.py imported SampleStore from the catalog after it
    had moved to data.stores). Resolve each of their hspace imports against the package."""
    import importlib

    broken = []
    scripts = sorted((ROOT / "tests" / "benchmarks").glob("*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        for line, module, name in hspace_imports(script):
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                broken.append(f"{script.name}:{line}: {module}: {e}")
                continue
            if name and name != "*" and not hasattr(mod, name):
                try:  # a submodule named in the import list
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    broken.append(f"{script.name}:{line}: {module} has no {name}")
    assert not broken, "benchmark imports that fail:\n" + "\n".join(broken)


def test_the_benchmark_import_check_sees_a_moved_name(tmp_path):
    script = tmp_path / "bench_x.py"
    script.write_text("def main():\n    from hspace.data.catalog import SampleStore\n")
    assert hspace_imports(script) == [(2, "hspace.data.catalog", "SampleStore")]
    from hspace.data import catalog

    assert not hasattr(catalog, "SampleStore")


# which layers each layer may import (docs/ARCHITECTURE.md): imports point one way, hcore -> data -> tasks -> flows
# -> api (the package `hspace` itself, whose own modules are hspace._name); flows only wire: they call
# tasks, never the maths in hcore (this rule replaced a line budget on flows/)
API_MODULES = {p.stem for p in (ROOT / "api").glob("_*.py") if p.stem != "__init__"}
MAY_IMPORT = {
    "hcore": {"hcore"},
    "data": {"hcore", "data"},
    "tasks": {"hcore", "data", "tasks"},
    "flows": {"data", "tasks", "flows"},
    "api": {"hcore", "data", "tasks", "flows"} | API_MODULES,
}


@functools.cache
def parsed(path: Path):
    """A module's syntax tree (parsed once per test session)."""
    import ast

    return ast.parse(path.read_text())


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (inside functions too)."""
    import ast

    found = []
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def layer_violations(files, root: Path = ROOT) -> list[str]:
    bad = []
    for path in files:
        layer = path.relative_to(root).parts[0]
        for line, module in imports_of(path):
            parts = module.split(".")
            if parts[0] == "hspace" and len(parts) > 1 and parts[1] not in MAY_IMPORT[layer]:
                bad.append(f"{path.relative_to(root)}:{line}: {layer}/ imports {module}")
            if parts[0] in ("prefect", "prefect_dask") and layer not in ("tasks", "flows"):
                bad.append(
                    f"{path.relative_to(root)}:{line}: {layer}/ imports {module} (Prefect lives in tasks/ and flows/)"
                )
    return bad


def test_imports_point_one_way_and_prefect_stays_in_tasks_and_flows():
    bad = layer_violations(package_files())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_import_check_catches_a_wrong_import(tmp_path):
    for layer, text in (("hcore", "def f():\n    from hspace.data import models\n"), ("data", "import prefect\n")):
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "m.py").write_text(text)
    bad = layer_violations([tmp_path / "hcore" / "m.py", tmp_path / "data" / "m.py"], root=tmp_path)
    assert len(bad) == 2 and "hcore/ imports hspace.data" in bad[0] and "data/ imports prefect" in bad[1]


def test_the_order_of_stages_comes_from_their_inputs():
    """No stage declares its place: every stage comes after the stages it reads, the report
    after every pipeline stage; an input no module declares and a cycle are refused."""
    from dataclasses import replace

    from hspace.tasks.stages import BEFORE, _depths, registry

    stages = registry()
    place = {name: i for i, name in enumerate(stages)}
    assert all(place[i] < place[s.name] for s in stages.values() for i in s.inputs)
    assert list(stages)[-1] == "report" and set(stages["report"].inputs) == {
        s.name for s in stages.values() if s.pipeline and s.name != "report"
    }
    sample, pca = stages["sample"], stages["pca"]
    with pytest.raises(ValueError, match="pcaa"):
        _depths({"sample": sample, "pca": replace(pca, inputs=("pcaa",))})
    with pytest.raises(ValueError, match="cycle: sample -> pca -> sample"):
        _depths({"sample": replace(sample, inputs=("pca",)), "pca": pca})
    assert _depths({"sample": sample, "report": replace(sample, name="report", inputs=BEFORE)})["report"] > 1


def test_a_body_takes_its_sections_by_name():
    """The runner hands a stage body its sections by name: a body whose parameters do not name
    the declared sections is refused when the stage is declared, not when it first runs."""
    from dataclasses import replace

    from hspace.tasks.stages import registry

    pca = registry()["pca"]

    def by_position(run, p, ctx):
        return {}

    with pytest.raises(ValueError, match=r"stage pca: its body must take its sections by name, \(run, pca, ctx\)"):
        replace(pca, body=by_position)
    with pytest.raises(ValueError, match="takes its sections|must take"):
        replace(pca, sections=("pca", "annotate"))


def test_a_stage_is_one_module_and_nothing_else_names_it():
    """Every stage is declared once, at the end of its own module in tasks/ (one per
    module), with outputs the catalog knows; the CLI, the runner and the report name no
    stage: a new stage is one new module plus its config section."""
    import ast
    import re

    from hspace.data.catalog import ARTIFACTS
    from hspace.tasks.stages import BEFORE, registry

    stages = registry()
    declaring = [p for p in (ROOT / "tasks").glob("*.py") if re.search(r"^STAGE = Stage\(", p.read_text(), re.M)]
    assert len(declaring) == len(stages) >= 11
    for path in declaring:
        assert path.read_text().count("Stage(") == 1, path  # one declaration per module
    for s in stages.values():
        assert set(s.outputs) <= set(ARTIFACTS) and s.inputs != BEFORE
        assert all(i in stages for i in s.inputs), (s.name, s.inputs)
    for path in [*(ROOT / "flows").glob("*.py"), ROOT / "tasks" / "report.py", ROOT / "tasks" / "check.py"]:
        tree = ast.parse(path.read_text())
        named = set()
        for node in ast.walk(tree):  # a stage compared by name, or stages listed by name
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                named |= {p.value for p in parts if isinstance(p, ast.Constant) and p.value in stages}
            if isinstance(node, ast.List | ast.Tuple | ast.Set):
                listed = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in stages}
                named |= listed if len(listed) > 1 else set()
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                named |= {node.slice.value} if node.slice.value in stages and "registry" in ast.unparse(node) else set()
        assert not named, f"{path.name} names stages {sorted(named)}: derive them from the registry"


def test_run_record_is_typed_and_reads_a_folder_made_by_the_current_code(tmp_path, model_dir):
    """run.json of a real `hspace sample` folder reads into RunRecord (kind, model, stage
    records typed), writes back byte-for-byte the same JSON, and an unknown key survives."""
    import json

    from typer.testing import CliRunner

    from hspace.data.catalog import RunFolder, RunRecord
    from hspace.flows.cli import app

    out = tmp_path / "run"
    args = ["sample", "--model", str(model_dir), "--n", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    assert CliRunner().invoke(app, [*args, "--out", str(out)]).exit_code == 0
    run = RunFolder(out)
    before = json.loads(run.run_json.read_text())
    record = run.record()
    assert isinstance(record, RunRecord) and record.kind == "sample" and not record.is_pipeline
    assert record.model.fingerprint == before["model"]["fingerprint"] and record.stages["sample"].state == "done"
    assert record.stages["sample"].model_extra["recomputed_shards"] == 1
    before["from_the_future"] = {"x": 1}
    run.run_json.write_text(json.dumps(before))
    run.write(run.record())
    assert json.loads(run.run_json.read_text()) == before
    before["model"] = "not a mapping"
    run.run_json.write_text(json.dumps(before))
    with pytest.raises(Exception, match="model"):
        run.record()


@functools.cache
def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """hspace module -> the hspace modules it imports, at any depth (inside functions too)."""
    prefixes = {"api": "hspace", "hcore": "hspace.hcore", "data": "hspace.data", "tasks": "hspace.tasks"}
    prefixes["flows"] = "hspace.flows"
    modules = {}
    for folder, prefix in prefixes.items():
        for path in (root / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for _, module in imports_of(path):
            found |= {m for m in (module, *(module + "." + a for a in _imported_names(path, module))) if m in modules}
        graph[name] = found - {name}
    return graph


def _imported_names(path: Path, module: str) -> list[str]:
    return _from_imports(path).get(module, [])


@functools.cache
def _from_imports(path: Path) -> dict[str, list[str]]:
    """module -> the names a file imports from it (``from module import a, b``)."""
    import ast

    found: dict[str, list[str]] = {}
    for n in ast.walk(parsed(path)):
        if isinstance(n, ast.ImportFrom) and n.module:
            found.setdefault(n.module, []).extend(a.name for a in n.names)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or round a loop, at any depth (a registry
    that finds modules by name, as the stage and method registries do, is not an import)."""
    graph = module_graph()
    assert "hspace.tasks.sample" in graph and "hspace.hcore.edits" in graph
    assert cycles(graph) == [], cycles(graph)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_api_never_imports_the_cli():
    """The API calls the service (flows/runner.py) that the CLI calls, never the CLI's modules."""
    cli = {"hspace.flows.cli", "hspace.flows.stage_commands", "hspace.flows.server_commands", "hspace.flows.entry"}
    graph = module_graph()
    api = {m for m in graph if m == "hspace" or (m.startswith("hspace._"))}
    assert api and not {(m, c) for m in api for c in graph[m] & cli}


def test_code_cites_no_issue_numbers_and_no_files_outside_the_repository():
    """Lab notes stay out of the code: no issue numbers, no notes that are not in the repository."""
    pattern = re.compile(r"\(issue|issue \d|issue #|DESIGN\.md|STYLE\.md|STACK_NOTES\.md|SD_NOTES\.md|\.\./shared/")
    files = package_files() + sorted((ROOT / "tests").rglob("*.py"))
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        if p.name != "test_layout.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad
