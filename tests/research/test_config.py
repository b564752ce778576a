import pytest

from research import config
from research.errors import ConfigError


def test_brackets_and_commas_inside_quotes_belong_to_the_value():
    pairs = config.split_pairs("freeze.regex=('c1/(',),b=\"x,\\\"y)\",c=head/.*,d=[1,(2,3)]")
    assert pairs == [("freeze.regex", ("c1/(",)), ("b", 'x,"y)'), ("c", "head/.*"),
                     ("d", [1, (2, 3)])]


def test_an_override_after_a_quoted_bracket_is_applied(make_config):
    cfg = make_config("fashion_mnist.py", "freeze.regex=('c1/(',),freeze.depth=2")
    assert cfg.freeze.regex == ("c1/(",) and cfg.freeze.depth == 2


@pytest.mark.parametrize("arg, match", [("a=(1,2", r"bracket '\(' is never closed"),
                                        ("a=1)", r"'\)' at character 4 closes no bracket"),
                                        ("a=(1]", r"'\]' at character 5 closes no bracket"),
                                        ("a='x,b=2", "quote ' is never closed")])
def test_what_cannot_be_parsed_is_refused_in_one_line(arg, match):
    with pytest.raises(ConfigError, match=match) as error:
        config.split_pairs(arg)
    assert "\n" not in str(error.value)
