"""BUILD stays true: every module has a target, and each target's deps are
what its modules import, no more and no less.

The checker reads BUILD with Python's `ast` (the file is written in the
subset of Starlark that is also Python: calls with literal arguments) and
each module's imports with `ast` too; it needs no Bazel. A module's
dependencies are:
- its in-project imports (comln_tf, export, launch, configs and the test
  helpers, which pytest imports as top-level modules from tests/), resolved
  to the module file they load;
- its third-party imports, as `@pypi//<package>` labels of the rules_python
  hub that MODULE.bazel builds from requirements.txt;
- modules it runs by name (a string constant such as "launch.train", passed
  to `python -m`) and config files it names ("configs/omniglot_5w1s.py",
  or in a config, the name of the config it continues), found in `deps` or
  `data`;
- for tests, tests/conftest.py, which pytest loads without an import.
Parent packages' `__init__.py` are not required: comln_tf/__init__.py
imports the modules below it, so requiring it would make a cycle, which
Bazel forbids.

`python tests/test_build.py` rewrites BUILD from the tree in that form.
"""

import ast
import collections
import dataclasses
import functools
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# Folders whose .py files are modules that need a target.
PACKAGES = ("comln_tf", "export", "launch", "configs", "tests")
RULES = ("py_library", "py_binary", "py_test")
PYPI = "@pypi//"
# Third-party import -> the requirements.txt packages it needs, as the
# rules_python hub names them (lowercase, "-" and "." as "_"). TFP needs
# tf_keras and TFDS importlib_resources without declaring them.
THIRD_PARTY = {
  "absl": ("absl_py",),
  "google.protobuf": ("protobuf",),
  "grpc": ("grpcio",),
  "keras": ("keras",),
  "ml_collections": ("ml_collections",),
  "numpy": ("numpy",),
  "pytest": ("pytest",),
  "scipy": ("scipy",),
  "tensorflow": ("tensorflow",),
  "tensorflow_datasets": ("tensorflow_datasets", "importlib_resources"),
  "tensorflow_probability": ("tensorflow_probability", "tf_keras"),
  "tensorflow_serving": ("tensorflow_serving_api",),
  "tqdm": ("tqdm",),
}
CONFIG_PATH = re.compile(r"configs/\w+\.py")
ENTRY_PACKAGES = ("launch.", "export.")


@dataclasses.dataclass
class Target:
  rule: str
  name: str
  srcs: tuple = ()
  deps: tuple = ()
  data: tuple = ()


def parse_build(text):
  """Returns the BUILD file's targets by name.

  Other rules than py_* (e.g. a filegroup) count by name only: their
  arguments may use glob().

  Args:
    text: the BUILD file's contents.

  Raises:
    ValueError: a py_* rule call the checker cannot read (e.g. glob() or a
      variable as an argument), or two targets with one name.
  """
  targets = {}
  for statement in ast.parse(text).body:
    call = statement.value if isinstance(statement, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
      raise ValueError(f"BUILD line {statement.lineno}: expected a rule call")
    if call.func.id not in RULES:
      names = [k.value for k in call.keywords if k.arg == "name"]
      if names and isinstance(names[0], ast.Constant):
        targets[names[0].value] = Target(rule=call.func.id, name=names[0].value)
      continue
    try:
      arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError as error:
      raise ValueError(
        f"BUILD line {call.lineno}: arguments must be literals ({error})"
      ) from None
    target = Target(
      rule=call.func.id,
      name=arguments["name"],
      srcs=tuple(arguments.get("srcs", ())),
      deps=tuple(arguments.get("deps", ())),
      data=tuple(arguments.get("data", ())),
    )
    if target.name in targets:
      raise ValueError(f"BUILD: two targets named {target.name!r}")
    targets[target.name] = target
  return targets


def module_files(root):
  """Returns {module name: path relative to root} of every project module.

  Test helpers are top-level modules (pytest puts tests/ on sys.path).
  """
  modules = {}
  for package in PACKAGES:
    for path in sorted((root / package).rglob("*.py")):
      relative = path.relative_to(root)
      parts = relative.with_suffix("").parts
      if parts[0] == "tests":
        parts = parts[1:]
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join(parts)] = relative.as_posix()
  return modules


def _third_party(name):
  for module, packages in THIRD_PARTY.items():
    if name == module or name.startswith(module + "."):
      return packages
  return None


@dataclasses.dataclass
class Needs:
  """What one module needs from its target."""

  modules: set = dataclasses.field(default_factory=set)  # imported (paths)
  packages: set = dataclasses.field(default_factory=set)  # @pypi// names
  runs: set = dataclasses.field(default_factory=set)  # run or named (paths)
  errors: list = dataclasses.field(default_factory=list)


def module_needs(path, root, modules):
  """Reads one module's imports and named modules; see the module docstring.

  Args:
    path: the module's path relative to root.
    root: the repository root.
    modules: module_files(root).

  Returns:
    A Needs.
  """
  return _module_needs(
    path, (root / path).read_text(), tuple(sorted(modules.items()))
  )


@functools.cache
def _module_needs(path, source, module_items):
  """module_needs, cached: the checker runs on many variants of BUILD."""
  modules = dict(module_items)
  needs = Needs()
  tree = ast.parse(source, filename=path)
  tops = {name.split(".")[0] for name in modules}
  package = [name for name, p in modules.items() if p == path][0]
  if not path.endswith("__init__.py"):
    package = package.rpartition(".")[0]

  def add(name, line):
    if name.split(".")[0] in tops:
      if name in modules:
        needs.modules.add(modules[name])
      else:
        needs.errors.append(f"{path}:{line} imports {name}, no such module")
    elif _third_party(name) is not None:
      needs.packages.update(_third_party(name))
    elif name.split(".")[0] not in sys.stdlib_module_names:
      needs.errors.append(
        f"{path}:{line} imports {name}: a third-party module missing from "
        "THIRD_PARTY in tests/test_build.py (and from requirements.txt?)"
      )

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        add(submodule if submodule in modules else base, node.lineno)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      # A module run by name: "launch.train" (not "launch", the package).
      if node.value in modules and node.value.startswith(ENTRY_PACKAGES):
        needs.runs.add(modules[node.value])
      # A config continuing another imports it by name at run time.
      elif path.startswith("configs/") and f"configs.{node.value}" in modules:
        needs.runs.add(modules[f"configs.{node.value}"])
      elif CONFIG_PATH.fullmatch(node.value) and node.value in (
        modules.values()
      ):
        needs.runs.add(node.value)
  if path.startswith("tests/test_") and "conftest" in modules:
    needs.modules.add(modules["conftest"])
  return needs


def _label(label):
  return label[len("//:") :] if label.startswith("//:") else label[1:]


@dataclasses.dataclass
class Tree:
  """What the checker reads from the source tree (not from BUILD)."""

  modules: dict  # module_files(root)
  needs: dict  # {path: Needs}
  requirements: set  # requirements.txt's packages, as @pypi// names


def read_tree(root=REPO):
  """Reads the modules, their needs and requirements.txt under root."""
  modules = module_files(root)
  requirements = {
    re.split(r"[=<>~!\[; ]", line.strip())[0]
    .lower()
    .replace("-", "_")
    .replace(".", "_")
    for line in (root / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
  }
  needs = {path: module_needs(path, root, modules) for path in modules.values()}
  return Tree(modules, needs, requirements)


def build_errors(build_text, root=REPO, tree=None):
  """Returns what is wrong with BUILD (empty when it matches the code).

  Args:
    build_text: the contents of a BUILD file for the tree at root.
    root: the repository root.
    tree: read_tree(root), if already read.
  """
  targets = parse_build(build_text)
  tree = tree or read_tree(root)
  modules, needs = tree.modules, tree.needs
  errors = []
  owners = collections.defaultdict(set)
  for target in targets.values():
    for src in target.srcs:
      owners[src].add(target.name)
      if not (root / src).is_file():
        errors.append(f"{target.name}: src {src} does not exist")
  for path in sorted(modules.values()):
    if not owners[path]:
      errors.append(f"{path} has no target")
  for _, need in sorted(needs.items()):
    errors.extend(need.errors)
  for target in targets.values():
    errors.extend(target_errors(target, targets, tree))
  return errors


def target_errors(target, targets, tree):
  """What is wrong with one target's deps (see build_errors).

  Args:
    target: a Target.
    targets: every target of BUILD by name (its deps are looked up here).
    tree: read_tree(root).
  """
  needs, requirements = tree.needs, tree.requirements
  errors = []
  local, pypi = [], set()
  for label in target.deps + tuple(
    label for label in target.data if label.startswith((":", "//:"))
  ):
    if label.startswith(PYPI):
      pypi.add(label[len(PYPI) :])
      if label[len(PYPI) :] not in requirements:
        errors.append(f"{target.name}: {label} is not in requirements.txt")
    elif _label(label) not in targets:
      errors.append(f"{target.name}: dep {label} is not a target")
    else:
      local.append(targets[_label(label)])
  dep_names = {_label(label) for label in target.deps}
  dep_srcs = {src for dep in local for src in dep.srcs if dep.name in dep_names}
  data_srcs = {src for dep in local for src in dep.srcs}
  used = set()
  for src in target.srcs:
    if src not in needs:
      continue
    # A py_binary lists its main module in srcs, as rules_python requires,
    # and gets that module's dependencies through the library it wraps.
    wrapped = [dep for dep in local if src in dep.srcs]
    need = needs[src]
    for module in sorted(need.modules | need.runs):
      providers = dep_srcs if module in need.modules else data_srcs
      if module in target.srcs:
        continue
      if module in providers:
        used.update(dep.name for dep in local if module in dep.srcs)
      elif any(
        module in targets[_label(label)].srcs
        for dep in wrapped
        for label in dep.deps
        if _label(label) in targets
      ):
        used.update(dep.name for dep in wrapped)
      else:
        errors.append(
          f"{target.name}: {src} needs {module}; no target in "
          f"its {'deps' if module in need.modules else 'deps or data'}"
          " has it"
        )
    for package in sorted(need.packages):
      if package in pypi:
        used.add(PYPI + package)
      elif any(PYPI + package in dep.deps for dep in wrapped):
        used.update(dep.name for dep in wrapped)
      else:
        errors.append(
          f"{target.name}: {src} needs {PYPI}{package}, not in its deps"
        )
    used.update(dep.name for dep in wrapped)
  for label in target.deps:
    name = label if label.startswith(PYPI) else _label(label)
    if name not in used and (name in targets or name.startswith(PYPI)):
      errors.append(f"{target.name}: dep {label} is not used by its srcs")
  return errors


def _build_text():
  return (REPO / "BUILD").read_text()


def _without(text, target_name, label):
  """BUILD text with `label` removed from target_name's deps."""
  start = text.index(f'name = "{target_name}"')
  end = text.index(")\n", start)
  line = f'        "{label}",\n'
  assert line in text[start:end], (target_name, label)
  return text[:start] + text[start:end].replace(line, "", 1) + text[end:]


def _new_errors(build_text):
  """Errors of build_text that the repository's BUILD does not have.

  So the tests of the checker below hold even while BUILD lags the code
  (which test_build_matches_the_code reports).
  """
  tree, baseline = _repo_tree_and_errors()
  return [
    error
    for error in build_errors(build_text, tree=tree)
    if error not in baseline
  ]


@functools.cache
def _repo_tree_and_errors():
  tree = read_tree(REPO)
  return tree, set(build_errors(_build_text(), tree=tree))


def test_build_matches_the_code():
  assert build_errors(_build_text()) == []


def test_the_written_build_passes_the_check():
  assert build_errors(generate_build()) == []


def test_build_loads_its_rules_from_rules_python():
  text = _build_text()
  used = {rule for rule in RULES if re.search(rf"^{rule}\(", text, re.M)}
  load = re.search(r'load\("@rules_python//python:defs.bzl", ([^)]*)\)', text)
  assert load, "BUILD must load the py_* rules from rules_python"
  assert used <= set(re.findall(r'"(py_\w+)"', load.group(1)))
  module = (REPO / "MODULE.bazel").read_text()
  assert re.search(r'bazel_dep\(name = "rules_python"', module)
  assert 'hub_name = "pypi"' in module


def _pins(name):
  lines = (REPO / name).read_text().splitlines()
  return {
    line.split("==")[0].lower().replace("-", "_"): line.split("==")[1]
    for line in lines
    if "==" in line and not line.startswith("#")
  }


def test_the_lock_holds_every_pin_of_requirements():
  lock = _pins("requirements_lock.txt")
  assert {name: lock.get(name) for name in _pins("requirements.txt")} == (
    _pins("requirements.txt")
  )


def test_removing_any_dependency_is_reported():
  # Each dependency of BUILD in turn, removed from its target: the target's
  # check must name what the target's modules now miss.
  targets = parse_build(_build_text())
  tree, _ = _repo_tree_and_errors()
  unreported = []
  for target in targets.values():
    before = set(target_errors(target, targets, tree))
    for label in target.deps:
      pruned = dataclasses.replace(
        target, deps=tuple(dep for dep in target.deps if dep != label)
      )
      errors = set(target_errors(pruned, targets, tree)) - before
      if not any(" needs " in error for error in errors):
        unreported.append((target.name, label))
  assert not unreported


def test_a_missing_dependency_names_the_module_and_the_import():
  errors = _new_errors(
    _without(_build_text(), "comln_tf_training_config", ":comln_tf_backbones")
  )
  assert errors == [
    "comln_tf_training_config: comln_tf/training/_config.py needs "
    "comln_tf/backbones.py; no target in its deps has it"
  ]


def test_a_module_without_target_is_reported():
  text = _build_text()
  start = text.index('py_library(\n    name = "comln_tf_engine_solvers_dopri5"')
  text = text[:start] + text[text.index(")\n", start) + 2 :]
  errors = _new_errors(text)
  assert "comln_tf/engine/solvers/_dopri5.py has no target" in errors
  assert any(
    "dep :comln_tf_engine_solvers_dopri5 is not a target" in e for e in errors
  )


def test_an_unused_dependency_is_reported():
  text = _build_text().replace(
    'name = "comln_tf_engine_reduced",\n'
    '    srcs = ["comln_tf/engine/_reduced.py"],\n'
    "    deps = [\n",
    'name = "comln_tf_engine_reduced",\n'
    '    srcs = ["comln_tf/engine/_reduced.py"],\n'
    '    deps = [\n        ":comln_tf_backbones",\n',
    1,
  )
  assert _new_errors(text) == [
    "comln_tf_engine_reduced: dep :comln_tf_backbones is not used by its srcs"
  ]


def test_an_import_of_an_unlisted_third_party_package_is_reported(tmp_path):
  (tmp_path / "comln_tf").mkdir()
  (tmp_path / "comln_tf" / "__init__.py").write_text("import pandas\n")
  (tmp_path / "requirements.txt").write_text("numpy==2.4.6\n")
  build = (
    'py_library(\n    name = "comln_tf_init",\n'
    '    srcs = ["comln_tf/__init__.py"],\n)\n'
  )
  assert build_errors(build, tmp_path) == [
    "comln_tf/__init__.py:1 imports pandas: a third-party module missing "
    "from THIRD_PARTY in tests/test_build.py (and from requirements.txt?)"
  ]


# Writing BUILD: `python tests/test_build.py` rewrites it from the tree, in
# the form the checker reads (a target per module, named after its path).

_HEADER = """\
# Bazel targets: a py_library per module, a py_binary per entry point and a
# py_test per test file (run by pytest through tests/pytest_main.py).
# Third-party packages are the `@pypi//<name>` repositories that
# rules_python's pip.parse builds from requirements_lock.txt (MODULE.bazel).
# tests/test_build.py checks that this file matches the code (every module
# has a target; each target's deps are what its modules import) and writes
# it: `python tests/test_build.py` after adding a module or an import.

load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")

package(default_visibility = ["//visibility:public"])

# The shipped SavedModel and the predictions tests/test_pretrained.py checks.
filegroup(
    name = "pretrained",
    srcs = glob(["pretrained/**"]),
)

# What tests/test_build.py reads: every module and the files that declare
# the dependencies.
filegroup(
    name = "sources",
    srcs = glob([
        "comln_tf/**/*.py",
        "configs/*.py",
        "export/*.py",
        "launch/*.py",
        "tests/*.py",
    ]) + [
        "BUILD",
        "MODULE.bazel",
        "requirements.txt",
        "requirements_lock.txt",
    ],
)
"""
_RUNNER = "tests/pytest_main.py"


def target_name(path):
  """comln_tf/data/_sources.py -> comln_tf_data_sources."""
  parts = pathlib.PurePosixPath(path).with_suffix("").parts
  return "_".join("init" if p == "__init__" else p.lstrip("_") for p in parts)


def _has_main(path, root):
  return any(
    isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    for node in ast.parse((root / path).read_text()).body
  )


def _starlark_list(key, items):
  if len(items) == 1 and key in ("srcs", "args"):
    return f'    {key} = ["{items[0]}"],\n'
  lines = "".join(f'        "{item}",\n' for item in items)
  return f"    {key} = [\n{lines}    ],\n" if items else f"    {key} = [],\n"


def generate_build(root=REPO):
  """BUILD's text for the tree at root.

  Raises:
    ValueError: a module imports something the checker cannot place.
  """
  tree = read_tree(root)
  errors = [error for need in tree.needs.values() for error in need.errors]
  if errors:
    raise ValueError("\n".join(errors))

  def order(path):
    p = pathlib.PurePosixPath(path)
    return (
      PACKAGES.index(p.parts[0]),
      str(p.parent),
      p.name != "__init__.py",
      p.name,
    )

  def deps(path):
    need = tree.needs[path]
    local = sorted(":" + target_name(m) for m in need.modules if m != path)
    return local + sorted(PYPI + package for package in need.packages)

  def data(path):
    return [
      ":" + target_name(m) + ("_main" if _has_main(m, root) else "")
      for m in sorted(tree.needs[path].runs)
      if m != path
    ]

  rules = [_HEADER]
  for path in sorted(tree.modules.values(), key=order):
    name = target_name(path)
    if path == _RUNNER:
      continue
    if path.startswith("tests/test_"):
      test_deps = sorted(
        set(deps(path)) | {PYPI + "pytest"},
        key=lambda label: (label.startswith("@"), label),
      )
      extra = {
        "tests/test_build.py": [":sources"],
        "tests/test_pretrained.py": [":pretrained"],
        "tests/test_export_classify.py": [":pretrained"],
      }.get(path, [])
      rules.append(
        f'py_test(\n    name = "{name}",\n    size = "large",\n'
        + _starlark_list("srcs", [_RUNNER, path])
        + f'    main = "{_RUNNER}",\n'
        + _starlark_list("args", [path])
        + _starlark_list("data", ["pytest.ini"] + data(path) + extra)
        + _starlark_list("deps", test_deps)
        + ")\n"
      )
      continue
    rules.append(
      f'py_library(\n    name = "{name}",\n'
      + _starlark_list("srcs", [path])
      + (_starlark_list("data", data(path)) if data(path) else "")
      + _starlark_list("deps", deps(path))
      + ")\n"
    )
    if _has_main(path, root):
      rules.append(
        f'py_binary(\n    name = "{name}_main",\n'
        + _starlark_list("srcs", [path])
        + f'    main = "{path}",\n'
        + _starlark_list("deps", [":" + name])
        + ")\n"
      )
  return "\n".join(rules)


if __name__ == "__main__":
  (REPO / "BUILD").write_text(generate_build())
  print(f"wrote {REPO / 'BUILD'}")
