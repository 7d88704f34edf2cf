"""Settings that are read, and only those: the one list of DG_* variables (protocol/environment.py) is exactly what
the processes' settings classes read, the deployment files set nothing outside it, and a name outside it stops
a process at start-up (tests/test_runner.py runs the worker so)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices, ValidationError

from protocol import environment
from service.settings import GatewaySettings
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml")


def env_names(settings_class) -> set[str]:
    """The DG_* variables a pydantic-settings class reads (its fields under the DG_ prefix, or their aliases)."""
    names = set()
    for name, field in settings_class.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else [f"DG_{name.upper()}"]
        names |= {c for c in choices if isinstance(c, str) and c.startswith("DG_")}
    return names


def test_the_list_is_what_the_settings_classes_read():
    assert env_names(GatewaySettings) == environment.GATEWAY
    assert env_names(WorkerSettings) == environment.WORKER


def test_the_deployment_files_set_only_variables_a_process_reads():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    blocks = [s.get("environment") or {} for s in compose["services"].values()]
    blocks += [v for k, v in compose.items() if k.startswith("x-") and isinstance(v, dict)]
    set_by_compose = {name for block in blocks for name in block if name.startswith("DG_")}
    templates = [f for f in (REPO / "helm" / "dgserve" / "templates").rglob("*") if f.is_file()]
    set_by_chart = {m for f in templates for m in re.findall(r"\bDG_[A-Z0-9_]+\b", f.read_text())}
    assert set_by_compose and set_by_chart
    assert set_by_compose - environment.KNOWN == set() and set_by_chart - environment.KNOWN == set()


@pytest.mark.parametrize("settings_class", [GatewaySettings, WorkerSettings])
def test_a_dg_variable_no_process_reads_is_an_error_naming_it(settings_class, monkeypatch):
    monkeypatch.setenv("DG_MAX_BATCHES", "4")  # a typo of the worker's DG_MAX_BATCH: the gateway refuses it too
    monkeypatch.setenv("dg_port", "8001")  # settings are read without regard to case: this one is DG_PORT
    with pytest.raises(ValidationError) as err:
        settings_class()
    [line] = environment.describe(err.value)
    assert line.startswith("DG_MAX_BATCHES (did you mean DG_MAX_BATCH?)") and "dg_port" not in line
    monkeypatch.delenv("DG_MAX_BATCHES")
    settings_class()  # every other variable is one some process reads
