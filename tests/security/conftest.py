"""Fixtures shared by the security tests: a run's worker CA and a stranger's."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos_operator.federation.workerca import WorkerCA


@pytest.fixture
def ca(tmp_path: Path) -> WorkerCA:
    """The run's worker CA (party `local`), as `chaos run` makes one."""
    return WorkerCA(tmp_path / "run-ca", "local")


@pytest.fixture
def other_ca(tmp_path: Path) -> WorkerCA:
    """Another CA of the same party name that nobody here trusts."""
    return WorkerCA(tmp_path / "other-ca", "local")
