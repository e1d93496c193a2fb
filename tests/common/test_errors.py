"""Tests for common/errors.py: one exception tree, each class with a documented exit code."""

from __future__ import annotations

import re

import pytest

from fedvault.common import errors
from fedvault.common.errors import (
    ERROR_CLASSES,
    EXIT_CODES,
    ConfigError,
    FedvaultError,
    PrivacyBudgetExceeded,
)

pytestmark = pytest.mark.unit


def all_subclasses(cls: type) -> set[type]:
    found: set[type] = set(cls.__subclasses__())
    for sub in list(found):
        found |= all_subclasses(sub)
    return found


def test_error_classes_lists_the_whole_tree() -> None:
    assert set(ERROR_CLASSES) == {FedvaultError} | all_subclasses(FedvaultError)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_has_an_exit_code_with_help_text(cls: type[FedvaultError]) -> None:
    assert EXIT_CODES.get(cls.exit_code, "").strip()


def test_exit_codes_are_unique_across_classes() -> None:
    codes = [cls.exit_code for cls in ERROR_CLASSES]

    assert len(codes) == len(set(codes))


def test_exit_codes_include_success_usage_and_interrupt_apart_from_the_errors() -> None:
    assert {0, 2, 130} <= EXIT_CODES.keys()
    assert not {0, 2, 130} & {cls.exit_code for cls in ERROR_CLASSES}
    assert all(text.strip() for text in EXIT_CODES.values())


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_the_drawn_tree_in_the_docstring_matches_the_codes(cls: type[FedvaultError]) -> None:
    doc = errors.__doc__ or ""

    assert re.search(rf"{cls.__name__}\s+\(exit {cls.exit_code}\)", doc)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_has_a_default_hint(cls: type[FedvaultError]) -> None:
    err = cls("something went wrong")

    assert str(err) == "something went wrong"
    assert err.hint == cls.default_hint
    assert err.hint.strip()
    assert isinstance(err, FedvaultError)


def test_an_explicit_hint_replaces_the_default() -> None:
    err = PrivacyBudgetExceeded("epsilon spent", hint="Raise the target.")

    assert err.hint == "Raise the target."


def test_catching_the_base_class_catches_a_config_error() -> None:
    with pytest.raises(FedvaultError) as info:
        raise ConfigError("bad value")

    assert info.value.exit_code == 3
