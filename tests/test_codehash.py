"""dpdm.codehash: the modules each command runs, derived from the imports.
(The reruns they cause are tested on a finished smoke run in test_workflow.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dpdm import codehash
from dpdm.artifacts import DPDMError
from helpers import REPO  # tests/helpers.py



def test_training_hashes_every_module_that_computes_its_gradients():
    mods = set(codehash.modules_of("train"))
    # privacy is a package: its modules (rows computes every per-example gradient) count as one.
    assert {"train", "privacy", "diffusion", "networks", "data", "config", "cli"} <= mods
    files = [f.name for f in codehash._module_files("privacy")]
    assert {"__init__.py", "rows.py", "per_example.py", "mechanism.py", "accounting.py"} <= set(files)
    assert not mods & {"bench", "report", "sampling", "fid", "classifiers"}


def test_commands_hash_only_what_they_import():
    assert set(codehash.modules_of("prepare")) == {"__init__", "__main__", "artifacts", "cli", "config", "data",
                                                   "devices", "errors", "layout", "memory", "registry"}
    for command in ("prepare", "fid-ref", "fid", "train", "sample", "classify", "judge-fit", "judge", "baseline",
                    "report", "report-ablation"):
        assert "bench" not in codehash.modules_of(command), command  # bench's options are built by bench only
    assert "bench" in codehash.modules_of("bench")
    assert "privacy" in codehash.modules_of("baseline")  # DP-SGD classifiers use the same accounting


def test_unknown_command_is_an_error():
    with pytest.raises(DPDMError, match="no command 'nope'"):
        codehash.modules_of("nope")


def test_the_hash_follows_a_new_import(tmp_path, monkeypatch):
    """In a copy of the package: sample does not import classifiers until a module
    starts to, and then its hash changes with classifiers.py."""
    pkg = tmp_path / "dpdm"
    shutil.copytree(REPO / "dpdm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codehash, "PACKAGE_DIR", pkg)
    codehash.modules_of.cache_clear()
    try:
        before = codehash.code_hash("sample")
        (pkg / "classifiers.py").write_text((pkg / "classifiers.py").read_text() + "\n# edited\n")
        assert codehash.code_hash("sample") == before
        sampling = pkg / "sampling.py"
        sampling.write_text(sampling.read_text() + "\n\ndef _late():\n    from dpdm import classifiers  # noqa\n")
        codehash.modules_of.cache_clear()
        assert "classifiers" in codehash.modules_of("sample") and codehash.code_hash("sample") != before
        # A module inside a sub-package changes its users' hash.
        train_before = codehash.code_hash("train")
        rows = pkg / "privacy" / "rows.py"
        rows.write_text(rows.read_text() + "\n# edited\n")
        assert codehash.code_hash("train") != train_before
    finally:
        codehash.modules_of.cache_clear()


def test_other_commands_do_not_import_bench():
    """`python -m dpdm prepare --help` must not load bench (and torch with it)."""
    code = ("import sys; from dpdm.cli import main\n"
            "try:\n    main(['prepare', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('dpdm.bench' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"], out


def test_tracked_files_have_portable_names():
    """No tracked file name holds ':', '\\', a newline or a quote (an accident once committed
    grep output as file names; such names break checkouts on Windows)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    bad = [n for n in names.split("\0") if any(c in n for c in ':\\\n"')]
    assert not bad, bad
