"""pytest plugin for flex-oracle: Hypothesis profiles, target choice and one GPU per xdist worker.

Installed projects get it through the ``pytest11`` entry point ``flex_oracle``;
the repository's ``conftest.py`` loads it from the source tree otherwise.

Profiles (``--hypothesis-profile NAME``, or ``FLEX_ORACLE_PROFILE=NAME``):

* ``dev``: the default on a workstation; no deadline, failing cases printed
  as replayable blobs, the example database kept in ``.hypothesis/``.
* ``ci``: derandomized, 25 examples per property, no database (xdist workers
  then share no mutable files); loaded whenever ``CI`` is set.
* ``nightly``: 2000 examples per property.

Precedence: ``--hypothesis-profile``, then ``FLEX_ORACLE_PROFILE``, then ``ci``
when ``CI`` is set, then ``dev``. ``--flex-examples N`` overrides
``max_examples`` on top of whichever profile is loaded.

Nothing here imports Triton, and torch is imported only when a worker picks
its GPU.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.errors import InvalidArgument

PROFILE_ENV = "FLEX_ORACLE_PROFILE"
PROFILES = ("dev", "ci", "nightly")
DEFAULT_TARGET = "kernels"

_base = settings.get_profile("default")
settings.register_profile("dev", parent=_base, deadline=None, print_blob=True)
settings.register_profile(
    "ci",
    parent=_base,
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly", parent=_base, max_examples=2000, deadline=None, print_blob=True
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flex-oracle")
    group.addoption(
        "--flex-target",
        default=DEFAULT_TARGET,
        metavar="NAME|MODULE:FUNCTION",
        help=f"implementation the properties check against the oracle (default: {DEFAULT_TARGET}).",
    )
    group.addoption(
        "--flex-examples",
        type=int,
        default=None,
        metavar="N",
        help="override the Hypothesis profile's max_examples for every property.",
    )
    group.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (minutes of CPU time each).",
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def profile_to_load(explicit: str | None) -> str | None:
    """The profile this plugin should load, or None when ``--hypothesis-profile`` decides."""
    if explicit:
        return None
    named = os.environ.get(PROFILE_ENV, "").strip()
    if named:
        return named
    return "ci" if _env_flag("CI") else "dev"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # tryfirst: Hypothesis's own pytest_configure then derives its verbosity and
    # explain profiles from the profile chosen here rather than replacing it.
    target = config.getoption("flex_target")
    module, sep, function = target.partition(":")
    if not module or (sep and not function):
        raise pytest.UsageError(
            f"Expected --flex-target to be a target name or module:function, got {target!r}."
        )
    examples = config.getoption("flex_examples")
    if examples is not None and examples < 1:
        raise pytest.UsageError(f"Expected --flex-examples to be at least 1, got {examples}.")

    name = profile_to_load(config.getoption("hypothesis_profile", default=None))
    if name is None:
        return
    try:
        settings.load_profile(name)
    except InvalidArgument as exc:
        raise pytest.UsageError(
            f"Expected {PROFILE_ENV} to name a Hypothesis profile ({', '.join(PROFILES)}), "
            f"got {name!r}."
        ) from exc


def pytest_sessionstart(session: pytest.Session) -> None:
    # Every plugin has configured Hypothesis by now and no test module has been
    # imported yet, so this applies to every @settings made at import time.
    examples = session.config.getoption("flex_examples")
    if examples is not None:
        current = settings.get_current_profile_name()
        name = f"{current}-with-{examples}-examples"
        settings.register_profile(name, parent=settings.get_profile(current), max_examples=examples)
        settings.load_profile(name)


def pytest_report_header(config: pytest.Config) -> str:
    target = config.getoption("flex_target")
    profile = settings.get_current_profile_name()
    interpret = os.environ.get("TRITON_INTERPRET") or "unset"
    return (
        f"flex-oracle: target {target!r}, hypothesis profile {profile!r} "
        f"({settings.default.max_examples} examples), TRITON_INTERPRET={interpret}"
    )


@pytest.fixture(scope="session")
def flex_target(pytestconfig: pytest.Config) -> str:
    """The implementation under test: a target name or ``module:function`` (``--flex-target``)."""
    return pytestconfig.getoption("flex_target")


@pytest.fixture(scope="session")
def flex_examples(pytestconfig: pytest.Config) -> int:
    """Examples per property: ``--flex-examples`` if given, else the loaded profile's max_examples."""
    examples = pytestconfig.getoption("flex_examples")
    return examples if examples is not None else settings.default.max_examples


def worker_device(worker_id: str, device_count: int) -> int:
    """The GPU index for xdist worker ``gwN``: workers are spread round-robin over the GPUs."""
    return int(worker_id[2:]) % device_count


@pytest.fixture(scope="session", autouse=True)
def _flex_worker_gpu() -> None:
    worker_id = os.environ.get("PYTEST_XDIST_WORKER")
    if worker_id is None:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(worker_device(worker_id, torch.cuda.device_count()))
