"""pytest turns deprecations reached through kava's calls into errors (pyproject
filterwarnings), so a coming removal fails CI before the release that removes it."""

import warnings

import pytest


def test_transformers_deprecate_kwarg_warnings_are_errors():
    msg = "`past_key_values` is deprecated and will be removed in version 5.40.0. Use `cache`"
    with pytest.raises(FutureWarning, match="will be removed in version 5.40.0"):
        warnings.warn(msg, FutureWarning, stacklevel=1)


def test_building_a_backbone_warns_nothing(make_backbone):
    """Every training run builds one: peft's read of a property transformers 5 deprecated
    is silenced at that call, so users' logs carry only warnings meant for them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_backbone()
    assert [str(w.message) for w in caught] == []
