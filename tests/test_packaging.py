"""Static checks of the deployment files (no Docker engine runs in CI).

The Dockerfile and docker-compose.yml are parsed and checked against the repo: every
COPY source exists, the API image cannot pull torch in (neither directly nor through
an import of the API code), compose wires Redis with AOF, healthchecks and a GPU
reservation for the worker.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from synthmri.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"synthmri", "model", "training", "worker", "api"}
# requirements/api.txt distribution → import name, where they differ.
IMPORT_NAMES = {
    "python-multipart": "multipart",
    "pillow": "PIL",
    "prometheus-client": "prometheus_client",
    "pydantic-settings": "pydantic_settings",
}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile as (instruction, arguments) lists, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[Stage] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), flags=re.IGNORECASE)
            assert m, f"unparsable FROM line: {line}"
            stages.append(Stage(name=(m.group(2) or "").lower(), base=m.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse_dockerfile((ROOT / "Dockerfile").read_text())}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_has_api_worker_and_train_targets(stages: dict[str, Stage]) -> None:
    assert {"api", "worker", "train"} <= set(stages)
    assert "python" in stages["api"].base.lower() or stages["api"].base == "${PYTHON_IMAGE}"
    assert stages["worker"].base == "${CUDA_IMAGE}"
    text = (ROOT / "Dockerfile").read_text()
    cuda_image = re.search(r"ARG CUDA_IMAGE=(\S+)", text)
    assert cuda_image and cuda_image.group(1).startswith("nvidia/cuda:") and "runtime" in cuda_image.group(1)
    assert stages["train"].base == "worker"
    assert any("torchrun" in e for e in stages["train"].args("ENTRYPOINT"))


def test_every_copy_source_exists(stages: dict[str, Stage]) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    checked = 0
    for stage in stages.values():
        for rest in stage.args("COPY"):
            words = shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"stage {stage.name!r}: COPY source {src!r} is not in the repo"
                name = src.rstrip("/")
                excluded = [p for p in ignored if fnmatch.fnmatch(name, p) or name.startswith(p + "/")]
                assert not excluded, f"COPY source {src!r} is excluded by .dockerignore {excluded}"
                checked += 1
    assert checked >= 10


def test_api_stage_never_installs_torch(stages: dict[str, Stage]) -> None:
    api = stages["api"]
    for run in api.args("RUN"):
        assert "torch" not in run.replace("find_spec('torch')", ""), f"api stage mentions torch: {run}"
        for m in re.finditer(r"pip install([^&;]*)", run):
            cmd = m.group(1)
            # Installing the project itself would pull torch from pyproject.toml's dependencies.
            if re.search(r"(^|\s)\.(\s|$)", cmd):
                assert "--no-deps" in cmd, f"api stage installs the project with its deps: {cmd}"
    for dist in _requirement_modules():
        assert "torch" not in dist and not dist.startswith("nvidia"), f"requirements/api.txt lists {dist}"


def _requirement_modules() -> set[str]:
    mods = set()
    for line in (ROOT / "requirements/api.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            dist = re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0].lower()
            mods.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return mods


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import submodule` imports the submodule too.
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def test_api_code_imports_only_what_the_api_image_installs() -> None:
    """Follow every first-party import from api.main; third-party ones must be in requirements/api.txt."""
    # Installed with what requirements/api.txt names: starlette and anyio by fastapi, kombu by
    # celery, pydantic_core (its validation core, pinned to the exact version) by pydantic.
    bundled = {"starlette", "kombu", "anyio", "pydantic_core"}
    allowed = _requirement_modules() | set(sys.stdlib_module_names) | bundled
    seen: set[str] = set()
    todo = ["api.main"]
    third_party: dict[str, str] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        parent = module.rpartition(".")[0]
        if parent:
            todo.append(parent)
        for imported in _imports_of(path, module):
            top = imported.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(imported)
            elif top:
                third_party.setdefault(top, module)
    missing = {top: by for top, by in third_party.items() if top not in allowed}
    assert not missing, f"the API image lacks these imports (module → imported by): {missing}"
    assert "api.main" in seen and len(seen) > 1


def test_compose_services_volumes_and_redis_persistence(compose: dict) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker", "trainer"} <= set(services)
    assert {"models", "results", "redis-data"} <= set(compose["volumes"])
    redis = services["redis"]
    command = redis["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name in ("api", "worker"):
        mounts = {v.split(":")[0]: v.split(":")[1] for v in services[name]["volumes"]}
        assert mounts.get("models") == "/models" and mounts.get("results") == "/results", name
        env = services[name]["environment"]
        assert env["SYNTHMRI_REDIS_URL"].startswith("redis://redis:")
        assert env["SYNTHMRI_MODELS_DIR"] == "/models" and env["SYNTHMRI_RESULTS_DIR"] == "/results"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    assert services["trainer"]["build"]["target"] == "train"


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset; ${VAR:?message} stands for a user-supplied value."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "user-value", value)


def test_compose_env_are_valid_settings(compose: dict) -> None:
    """Every SYNTHMRI_* variable compose sets is a Settings field, and its value validates."""
    fields = {f"SYNTHMRI_{name.upper()}": name for name in Settings.model_fields}
    for name, service in compose["services"].items():
        values = {}
        for key, value in service.get("environment", {}).items():
            if key.startswith("SYNTHMRI_"):
                assert key in fields, f"service {name!r} sets {key}, which synthmri/settings.py does not read"
                values[fields[key]] = _interpolate(str(value))
        Settings(**values)


def test_compose_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/healthz" in api_check and ":8000" in api_check
    assert "8000" in services["api"]["ports"][0].split(":")[-1]


def test_compose_worker_reserves_gpus_and_trainer_is_a_profile(compose: dict) -> None:
    services = compose["services"]
    for name in ("worker", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" in devices[0]
    assert services["trainer"]["profiles"] == ["trainer"]
    for name in ("redis", "api", "worker"):
        assert "profiles" not in services[name], f"{name} must start by default"


def test_worker_entrypoint_is_valid_bash_and_starts_one_celery_per_gpu() -> None:
    script = ROOT / "docker/worker-entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "CUDA_VISIBLE_DEVICES=$i" in text and "--concurrency 1" in text and "--pool solo" in text
    m = re.search(r"celery -A (\S+) worker", text)
    assert m
    if _module_file("worker.celery_app") is not None:
        module, _, attribute = m.group(1).partition(":")
        path = _module_file(module)
        assert path is not None, f"celery app module {module} does not exist"
        defined = re.search(rf"^{attribute or 'app'} = Celery\(", path.read_text(), re.M)
        assert defined, f"no Celery app {m.group(1)}"


def test_parse_dockerfile_reads_stages_and_continuations() -> None:
    stages = parse_dockerfile("FROM a:1 AS one\nRUN x \\\n  && y\nFROM one AS two\nCOPY --chown=1 a b ./\n")
    assert [s.name for s in stages] == ["one", "two"]
    assert stages[0].args("RUN") == ["x    && y"]
    assert stages[1].base == "one" and stages[1].args("COPY") == ["--chown=1 a b ./"]


def test_web_page_is_self_contained_and_knows_the_channel_sets() -> None:
    """No CDN or external URL in the page, and its channel-set list is synthmri.channels'."""
    from synthmri.channels import CHANNEL_SETS

    static = ROOT / "api/static"
    for name in ("index.html", "app.js", "style.css"):
        text = (static / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f"{name} loads something from another host"
        assert not re.search(r"url\((['\"])?(https?:)?//", text), f"{name} loads something from another host"
        assert "@import" not in text and "fetch(\"http" not in text
    html = (static / "index.html").read_text()
    for asset in re.findall(r"(?:src|href)=\"/static/([^\"]+)\"", html):
        assert (static / asset).is_file(), f"index.html refers to a missing /static/{asset}"
    js_sets = re.search(r"const CHANNEL_SETS = \[([^\]]*)\]", (static / "app.js").read_text())
    assert js_sets and re.findall(r"\"([^\"]+)\"", js_sets.group(1)) == list(CHANNEL_SETS)


def test_configuration_page_documents_every_setting_with_its_default() -> None:
    """docs/configuration.md has one row per Settings field, with the real default."""
    from synthmri.settings import Settings

    readme = (ROOT / "docs" / "configuration.md").read_text()
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(SYNTHMRI_\w+)` \| (.*?) \| .+ \|$", readme, flags=re.M)
    }
    fields = Settings.model_fields
    for name, info in fields.items():
        env = f"SYNTHMRI_{name.upper()}"
        assert env in rows, f"docs/configuration.md has no row for {env}"
        default = info.default
        shown = "*(empty)*" if default in ("", frozenset()) else f"`{default}`"
        assert rows[env] == shown, f"docs/configuration.md: {env} default {rows[env]}, settings.py: {shown}"
    unknown = set(rows) - {f"SYNTHMRI_{n.upper()}" for n in fields}
    assert not unknown, f"docs/configuration.md documents settings that do not exist: {sorted(unknown)}"


def test_readme_quick_start_is_exactly_the_two_quickstart_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["./quickstart up", "./quickstart test"]
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert ci[-1] == "./quickstart test", ".ci/run must end by running command 2 exactly"
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (ROOT / picture).is_file(), f"README.md shows {picture}, which is not in the repo"
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme):
        assert (ROOT / target).is_file(), f"README.md links to {target}, which is not in the repo"


# Package → packages it must never import (docs/INTERFACES.md, "Import rule"): code that two
# packages need lives in the lower one, so worker and training never import each other,
# and the torch-free core imports none of the packages built on it.
FORBIDDEN_IMPORTS = {
    "worker": {"training", "api"},
    "training": {"worker", "api"},
    "model": {"worker", "training", "api"},
    "synthmri": {"model", "worker", "training", "api", "torch", "fastapi"},
    "api": {"model", "worker", "training", "torch"},
}


def forbidden_imports(root: Path, forbidden: dict[str, set[str]]) -> list[str]:
    """`file imports module` for every import, at any depth of a file, that `forbidden` rules out."""
    found = []
    for package, banned in forbidden.items():
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for imported in sorted(_imports_of(path, module)):
                if imported.split(".")[0] in banned:
                    found.append(f"{path.relative_to(root)} imports {imported}")
    return found


def test_packages_import_only_downwards() -> None:
    assert forbidden_imports(ROOT, FORBIDDEN_IMPORTS) == []


def test_forbidden_imports_are_found_inside_functions(tmp_path: Path) -> None:
    """The check above would pass vacuously if it missed imports; here it must find both kinds."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "plots.py").write_text(
        "from synthmri.outputs import writers\n\ndef grid():\n    from worker.writers import write_grid\n"
    )
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "engine.py").write_text("import training.train as t\n")
    assert forbidden_imports(tmp_path, {"training": {"worker"}, "worker": {"training"}}) == [
        "training/plots.py imports worker.writers",
        "training/plots.py imports worker.writers.write_grid",
        "worker/engine.py imports training.train",
    ]


def test_license_and_citation_agree_with_the_package() -> None:
    """LICENSE, CITATION.cff, pyproject.toml and synthmri.__version__ name one license and version."""
    import tomllib

    from synthmri import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["version"] == __version__
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 The SynthMRI authors\n")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "SynthMRI" and cff["message"]
    assert cff["version"] == __version__ and cff["license"] == project["license"]
    assert cff["authors"] == [{"name": "The SynthMRI authors"}]
    for ref in cff["references"]:
        assert ref["type"] and ref["title"] and ref["authors"] and isinstance(ref["year"], int), ref
