"""bounded_repr: user values in error messages are cut to ~80 characters, whatever their size or type."""

from sam_fast._text import LIMIT, bounded_repr


class _BrokenRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def test_short_values_are_plain_reprs():
    assert [bounded_repr(v) for v in (3, 1e8, None, True, "float7", [1, 2])] == \
        ["3", "100000000.0", "None", "True", "'float7'", "[1, 2]"]


def test_huge_values_print_at_most_the_limit():
    assert LIMIT == 80
    big = bounded_repr("x" * 10**7)
    assert len(big) <= 80 and big.startswith("'xxx") and "..." in big
    assert len(bounded_repr(list(range(10**6)))) <= 80
    assert len(bounded_repr({"a": ["y" * 10**6] * 10**3})) <= 80
    assert bounded_repr(10**5000) == f"<an integer of {(10**5000).bit_length()} bits>"  # str() of it fails in 3.11+
    assert bounded_repr(_BrokenRepr()).startswith("<_BrokenRepr")  # a failing __repr__ still gives a message
    assert len(bounded_repr("z" * 500, limit=20)) == 20
