"""The CPU speed layer's switches (models/cpu/switches.py): a value a switch does not take is
refused in one line, and no code outside that module reads a TRANSFERLAB_* variable."""

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

from models.cpu import dispatch, native, switches
from tests.cpu.test_dispatch import NHWC

ROOT = Path(__file__).parents[2]
# A variable the benchmark sets for its own child processes: no switch of the user's.
PRIVATE = {"TRANSFERLAB_BENCH_TURN_STEPS"}
# env.get("TRANSFERLAB_…"), os.getenv(…), env["TRANSFERLAB_…"], but not an assignment
READ = re.compile(r"""(?:\.get\(|getenv\(|\[)\s*["'](TRANSFERLAB_\w+)["']\s*"""
                  r"""(?:[,)]|\](?!\s*=[^=]))""")


def winograd_choice():
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
    return dispatch.conv_kernel(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


@pytest.mark.parametrize("name,read", [("TRANSFERLAB_NATIVE", native.enabled),
                                       ("TRANSFERLAB_MKL", native.uses_mkl),
                                       ("TRANSFERLAB_WINOGRAD", winograd_choice)])
def test_a_value_a_switch_does_not_take_is_refused_in_one_line(name, read, monkeypatch):
    if name == "TRANSFERLAB_WINOGRAD":
        monkeypatch.setattr(native, "enabled", lambda: True)
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=rf"^{name}='yes': set it to '[^\n]*\)\.$"):
        read()


def test_every_switch_takes_its_default():
    for switch in switches.SWITCHES.values():
        assert switches.value(switch.name, {}) == switch.default


def test_no_code_outside_the_switches_reads_a_transferlab_variable():
    reads = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", ".venv") or relative == Path("models/cpu/switches.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            reads += [f"{relative}:{number}: {name}" for name in READ.findall(line)
                      if name not in PRIVATE]
    assert not reads, "read through models.cpu.switches instead:\n" + "\n".join(reads)
