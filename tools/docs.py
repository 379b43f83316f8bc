"""Build the documentation site from the notebooks, and check it in a headless browser.

    python tools/docs.py build     # the site, in _docs/ (open _docs/index.html)
    python tools/docs.py check     # every page in headless Chromium: pages load, links resolve, images load,
                                   # no traceback; screenshots in _docs_check/
    python tools/docs.py serve     # build, then serve _docs/ on http://localhost:8000
    python tools/docs.py run NB    # run a notebook and save the outputs its page shows (plots, tables), for the pages
                                   # whose examples are too slow to run at each build (nbs/19_diagnostics.ipynb)

The build starts from nbdev's own processing of the notebooks (`nbdev.serve.proc_nbs`: hidden cells dropped, `show_doc`
rendered, cross-links made), as `nbdev-docs` does before Quarto renders. Quarto cannot be installed from the package
registries this project reaches, so the processed notebooks are rendered with MkDocs, Material for MkDocs and
mkdocs-jupyter instead, which install with pip (`pip install -e ".[docs]"`): they give navigation across pages, search,
the API reference as `show_doc` wrote it, and plots as images, with no Quarto and no network. A user who has Quarto can
still run `nbdev-docs`: the nbdev settings in pyproject.toml are the usual ones.

What the build adds to nbdev's output: each page is named after its module (`records.html`), as nbdev names it;
cross-links are made relative to the site; each `show_doc` source link points to a highlighted copy of the module in
the site (`src/records.html#L-21`), since the package has no public repository to link to.
"""
from __future__ import annotations
import argparse, functools, http.server, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE, STAGE, SHOTS = ROOT/'_docs', ROOT/'_proc'/'_site_src', ROOT/'_docs_check'

# pages in the order of the navigation: (title in the menu, page name); the rest follow in notebook order
FIRST = ['index', 'tutorial', 'callback', 'prune', 'diagnostics', 'results']


def _title(nb:dict, fallback:str) -> str:
    for c in nb['cells']:
        src = ''.join(c['source'])
        m = re.search(r'^title:\s*(.+)$', src, re.M) if c['cell_type'] == 'raw' else re.match(r'#\s+(.+)', src)
        if m: return m.group(1).strip().strip("'\"")
    return fallback


def _page_name(nb:dict, path:Path) -> str:
    "The page's name, as nbdev names it: the `output-file` of its front matter (records.html -> records)"
    for c in nb['cells']:
        if c['cell_type'] == 'raw':
            m = re.search(r'^output-file:\s*(\S+)\.html$', ''.join(c['source']), re.M)
            if m: return m.group(1)
    return re.sub(r'^\d+_', '', path.stem)


def _fix_links(text:str, modules:set[str]) -> str:
    "nbdev's root-relative links, made relative to the site; source links, to the highlighted copies of the modules"
    def src(m):
        mod = m.group(1)
        return f"](src/{mod}.html#L-{m.group(2)})" if mod in modules else m.group(0)
    text = re.sub(r'\]\(/blob/[^/)]+/fastai_hardmine/(\w+)\.py#L(\d+)\)', src, text)
    text = re.sub(r'\]\(/([\w.-]+\.html(?:#[^)]*)?)\)', r'](\1)', text)
    # links between repository files (the README's to nbs/results.md) become links between pages
    text = re.sub(r'\]\((?:nbs/)?([\w-]+)\.md(#[^)]*)?\)', r'](\1.html\2)', text)
    text = re.sub(r'\]\(nbs/(?:\d+_)?(\w+)\.ipynb\)', r'](\1.html)', text)
    # Quarto's attribute syntax after a link (`{target="_blank" ...}`) means nothing to other renderers
    return re.sub(r'\)\{[^}\n]*\}', ')', text)


def _library_warning(output:dict) -> bool:
    "A stderr output that only holds warnings raised inside installed libraries (torch's deprecations at import, ...)"
    if output.get('output_type') != 'stream' or output.get('name') != 'stderr': return False
    heads = [l for l in ''.join(output['text']).splitlines() if l.strip() and not l.startswith(' ')]
    return bool(heads) and all(re.search(r'/site-packages/.+:\d+: \w*Warning: ', l) for l in heads)


def _stage_notebook(src:Path, dst:Path, modules:set[str]):
    "A processed notebook, made ready for mkdocs-jupyter: no front matter cell, no `#|` lines, `echo: false` inputs hidden"
    nb = json.loads(src.read_text())
    cells = []
    for c in nb['cells']:
        if c['cell_type'] == 'raw': continue
        # nbdev's execution timings (numbers where nbformat's schema wants strings)
        c.get('metadata', {}).pop('execution', None)
        lines = ''.join(c['source']).splitlines(keepends=True)
        if c['cell_type'] == 'code':
            directives = ''.join(l for l in lines if l.startswith('#|'))
            lines = [l for l in lines if not l.startswith('#|')]
            if 'echo: false' in directives: c.setdefault('metadata', {}).setdefault('tags', []).append('remove_input')
            c['outputs'] = [o for o in c.get('outputs', []) if not _library_warning(o)]
            for o in c['outputs']:
                if 'text/markdown' in o.get('data', {}):
                    o['data']['text/markdown'] = _fix_links(''.join(o['data']['text/markdown']), modules)
                # a `show_doc` output also carries its repr as text/plain: the markdown is what is shown
                if 'text/markdown' in o.get('data', {}): o['data'].pop('text/plain', None)
        else: lines = _fix_links(''.join(lines), modules).splitlines(keepends=True)
        if c['cell_type'] == 'markdown' and ''.join(lines).strip().startswith('<!-- WARNING'): continue
        c['source'] = lines
        cells.append(c)
    nb['cells'] = cells
    dst.write_text(json.dumps(nb))


def _source_pages(modules:list[Path], out:Path):
    "Each module of the package as a highlighted page with an anchor per line (`#L-21`)"
    from pygments import highlight
    from pygments.lexers import PythonLexer
    from pygments.formatters import HtmlFormatter
    out.mkdir(parents=True, exist_ok=True)
    fmt = HtmlFormatter(linenos='table', lineanchors='L', anchorlinenos=True, full=True, title='')
    for m in modules:
        fmt.title = f'fastai_hardmine/{m.name}'
        (out/f'{m.stem}.html').write_text(highlight(m.read_text(), PythonLexer(), fmt))


def _mkdocs_yml(pages:list[tuple[str, str]]) -> str:
    nav = '\n'.join(f"  - {json.dumps(title)}: {name}" for title, name in pages)
    return f"""site_name: fastai_hardmine
site_description: Hard-example mining for fastai
docs_dir: {STAGE.name}
site_dir: ../{SITE.name}
use_directory_urls: false
theme:
  name: material
  font: false
  features: [navigation.sections, content.code.copy]
nav:
{nav}
plugins:
  - search
  - mkdocs-jupyter:
      execute: false
      include_source: true
      ignore_h1_titles: false
      remove_tag_config:
        remove_input_tags: [remove_input]
extra_css: [extra.css]
markdown_extensions: [tables, admonition, toc]
"""


def build():
    "Process the notebooks with nbdev, stage them for MkDocs, render the site into _docs/"
    from nbdev.serve import proc_nbs
    proc_nbs(n_workers=0, force=True)
    proc = ROOT/'_proc'
    shutil.rmtree(STAGE, ignore_errors=True); shutil.rmtree(SITE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    modules = sorted(p for p in (ROOT/'fastai_hardmine').glob('*.py') if not p.name.startswith('_'))
    names = {m.stem for m in modules}
    pages = []
    for nb_path in sorted(proc.glob('*.ipynb')):
        nb = json.loads(nb_path.read_text())
        name = 'index' if nb_path.stem == 'index' else _page_name(nb, nb_path)
        _stage_notebook(nb_path, STAGE/f'{name}.ipynb', names)
        pages.append(('Home' if name == 'index' else _title(nb, name), f'{name}.ipynb'))
    results = proc/'results.md'
    if results.exists():
        text = re.sub(r'\A---\n.*?\n---\n', '', results.read_text(), flags=re.S)
        (STAGE/'results.md').write_text('# Benchmark results\n\n' + _fix_links(text, names))
        shutil.copytree(proc/'results', STAGE/'results', ignore=shutil.ignore_patterns('*.npz', '*.json'))
        pages.append(('Benchmark results', 'results.md'))
    for extra in ('images',):
        if (proc/extra).exists(): shutil.copytree(proc/extra, STAGE/extra)
    _source_pages(modules, STAGE/'src')
    # notebook prompts (`In [ ]:`, `Out[4]:`) mean nothing on a documentation page
    (STAGE/"extra.css").write_text(".jupyter-wrapper .jp-InputPrompt, .jupyter-wrapper .jp-OutputPrompt { display: none !important; }\n"
                                   ".md-grid { max-width: 1400px; }\n")
    order = {n: i for i, n in enumerate(FIRST)}
    pages.sort(key=lambda p: order.get(Path(p[1]).stem, len(order)))
    # the MkDocs settings are made here, next to the staged pages, from the notebooks found
    (proc/'mkdocs.yml').write_text(_mkdocs_yml(pages))
    subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--quiet', '-f', str(proc/'mkdocs.yml')], cwd=ROOT, check=True,
                   env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    print(f"docs: {len(pages)} pages and {len(modules)} source pages in {SITE.relative_to(ROOT)}/ "
          f"(open {SITE.relative_to(ROOT)}/index.html)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def _serve(port:int=0) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(('127.0.0.1', port), functools.partial(_Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not (chromium and driver):
        raise SystemExit("docs check: needs headless Chromium and its driver (Debian: apt-get install -y chromium "
                         "chromium-driver); .ci/run installs them when missing")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1280,1000', '--disable-dev-shm-usage'):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


# what an error cell or a failed page shows: a Python traceback, or an exception line as a notebook prints it
ERRORS = re.compile(r'Traceback \(most recent call last\)|^\w+(Error|Exception): ', re.M)


def check():
    "Open every page in headless Chromium: each loads, its internal links resolve, its images load, no error shows"
    if not (SITE/'index.html').exists(): raise SystemExit("docs check: no site in _docs/: run `python tools/docs.py build`")
    server = _serve()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    pages = sorted(p.relative_to(SITE).as_posix() for p in SITE.glob('*.html') if p.name != '404.html')
    browser, problems = _browser(), []
    shutil.rmtree(SHOTS, ignore_errors=True); SHOTS.mkdir()
    try:
        for page in pages:
            browser.get(base + page)
            title = browser.title
            if not title or '404' in title: problems.append(f"{page}: did not load (title {title!r})")
            text = browser.find_element('tag name', 'article').text if browser.find_elements('tag name', 'article') else ''
            if not text.strip(): problems.append(f"{page}: no content")
            m = ERRORS.search(text)
            if m: problems.append(f"{page}: shows an error: {text[max(0, m.start() - 80):m.end() + 120]!r}")
            errs = browser.find_elements('css selector', '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')
            if errs: problems.append(f"{page}: {len(errs)} cell(s) print to stderr: {errs[0].text[:200]!r}")
            broken = browser.execute_script(
                "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
            problems += [f"{page}: image does not load: {src[:120]}" for src in broken]
            links = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
            for href in links:
                # the project has no public repository or hosted site yet: a link there leads nowhere
                if re.match(r'https?://([\w-]+\.)?(github\.com/fastai-hardmine|fastai-hardmine\.github\.io)', href):
                    problems.append(f"{page}: link to a place that does not exist: {href}")
                if not href.startswith(base): continue
                target = href[len(base):].split('#')[0].split('?')[0]
                if target and not (SITE/target).exists(): problems.append(f"{page}: link to a missing page: {target}")
            if page in ('index.html', 'callback.html', 'diagnostics.html'):
                browser.save_screenshot(str(SHOTS/page.replace('.html', '.png')))
    finally:
        browser.quit(); server.shutdown()
    for p in problems: print('docs check:', p)
    print(f"docs check: {len(pages)} pages opened in headless Chromium, {len(problems)} problem(s); "
          f"screenshots in {SHOTS.relative_to(ROOT)}/")
    if problems: raise SystemExit(1)


def run(nb_path:str):
    "Run the notebook in its folder and save its outputs, less printed text (progress, warnings) and execution counts"
    nb_path = Path(nb_path).resolve()
    out = ROOT/'_proc'/f'run_{nb_path.name}'
    out.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, '-c', 'import sys; from execnb.shell import exec_nb; exec_nb(sys.argv[1], sys.argv[2])',
                    nb_path.name, str(out)], cwd=nb_path.parent, check=True)
    nb = json.loads(out.read_text())
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        c['outputs'] = [o for o in c.get('outputs', []) if o.get('output_type') != 'stream']
        for o in c['outputs']:
            if 'execution_count' in o: o['execution_count'] = None
        c['execution_count'] = None
        c.get('metadata', {}).pop('execution', None)
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    print(f"ran {nb_path.relative_to(ROOT)}: outputs saved")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=('build', 'check', 'serve', 'run'))
    p.add_argument('notebook', nargs='?', help="the notebook to run (command 'run')")
    args = p.parse_args()
    if args.command == 'run':
        if not args.notebook: p.error("run: which notebook? e.g. python tools/docs.py run nbs/19_diagnostics.ipynb")
        run(args.notebook)
    elif args.command == 'build': build()
    elif args.command == 'check': check()
    else:
        build()
        server = _serve(8000)
        print("serving _docs/ on http://localhost:8000 (Ctrl-C stops)")
        try: threading.Event().wait()
        except KeyboardInterrupt: server.shutdown()


if __name__ == '__main__': main()
