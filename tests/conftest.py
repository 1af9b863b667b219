"""Shared pytest configuration for relattn's tests.

* Hypothesis profiles: ``default`` and ``ci`` (25 examples), ``thorough`` (300),
  chosen with the ``HYPOTHESIS_PROFILE`` environment variable.
* The ``backend`` fixture runs a test once per entry of
  ``relattn.backends.names()`` and skips, with the backend's own reason, the
  ones this machine cannot run. Adding a backend to that list adds it to every
  backend-parametrized test; nothing here needs to change.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("default", max_examples=25, **_COMMON)
settings.register_profile("ci", max_examples=25, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _backend_names():
    """Backend names for parametrization; never raises (collection must work)."""
    try:
        from relattn.backends import names
        return list(names())
    except Exception as exc:  # library missing or broken: report it per test
        return [f"<relattn.backends unimportable: {type(exc).__name__}: {exc}>"]


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_names(), indirect=True, scope="session")


@pytest.fixture(scope="session")  # session: stateless, and safe under @given
def backend(request):
    """A backend name usable with ``relattn.rel_pos_attention(..., backend=...)``."""
    name = request.param
    if name.startswith("<"):
        pytest.fail(name)
    import relattn.backends

    module = relattn.backends.get(name)  # an import error here is a library bug
    reason = module.unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name
