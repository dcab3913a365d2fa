"""pyproject's dependency floors against constraints.txt (the exact versions CI tested) and the installed packages."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def test_every_dependency_has_a_floor_and_ci_tests_a_version_it_admits():
    pins = constraints()
    for requirement in requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        floors = [spec for spec in requirement.specifier if spec.operator == ">="]
        assert floors, f"{requirement}: no '>=' floor"
        assert name in pins, f"{requirement.name} is missing from constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"


def test_the_installed_packages_are_the_constrained_ones():
    pins = constraints()
    for requirement in requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert Version(metadata.version(requirement.name)) == pins[name], f"{name} installed differs from constraints.txt"
