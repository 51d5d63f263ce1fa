"""`python -m service --help`, generated from the Settings fields: every flag with its variable, default and values."""

from __future__ import annotations

import argparse
import re

import pytest
from pydantic import Field, ValidationError

from service.app.settings import Settings, allowed_values, build_parser, env_var, parse_settings, setting_help


def _help_of(flag: str, text: str) -> str:
    """The block of `--help` output that documents flag: from its line up to the next flag's."""
    match = re.search(rf"^  {re.escape(flag)}(?=[ \n]).*?(?=^  --|^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{flag} missing from --help"
    return " ".join(match.group(0).split())  # argparse wraps at the terminal's width


@pytest.fixture(scope="module")
def help_text() -> str:
    return build_parser().format_help()


def test_every_setting_shows_flag_env_default_and_values(help_text: str) -> None:
    for name, field in Settings.model_fields.items():
        block = _help_of("--" + name.replace("_", "-"), help_text)
        assert f"env ATTNSERVE_{name.upper()};" in block, block
        assert "default " in block, block
        allowed = allowed_values(field)
        if allowed is not None:
            assert allowed in block, block


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        ("grpc_port", "[env ATTNSERVE_GRPC_PORT; default 8001; integer 0..65535]"),
        ("provider", "[env ATTNSERVE_PROVIDER; default auto; one of auto, cpu, cuda]"),
        ("reuse_port", "[env ATTNSERVE_REUSE_PORT; default false; true or false]"),
        ("health_port", "[env ATTNSERVE_HEALTH_PORT; default unset; integer 0..65535]"),
        ("body_timeout_s", "[env ATTNSERVE_BODY_TIMEOUT_S; default 10.0; number > 0]"),
        ("max_batch_padding", "[env ATTNSERVE_MAX_BATCH_PADDING; default 0.15; number 0..1]"),
        ("engine_workers", "[env ATTNSERVE_ENGINE_WORKERS; default 0; integer >= 0]"),
        ("metrics_host", '[env ATTNSERVE_METRICS_HOST; default ""]'),
        ("tls_cert", "[env ATTNSERVE_TLS_CERT; default unset]"),
        ("log_format", "[env ATTNSERVE_LOG_FORMAT; default text; one of text, json]"),
    ],
)
def test_help_line_of_each_kind_of_setting(name: str, facts: str) -> None:
    description, last = setting_help(name, Settings.model_fields[name]).split("\n")
    assert description == Settings.model_fields[name].description and last == facts


def test_closed_sets_show_their_values_in_usage(help_text: str) -> None:
    assert "--provider {auto,cpu,cuda}" in help_text and "--reuse-port {true,false}" in help_text
    assert "--grpc-port INT" in help_text and "--model-dir PATH" in help_text


def test_env_var_follows_the_prefix() -> None:
    assert env_var("grpc_port") == "ATTNSERVE_GRPC_PORT"


def test_a_percent_in_a_description_does_not_break_help() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--padding", help=setting_help("padding", Field(0.15, description="at most 15%")))
    assert "at most 15% [env ATTNSERVE_PADDING; default 0.15]" in " ".join(parser.format_help().split())


def test_log_settings_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (parse_settings([]).log_format, parse_settings([]).log_level) == ("text", "INFO")
    monkeypatch.setenv("ATTNSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("ATTNSERVE_LOG_LEVEL", "debug")  # any case, as before it had a fixed set of values
    assert (parse_settings([]).log_format, parse_settings([]).log_level) == ("json", "DEBUG")
    with pytest.raises(ValidationError, match="log_format"):
        parse_settings(["--log-format", "xml"])
    with pytest.raises(ValidationError, match="log_level"):
        parse_settings(["--log-level", "verbose"])
