"""The public API is exactly what `coop.__all__` says."""

import coop


def test_all_names_exist_and_are_sorted() -> None:
    assert list(coop.__all__) == sorted(coop.__all__)
    for name in coop.__all__:
        assert hasattr(coop, name), name
