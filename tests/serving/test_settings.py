"""The service's settings: defaults, the ``MLSD_*`` variables, and refusals that name them."""

from __future__ import annotations

import sys

import pytest

from mlsd.serving.settings import ServiceSettings


def test_settings_from_env() -> None:
    assert ServiceSettings.from_env({}) == ServiceSettings(
        admin_token=None, max_k=100, default_k=10
    )
    env = {"MLSD_ADMIN_TOKEN": "t", "MLSD_MAX_K": "50", "MLSD_DEFAULT_K": "5"}
    assert ServiceSettings.from_env(env) == ServiceSettings(admin_token="t", max_k=50, default_k=5)
    with pytest.raises(ValueError, match="MLSD_MAX_K must be an integer, got 'lots'"):
        ServiceSettings.from_env({"MLSD_MAX_K": "lots"})
    with pytest.raises(ValueError, match="MLSD_DEFAULT_K must be in"):
        ServiceSettings.from_env({"MLSD_MAX_K": "5", "MLSD_DEFAULT_K": "10"})
    assert ServiceSettings.from_env({"MLSD_MODEL_THREADS": "3"}).model_threads == 3
    with pytest.raises(ValueError, match="MLSD_MODEL_THREADS must be at least 1, got 0"):
        ServiceSettings.from_env({"MLSD_MODEL_THREADS": "0"})
    with pytest.raises(ValueError, match="MLSD_GIL_SWITCH_MS must be a number, got 'fast'"):
        ServiceSettings.from_env({"MLSD_GIL_SWITCH_MS": "fast"})
    with pytest.raises(ValueError, match=r"MLSD_GIL_SWITCH_MS must be in \(0, 1000\], got 0"):
        ServiceSettings.from_env({"MLSD_GIL_SWITCH_MS": "0"})


def test_the_gil_switch_interval_is_set_for_the_process_only_when_asked() -> None:
    before = sys.getswitchinterval()
    try:
        ServiceSettings.from_env({}).apply_to_process()
        assert sys.getswitchinterval() == before
        ServiceSettings.from_env({"MLSD_GIL_SWITCH_MS": "0.5"}).apply_to_process()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("token", ["s3cret-töken", "tok\ten", " padded", "line\n"])
def test_an_admin_token_no_header_can_carry_is_refused_at_startup(token: str) -> None:
    with pytest.raises(ValueError, match="MLSD_ADMIN_TOKEN must be printable ASCII") as info:
        ServiceSettings.from_env({"MLSD_ADMIN_TOKEN": token})
    assert token not in str(info.value)  # a secret
    assert ServiceSettings.from_env({"MLSD_ADMIN_TOKEN": "a b~c"}).admin_token == "a b~c"


def test_the_body_limit_setting() -> None:
    assert ServiceSettings.from_env({}).max_body_bytes == 4 * 1024 * 1024
    assert ServiceSettings.from_env({"MLSD_MAX_BODY_BYTES": "5000"}).max_body_bytes == 5000
    with pytest.raises(ValueError, match="MLSD_MAX_BODY_BYTES must be an integer, got '2MB'"):
        ServiceSettings.from_env({"MLSD_MAX_BODY_BYTES": "2MB"})
    with pytest.raises(ValueError, match="MLSD_MAX_BODY_BYTES must be at least 1, got 0"):
        ServiceSettings.from_env({"MLSD_MAX_BODY_BYTES": "0"})


def test_the_ui_setting_is_off_unless_asked() -> None:
    assert ServiceSettings.from_env({}).ui is False
    for word in ("1", "true", "Yes", "ON"):
        assert ServiceSettings.from_env({"MLSD_UI": word}).ui is True
    for word in ("0", "false", "No", "off", " "):
        assert ServiceSettings.from_env({"MLSD_UI": word}).ui is False
    with pytest.raises(ValueError, match=r"MLSD_UI must be one of 1, on, .*, got 'enabled'"):
        ServiceSettings.from_env({"MLSD_UI": "enabled"})
