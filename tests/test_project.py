"Project wiring: mirrors in step with their sources, the public API, the command line."
import subprocess, sys
from pathlib import Path
import pytest
from sync_files import MIRRORS, ROOT

@pytest.mark.parametrize('name', sorted(MIRRORS))
def test_mirror_up_to_date(name):
    assert (ROOT/name).read_text() == MIRRORS[name](), f"{name} has drifted from its source: run `python tests/sync_files.py`"

def test_settings_ini_mirrors_pyproject_keys():
    import configparser, tomllib
    ini = configparser.ConfigParser()
    ini.read_string(MIRRORS['settings.ini']())
    d, proj = ini['DEFAULT'], tomllib.loads((ROOT/'pyproject.toml').read_text())['project']
    assert d['lib_name'] == proj['name'] == 'fastai_hardmine'
    assert d['lib_path'] == 'fastai_hardmine' and d['nbs_path'] == 'nbs' and d['doc_path'] == '_docs'
    assert d['requirements'].split() == proj['dependencies']
    import fastai_hardmine
    assert d['version'] == fastai_hardmine.__version__

def test_all_exposes_public_api():
    code = ("from fastai_hardmine.all import *\n"
            "names = ['BatchLossFilterCallback', 'TopKCallback', 'SelectiveBackpropCallback', 'HardMiningCallback',\n"
            "         'per_sample_loss', 'select_loss_fraction', 'select_top_k', 'selective_backprop_probs', 'Learner']\n"
            "missing = [n for n in names if n not in globals()]\n"
            "missing += [m for m in ('batch_loss_filter', 'top_k', 'selective_backprop') if not hasattr(Learner, m)]\n"
            "assert not missing, missing\n"
            # what a user calls, not the helpers behind it (which stay importable from their modules)
            "brought = [n for n in globals() if not n.startswith('__')]\n"
            "generic = [n for n in ('batch_size', 'smoothed', 'below_mean', 'check_flag', 'MODES', 'bucket_count') if n in brought]\n"
            "assert not generic and len(brought) <= 25, (generic, len(brought))\n"
            "from fastai_hardmine.core import batch_size, check_flag, bucket_count\n")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)

def test_bench_command_runs_demo():
    "`python -m fastai_hardmine.bench` is the `hardmine-bench` command (tests/test_bench.py runs its tasks)"
    r = subprocess.run([sys.executable, '-m', 'fastai_hardmine.bench', '--help'], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.startswith('usage: hardmine-bench') and '--quick' in r.stdout and '--task' in r.stdout
    from fastai_hardmine.bench import main
    import inspect
    assert 'argv' in inspect.signature(main).parameters

def test_readme_works_where_pypi_shows_it():
    "The README is the package's description on PyPI: no link relative to the repository, and the license it names ships"
    import re, tomllib
    from sync_files import without_relative_links
    readme = (ROOT/'README.md').read_text()
    assert not re.findall(r'(?<!!)\[[^\]]+\]\((?!https?://|#)[^)]+\)', readme)
    assert without_relative_links('see [the results](nbs/results.md), [arXiv](https://arxiv.org/abs/1)') == \
        'see the results (`nbs/results.md`), [arXiv](https://arxiv.org/abs/1)'
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']
    assert cfg['license'] == 'Apache-2.0' and cfg['license-files'] == ['LICENSE']
    assert (ROOT/'LICENSE').read_text().lstrip().startswith('Apache License\n')
