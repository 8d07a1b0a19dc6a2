"""The locks agree with pyproject.toml and with each other, production's carries no demo or test
package, and the suite runs on exactly what the dev lock pins."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.processes import ROOT

PRODUCTION = ROOT / "requirements" / "production.txt"
DEV = ROOT / "requirements" / "dev.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(lock: Path) -> dict[str, Requirement]:
    """`name==version ; marker` of every package the lock pins, by canonical name."""
    found = {}
    for line in lock.read_text().splitlines():
        if line[:1].isalnum():
            requirement = Requirement(line.rstrip(" \\"))
            found[canonicalize_name(requirement.name)] = requirement
    return found


def version(pin: Requirement) -> Version:
    [spec] = pin.specifier
    assert spec.operator == "==", pin
    return Version(spec.version)


def wanted(*extras: str) -> list[Requirement]:
    names = [*PROJECT["dependencies"]]
    for extra in extras:
        names += PROJECT["optional-dependencies"][extra]
    return [Requirement(name) for name in names]


def test_every_lock_line_is_an_exact_pin_with_hashes() -> None:
    for lock in (PRODUCTION, DEV):
        text = lock.read_text()
        assert "make lock" in text.splitlines()[1], f"{lock.name} was not written by make lock"
        entries = text.split("\n")
        starts = [i for i, line in enumerate(entries) if line[:1].isalnum()]
        for i in starts:
            assert entries[i + 1].strip().startswith("--hash=sha256:"), entries[i]
        assert {version(pin) for pin in pins(lock).values()}


def test_production_lock_satisfies_the_production_ranges() -> None:
    locked = pins(PRODUCTION)
    for requirement in wanted():
        pin = locked.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in {PRODUCTION.name}: make lock"
        assert requirement.specifier.contains(version(pin)), (requirement, pin)


def test_dev_lock_is_production_plus_the_extras_at_the_same_pins() -> None:
    production, dev = pins(PRODUCTION), pins(DEV)
    for name, pin in production.items():
        assert name in dev and version(dev[name]) == version(pin), name
    for requirement in wanted("demo", "test"):
        pin = dev.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in {DEV.name}: make lock"
        assert requirement.specifier.contains(version(pin)), (requirement, pin)


def test_production_carries_no_demo_or_test_package() -> None:
    production = pins(PRODUCTION)
    for requirement in wanted("demo", "test")[len(PROJECT["dependencies"]) :]:
        assert canonicalize_name(requirement.name) not in production, requirement.name


def test_the_suite_runs_on_the_dev_lock() -> None:
    drift = {}
    for name, pin in pins(DEV).items():
        if pin.marker is None or pin.marker.evaluate():
            installed = Version(metadata.version(name))
            if installed != version(pin):
                drift[name] = f"{installed} installed, {version(pin)} locked"
    assert drift == {}, f"run `make install`: {drift}"


def test_tools_that_fail_the_build_and_internals_we_touch_are_pinned_tight() -> None:
    ranges = {canonicalize_name(r.name): r.specifier for r in wanted("demo", "test")}
    locked = pins(DEV)

    def admits(name: str, text: str) -> bool:
        return ranges[name].contains(text, prereleases=True)

    ruff = version(locked["ruff"])
    assert str(ranges["ruff"]) == f"=={ruff}"  # a new lint rule is a commit, never a surprise
    for name in ("kombu", "celery", "prometheus-client"):  # private internals overridden
        current = version(locked[name])
        assert not admits(name, f"{current.major}.{current.minor + 1}.0"), name
    stripe = version(locked["stripe"]).major  # one major: one Stripe API version
    assert not admits("stripe", f"{stripe + 1}.0.0")
    assert not admits("stripe", f"{stripe - 1}.99.0")
