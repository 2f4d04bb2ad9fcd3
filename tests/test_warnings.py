"""pytest turns deprecations reached through kava's calls into errors (pyproject
filterwarnings), so a coming removal fails CI before the release that removes it."""

import warnings

import pytest


def test_transformers_deprecate_kwarg_warnings_are_errors():
    msg = "`past_key_values` is deprecated and will be removed in version 5.40.0. Use `cache`"
    with pytest.raises(FutureWarning, match="will be removed in version 5.40.0"):
        warnings.warn(msg, FutureWarning, stacklevel=1)
