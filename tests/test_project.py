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
            "assert not missing, missing\n")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)

def test_bench_command_runs_demo():
    from fastai_hardmine.bench import run_demo, format_table
    rows = run_demo(epochs=1, bs=128)
    assert [r['arm'] for r in rows][0] == 'plain fastai'
    for r in rows:
        assert 0 < r['accuracy'] <= 1 and r['wall_s'] > 0 and r['valid_loss'] > 0
    assert rows[0]['kept_share'] == 1 and all(0 < r['kept_share'] < 1 for r in rows[1:])
    assert format_table(rows).count('\n') == len(rows) + 1
