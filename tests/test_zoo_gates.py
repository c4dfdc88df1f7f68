"""The MONAI model zoo's own gates, checked here so that a submission does not fail them: configs in
the form its pretty-format-json hook writes, metadata that installs everything the bundle imports, a
README that stands on its own, and a display name that the MONAI Label app still serves under a
name fit for URLs."""

from __future__ import annotations

import ast
import json
import re
import sys
from importlib.metadata import packages_distributions, requires

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO, monailabel_module

BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
README = BUNDLE / "docs" / "README.md"
FIRST_PARTY = {"scripts", "cryosxt_sim"}  # the bundle's own package; the repository's simulator (optional)
OPTIONAL = {"bioimageio-core", "bioimageio-spec", "onnx", "onnxruntime"}  # export only, never required
CONFIG_NEEDS = {"tensorboard"}  # train.json's TensorBoardStatsHandler, not a Python import of scripts/
ZOO_SECTIONS = ["Model Overview", "Data", "Training configuration", "Performance", "MONAI Bundle Commands",
                "References", "License"]  # fmt: skip


def _metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text(encoding="utf-8"))


def _zoo_form(text: str) -> str:
    # The zoo runs pre-commit-hooks' pretty-format-json with --no-sort-keys --indent=4 (no
    # --no-ensure-ascii); that hook is not a dependency here, and its whole rule is this line.
    return json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n"


def test_every_config_is_as_the_zoo_json_hook_writes_it():
    configs = sorted(CONFIGS.glob("*.json"))
    assert len(configs) >= 8
    texts = {p.name: p.read_text(encoding="utf-8") for p in configs}
    unformatted = [name for name, text in texts.items() if text != _zoo_form(text)]
    assert unformatted == [], f"not in pretty-format-json --no-sort-keys --indent=4 form: {unformatted}"


def test_zoo_form_catches_an_inline_array():
    expected = '{\n    "b": [\n        1,\n        2\n    ],\n    "a": "\\u00e9"\n}\n'
    assert _zoo_form('{"b": [1, 2], "a": "\u00e9"}') == expected  # key order kept, arrays opened, ASCII


def _imported_top_modules() -> set[str]:
    names = set()
    for path in (BUNDLE / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def _pinned() -> dict[str, str]:
    meta = _metadata()
    pins = {canonicalize_name(k): v for k, v in meta["required_packages_version"].items()}
    for name in ("monai", "pytorch", "numpy"):
        pins[canonicalize_name("torch" if name == "pytorch" else name)] = meta[f"{name}_version"]
    return pins


def _unconditional_requirements(dist: str) -> set[str]:
    reqs = [Requirement(r) for r in requires(dist) or []]
    return {canonicalize_name(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})}


def test_metadata_pins_every_package_the_bundle_imports():
    pins = _pinned()
    brought = set().union(*(_unconditional_requirements(d) for d in pins))  # e.g. imageio by scikit-image
    owners = packages_distributions()
    missing = {}
    for module in sorted(_imported_top_modules()):
        dists = {canonicalize_name(d) for d in owners.get(module, [module])}
        if not dists & (set(pins) | brought | OPTIONAL):
            missing[module] = sorted(dists)
    missing.update({d: [d] for d in CONFIG_NEEDS if d not in pins})
    assert missing == {}, f"imported but not in metadata.json's required_packages_version: {missing}"
    assert sorted(OPTIONAL & set(pins)) == [], "optional export packages are documented, not required"
    readme = README.read_text(encoding="utf-8")
    assert [d for d in ("onnx", "onnxruntime", "bioimageio.core") if f"`{d}`" not in readme] == []


def test_metadata_pins_lie_inside_the_project_ranges():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    outside = {d: v for d, v in _pinned().items() if d in ranges and not ranges[d].contains(Version(v))}
    assert outside == {}, f"pins outside pyproject.toml's ranges: {outside}"
    assert set(ranges) - set(_pinned()) == set(), "every project dependency is pinned for the zoo"


def test_metadata_name_is_a_display_name_and_monailabel_serves_a_url_name(tmp_path):
    bundle_copy = monailabel_module("bundle_copy")
    assert " " in _metadata()["name"]
    assert bundle_copy.bundle_name(BUNDLE) == "cryosxt_membrane_segmentation"  # docs/monailabel.md's
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"name": "- / -"}))
    with pytest.raises(bundle_copy.BundleError, match=r"metadata\.json: name '- / -'"):
        bundle_copy.bundle_name(tmp_path)


def test_readme_has_the_zoo_sections_and_stands_on_its_own():
    text = README.read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,3} (.+?)\s*$", text, flags=re.MULTILINE)
    assert [s for s in ZOO_SECTIONS if s not in headings] == []
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    outside = [t for t in local if not (README.parent / t).resolve().is_relative_to(BUNDLE.resolve())]
    assert outside == [], f"links to files outside the bundle: {outside}"
    assert [t for t in local if not (README.parent / t).exists()] == []
    assert "MONAI Label" in text and "monailabel/" in text


def test_metadata_passes_monais_own_schema_check(tmp_path):
    """The zoo's `verify_metadata` gate, offline: MONAI skips the download when the schema file exists."""
    import shutil

    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    shutil.copy(REPO / "tests" / "data" / "meta_schema_20240725.json", schema)
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["schema"].endswith("/meta_schema_20240725.json")
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))  # raises if invalid
    broken = {k: v for k, v in metadata.items() if k != "network_data_format"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))
