"""tests/conftest.py's rule: under CI a skip fails the run, unless the machine cannot run the
test."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

SKIPS = '''
import pytest

def test_missing_package():
    pytest.skip("the torchvision reference tests need torch")

@pytest.mark.skipif(True, reason="the kernel's huge pages are off")
def test_machine_without_huge_pages():
    pass
'''


def run_pytest(directory: Path, ci: str) -> tuple[int, dict[str, str]]:
    """The exit status of a pytest run of ``directory`` with the environment's CI, and each
    test's outcome (passed, failure or skipped) from its JUnit XML report."""
    report = directory / "report.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           f"--junitxml={report}", str(directory)], cwd=directory,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CI": ci})
    cases = ElementTree.parse(report).getroot().iter("testcase")
    return done.returncode, {case.get("name"): next((child.tag for child in case), "passed")
                             for case in cases}


@pytest.fixture
def suite(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_skips.py").write_text(SKIPS)
    return tmp_path


def test_under_ci_a_skip_fails_unless_the_machine_cannot_run_the_test(suite):
    assert run_pytest(suite, ci="1") == (1, {"test_missing_package": "failure",
                                             "test_machine_without_huge_pages": "skipped"})


def test_outside_ci_every_skip_passes(suite):
    assert run_pytest(suite, ci="") == (0, {"test_missing_package": "skipped",
                                            "test_machine_without_huge_pages": "skipped"})
