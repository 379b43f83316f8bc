"""Mirrors kept in step with their sources: settings.ini from pyproject.toml, README.md from nbs/index.ipynb.

`python tests/sync_files.py` rewrites both; `tests/test_project.py` fails when either has drifted.
"""
import json, re, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render_settings_ini(root=ROOT) -> str:
    "nbdev's settings as a settings.ini, from pyproject.toml's `[project]` and `[tool.nbdev]`"
    cfg = tomllib.loads((root/'pyproject.toml').read_text())
    proj, nbdev = cfg['project'], cfg['tool']['nbdev']
    version = next(l.split('=')[1].strip().strip('"\'') for l in (root/nbdev['lib_path']/'__init__.py').read_text().splitlines()
                   if l.startswith('__version__'))
    # no public repository or hosted site yet: without `[project.urls]` nbdev links pages and sources relatively
    urls = proj.get('urls', {})
    repo_url, repo = urls.get('Repository', '').rstrip('/'), proj['name']
    user = repo_url.split('/')[-2] if repo_url else ''
    doc_host = urls['Documentation'].split('/' + repo)[0] if 'Documentation' in urls else ''
    author = proj['authors'][0]
    keys = dict(
        repo=repo, lib_name=proj['name'], version=version, min_python=proj['requires-python'].lstrip('>='),
        license=proj['license'], description=proj['description'], keywords=' '.join(proj['keywords']),
        author=author['name'], author_email=author['email'], user=user, branch=nbdev.get('branch', 'main'),
        git_url=repo_url, doc_host=doc_host, doc_baseurl=f'/{repo}' if doc_host else '/',
        title=nbdev.get('title', proj['name']), lib_path=nbdev['lib_path'], nbs_path=nbdev['nbs_path'],
        doc_path=nbdev['doc_path'], recursive='True', tst_flags='notest', put_version_in_init='True',
        requirements=' '.join(proj['dependencies']),
        dev_requirements=' '.join(proj['optional-dependencies']['dev']),
        console_scripts=' '.join(f'{k}={v}' for k, v in proj['scripts'].items()))
    head = ("# Mirror of pyproject.toml's nbdev settings for tools that still read settings.ini.\n"
            "# Do not edit: run `python tests/sync_files.py` (tests/test_project.py fails on drift).\n")
    return head + '[DEFAULT]\n' + ''.join(f'{k} = {v}\n' for k, v in keys.items() if v != '')

def without_relative_links(md:str) -> str:
    "Markdown whose links to the repository's own files (`[results](nbs/results.md)`) name the file instead: `results (nbs/results.md)`"
    # PyPI shows the README as the package's description, where a link relative to the repository leads nowhere;
    # the home page of the docs site, rendered from the notebook itself, keeps them as links
    return re.sub(r'(?<!!)\[([^\]]+)\]\((?!https?://|#)([^)\s]+)\)', r'\1 (`\2`)', md)

def render_readme(root=ROOT) -> str:
    "README.md: the markdown and visible code cells of nbs/index.ipynb, with no link relative to the repository"
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide'): continue
        parts.append(without_relative_links(src) if c['cell_type'] == 'markdown' else f'```python\n{src}\n```')
    return '<!-- Generated from nbs/index.ipynb by tests/sync_files.py: edit the notebook, not this file. -->\n\n' \
           + '\n\n'.join(parts) + '\n'

MIRRORS = {'settings.ini': render_settings_ini, 'README.md': render_readme}

if __name__ == '__main__':
    for name, render in MIRRORS.items():
        (ROOT/name).write_text(render())
        print(f'wrote {name}')
    sys.exit(0)
